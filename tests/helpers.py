"""Shared test helpers: tolerances and comparison against the float64 reference."""

from __future__ import annotations

import os

import torch

from entropy_gpu import STAT_NAMES, TokenStats

# Where the device-aware tests put their tensors (the kernels run compiled on "cuda").
TEST_DEVICE = torch.device(os.environ.get("ENTROPY_GPU_TEST_DEVICE", "cpu"))

# Absolute tolerance per field for fp32 accumulation (any input dtype: the reference
# sees the same rounded inputs). logsumexp and logprob also get a relative term: past
# |value| ~ 50 an fp32 output cannot hold 1e-4 (ulp(1e5) = 0.008).
ATOL = {
    "logsumexp": 1e-4, "entropy": 1e-4, "logprob": 1e-4, "nll_grad_norm": 1e-4,
    "sum_sq_probs": 1e-5, "varentropy": 1e-4, "entropy_grad_norm": 1e-4, "entropy_change": 1e-4,
}
RTOL = {"logsumexp": 2e-6, "logprob": 2e-6, "varentropy": 1e-4, "entropy_change": 1e-4}


def assert_matches(out: TokenStats, ref: dict[str, torch.Tensor], names=STAT_NAMES,
                   context: str = "") -> None:
    for name in names:
        if name not in ref:
            continue
        got = getattr(out, name)
        assert got is not None, f"{name} missing {context}"
        want = ref[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} {context}"
        torch.testing.assert_close(
            got.double().cpu(), want.cpu(), atol=ATOL[name], rtol=RTOL.get(name, 0.0),
            equal_nan=True, msg=lambda m, name=name: f"{name} {context}: {m}")


def random_logits(shape, dtype=torch.float32, scale=1.0, generator=None, device=None) -> torch.Tensor:
    """Random logits drawn in float64 on the CPU (reproducible), then cast and moved."""
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype)
    return x.to(device or TEST_DEVICE)


def randint(high, shape) -> torch.Tensor:
    return torch.randint(0, high, shape).to(TEST_DEVICE)


def reference_rows(x: torch.Tensor, y: torch.Tensor, mask=None, weight=None, fn=None):
    """Float64 reference correlation and pair count of each row of [R, T] tensors."""
    from tests.reference import reference_pearson

    fn = fn or reference_pearson
    x, y = x.cpu(), y.cpu()
    mask = None if mask is None else mask.cpu()
    weight = None if weight is None else weight.cpu()
    corr, n = [], []
    for r in range(x.shape[0]):
        used = torch.ones(x.shape[1], dtype=torch.bool) if mask is None else mask[r].clone()
        if weight is not None:
            used &= weight[r] > 0
        xs, ys = x[r][used].double().numpy(), y[r][used].double().numpy()
        if weight is None:
            corr.append(fn(xs, ys))
            n.append(float(used.sum()))
        else:
            w = weight[r][used].double()
            corr.append(fn(xs, ys, w.numpy()))
            n.append(float(w.sum()))
    return torch.tensor(corr, dtype=torch.float64), torch.tensor(n, dtype=torch.float64)


def assert_correlation(got, want_corr: torch.Tensor, want_n: torch.Tensor | None = None, *, atol: float,
                       context: str = "") -> None:
    """``got`` (a Correlation) against float64 reference values: NaN exactly where the
    reference is undefined, ``valid`` its complement, values within ``atol``."""
    corr = got.corr.reshape(-1).double().cpu()
    want_corr = want_corr.reshape(-1).cpu()
    assert torch.equal(torch.isnan(corr),
                       torch.isnan(want_corr)), f"NaN pattern {context}: {corr} vs {want_corr}"
    assert torch.equal(got.valid.reshape(-1).cpu(), ~torch.isnan(want_corr)), f"valid {context}"
    torch.testing.assert_close(corr, want_corr, atol=atol, rtol=0, equal_nan=True,
                               msg=lambda m: f"corr {context}: {m}")
    if want_n is not None:
        torch.testing.assert_close(got.n.reshape(-1).cpu(), want_n.reshape(-1).double().cpu(),
                                   msg=lambda m: f"n {context}: {m}")


def run_ranks(commands: list[list[str]], *, env: dict[str, str] | None = None, timeout: float = 400) -> None:
    """Run one process per rank (``commands[rank]``) at once and wait for all; fail with
    the rank's output unless each exits 0 and prints ``rank <r> ok``. Stragglers are killed."""
    import subprocess

    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
        assert f"rank {rank} ok" in output, f"rank {rank} did not finish:\n{output[-4000:]}"
