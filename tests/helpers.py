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
    "sum_sq_probs": 1e-5, "varentropy": 1e-4, "entropy_grad_norm": 1e-4,
}
RTOL = {"logsumexp": 2e-6, "logprob": 2e-6, "varentropy": 1e-4}


def assert_matches(out: TokenStats, ref: dict[str, torch.Tensor], names=STAT_NAMES, context: str = "") -> None:
    for name in names:
        if name not in ref:
            continue
        got = getattr(out, name)
        assert got is not None, f"{name} missing {context}"
        want = ref[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} {context}"
        torch.testing.assert_close(
            got.double().cpu(), want.cpu(), atol=ATOL[name], rtol=RTOL.get(name, 0.0),
            equal_nan=True, msg=lambda m: f"{name} {context}: {m}")


def random_logits(shape, dtype=torch.float32, scale=1.0, generator=None, device=None) -> torch.Tensor:
    """Random logits drawn in float64 on the CPU (reproducible), then cast and moved."""
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype)
    return x.to(device or TEST_DEVICE)


def randint(high, shape) -> torch.Tensor:
    return torch.randint(0, high, shape).to(TEST_DEVICE)
