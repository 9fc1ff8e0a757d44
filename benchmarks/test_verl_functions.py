"""verl's entropy / log-prob functions, unpatched and patched by ``entropy_gpu.integrations.verl``,
side by side, called through verl's own module (``verl.utils.torch_functional``) as its engines
call them.

Cases:

- ``old_log_prob``: what verl's FSDP engine runs on the (temperature-scaled) logits of the
  old-log-prob pass: ``entropy_from_logits`` + ``logprobs_from_logits``, plus
  ``calculate_sum_pi_squared_from_logits`` (``actor.calculate_sum_pi_squared=True``).
- ``update``: ``entropy_from_logits`` + ``logprobs_from_logits`` forward and backward (the actor
  update with an entropy term).
- ``fused_linear``: ``FusedLinearForPPO`` (``use_fused_kernels=True``, torch backend), forward
  and backward, from hidden states and the LM-head weight.

extra_info holds the largest error of each output against float64 on the same inputs.

    .venv/bin/python -m pytest benchmarks/test_verl_functions.py --benchmark-only \\
        --benchmark-columns=min,median,max

``BENCH_SMOKE=1`` (CI, with ``--benchmark-disable``) runs tiny shapes once.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, SMOKE

verl_F = pytest.importorskip(
    "verl.utils.torch_functional", reason="verl is not installed (bash scripts/setup.sh dev installs it)"
)
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402

from entropy_gpu.integrations import verl as ev  # noqa: E402

if DEVICE.type == "cuda":
    SHAPES = [(8192, 151936), (4096, 262144)]
    LINEAR_SHAPES = [(8192, 2048, 151936)]
elif SMOKE:
    SHAPES, LINEAR_SHAPES = [(32, 1000)], [(16, 32, 1000)]
else:
    SHAPES = [(512, 32000), (128, 151936)]
    LINEAR_SHAPES = [(256, 512, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = 1 if SMOKE else 3


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _functions(patched: bool) -> dict:
    ev.unpatch_verl()
    if patched:
        ev.patch_verl()
    out = {
        name: getattr(verl_F, name)
        for name in ("entropy_from_logits", "logprobs_from_logits", "calculate_sum_pi_squared_from_logits")
    }
    out["fused_forward"] = FusedLinearForPPO.forward
    ev.unpatch_verl()
    return out


FUNCTIONS = {"verl": _functions(False), "entropy_gpu": _functions(True)}


def _inputs(shape, dtype, seed=0):
    n, v = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    return logits, labels


def _reference(logits, labels):
    x = logits.double()
    lse = torch.logsumexp(x, -1)
    logp = x - lse.unsqueeze(-1)
    p = logp.exp()
    return {
        "entropy": -(p * logp).sum(-1),
        "logprob": logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
        "sum_sq_probs": (p * p).sum(-1),
    }


def _max_errors(out: dict, ref: dict) -> dict:
    return {f"max_err_{k}": (out[k].double() - ref[k]).abs().max().item() for k in out}


@pytest.mark.parametrize("impl", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_old_log_prob(benchmark, shape, dtype, impl):
    benchmark.group = f"verl old_log_prob {shape[0]}x{shape[1]} {dtype} {DEVICE.type}"
    fns = FUNCTIONS[impl]
    logits, labels = _inputs(shape, DTYPES[dtype])

    def run():
        with torch.no_grad():
            out = {
                "entropy": fns["entropy_from_logits"](logits),
                "logprob": fns["logprobs_from_logits"](logits, labels),
                "sum_sq_probs": fns["calculate_sum_pi_squared_from_logits"](logits),
            }
        _sync()
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0 if SMOKE else 1)
    benchmark.extra_info.update(_max_errors(out, _reference(logits, labels)))
    benchmark.extra_info["out_dtype"] = str(out["entropy"].dtype)
    assert (out["logprob"] <= 0).all() or impl == "verl"


@pytest.mark.parametrize("impl", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES[:1], ids=lambda s: "x".join(map(str, s)))
def test_update(benchmark, shape, dtype, impl):
    benchmark.group = f"verl update (fwd+bwd) {shape[0]}x{shape[1]} {dtype} {DEVICE.type}"
    fns = FUNCTIONS[impl]
    base, labels = _inputs(shape, DTYPES[dtype])

    def run():
        leaf = base.detach().requires_grad_(True)
        logits = leaf * 1.0  # an intermediate, as the temperature-scaled logits in verl
        # inplace_backward=False: verl's engine passes it when the entropy reads the same logits.
        logprob = fns["logprobs_from_logits"](logits, labels, inplace_backward=False)
        loss = (fns["entropy_from_logits"](logits).float() * 0.01 - logprob).sum()
        loss.backward()
        _sync()
        return leaf.grad

    grad = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0 if SMOKE else 1)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_linear(benchmark, shape, dtype, impl):
    n, h, v = shape
    benchmark.group = f"verl FusedLinearForPPO (fwd+bwd) {n}x{h}x{v} {dtype} {DEVICE.type}"
    forward = FUNCTIONS[impl]["fused_forward"]
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(n, h, generator=gen) / h**0.25).to(DEVICE, DTYPES[dtype])
    weight = (torch.randn(v, h, generator=gen) / h**0.25).to(DEVICE, DTYPES[dtype])
    ids = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    module = FusedLinearForPPO()

    def run():
        hid, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        logp, ent = forward(module, hid, w, ids, temperature=0.7)
        (logp.sum() + 0.01 * ent.float().sum()).backward()
        _sync()
        return logp.detach(), ent.detach()

    logp, ent = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0 if SMOKE else 1)
    ref = _reference((hidden.double() @ weight.double().T) / 0.7, ids)
    benchmark.extra_info.update(_max_errors({"entropy": ent, "logprob": logp}, ref))
    benchmark.extra_info["entropy_dtype"] = str(ent.dtype)
