"""How the Triton backward rounds 16-bit gradients, checked bit for bit.

The kernel computes each gradient entry in fp32 and rounds it once to the gradient's
dtype, to nearest even (``round_to_output`` in kernels/token_stats_backward.py; the
compiled PTX/SASS is checked in tests/kernels/test_compile_cuda.py). Triton 3.9's interpreter,
which runs these tests on CPU, truncates fp32 -> bf16 instead, whatever the requested
mode (fp32 -> fp16 goes through numpy and rounds to nearest), and turns fp32 subnormals
into other tiny values. A loose tolerance that admits truncation would also admit a
one-ulp error in the arithmetic, so this file checks the two halves separately:

1. the fp32 values the kernel rounds (the same launch writing an fp32 gradient) against
   float64 autograd, to fp32 accuracy;
2. the 16-bit gradient against those fp32 values rounded the way the platform rounds:
   truncated under the interpreter (bf16), to nearest even compiled or for fp16. Exact.

Together: the 16-bit gradient is the correctly computed value, rounded once, in a
known direction; within one bf16 ulp of the float64 gradient rounded to nearest.
"""

from __future__ import annotations

import os

import pytest
import torch

import entropy_gpu
from entropy_gpu.kernels.token_stats_backward import launch_token_stats_backward
from tests.helpers import TEST_DEVICE, random_logits

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (round toward zero), as the interpreter does."""
    return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # exact cast


def platform_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in ``dtype`` the way the kernel's conversion rounds on this platform."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return truncate_to_bf16(x)
    return x.to(dtype)  # torch rounds to nearest even, as cvt.rn does


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable 16-bit values between ``a`` and ``b`` (same dtype; +0 = -0)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def reference_grad(logits64: torch.Tensor, targets: torch.Tensor, g_ent: torch.Tensor, g_lp: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    z = logits64.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z / temperature, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ((g_ent * ent).sum() + (g_lp * lp).sum()).backward()
    return z.grad


def row_params(logits64: torch.Tensor, g_ent: torch.Tensor, g_lp: torch.Tensor, temperature: float):
    """The kernel's [5, R] row parameters (see entropy_gpu.moments.backward_row_params), in fp32."""
    row_max = logits64.amax(-1)
    log_s0 = torch.logsumexp((logits64 - row_max.unsqueeze(-1)) / temperature, -1)
    logp = torch.log_softmax(logits64 / temperature, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.stack([row_max, log_s0, ent, g_lp, g_ent]).float().contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,temperature", [(3.0, 1.0), (20.0, 0.7)])
def test_16bit_gradient_is_the_fp32_gradient_rounded_once(dtype, scale, temperature):
    rows, vocab = 6, 1000
    logits = random_logits((1, rows, vocab), dtype, scale)
    logits64 = logits.double().cpu()
    targets = torch.randint(0, vocab, (rows,))
    g_ent = torch.randn(rows, dtype=torch.float64)
    g_lp = torch.randn(rows, dtype=torch.float64)
    params = row_params(logits64[0], g_ent, g_lp, temperature).to(TEST_DEVICE)
    target_cols = targets.to(TEST_DEVICE)

    def run(out_dtype: torch.dtype) -> torch.Tensor:
        grad = torch.empty(logits.shape, dtype=out_dtype, device=TEST_DEVICE)
        launch_token_stats_backward(logits, grad, params, target_cols, inv_temperature=1.0 / temperature)
        return grad.cpu()

    fp32 = run(torch.float32)
    want = reference_grad(logits64[0], targets, g_ent, g_lp, temperature)
    # 1. The values before rounding: fp32 accuracy (params rounded to fp32 included).
    torch.testing.assert_close(fp32[0].double(), want, rtol=1e-5, atol=2e-6 * float(want.abs().max()))
    # 2. The written gradient: those values rounded once, exactly as this platform rounds.
    got = run(dtype)
    expected = platform_rounding(fp32, dtype)
    checked = torch.ones_like(fp32, dtype=torch.bool)
    if dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter also mangles fp32 subnormals (|g| < 2^-126: p_j below ~1e-38)
        # into other tiny values; compiled, they round like the rest. Bound them instead.
        checked = fp32.abs() >= torch.finfo(torch.float32).tiny
        assert bool((got.float().abs()[~checked] < torch.finfo(torch.float32).tiny).all())
    mismatch = got.view(torch.int16)[checked] != expected.view(torch.int16)[checked]
    assert not bool(mismatch.any()), (
        f"{dtype}: {int(mismatch.sum())} of {int(checked.sum())} entries are not the kernel's fp32 gradient "
        f"{'truncated' if dtype == torch.bfloat16 and INTERPRETED else 'rounded to nearest even'}")
    # Consequence: within one ulp of the float64 gradient rounded to nearest wherever the
    # fp32 value is within a small part of an ulp of it. Left out: entries below fp32's
    # normal range (p_j underflows in any fp32 code) and a few where p (a + b (log p + H))
    # cancels.
    in_range = want.abs() >= torch.finfo(torch.float32).tiny
    accurate = in_range & ((fp32[0].double() - want).abs() <= torch.finfo(dtype).eps / 8 * want.abs())
    assert accurate.sum() > 0.99 * in_range.sum(), float(accurate.sum() / in_range.sum())
    distance = ulp_distance(got[0], want.to(dtype))
    assert int(distance[accurate].max()) <= 1, f"{dtype}: {int(distance[accurate].max())} ulps"
    if dtype == torch.bfloat16 and INTERPRETED:  # truncation: never larger in magnitude
        assert bool((got.float().abs() <= fp32.abs())[checked].all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_public_backward_is_within_one_ulp_of_the_rounded_reference(dtype):
    """Through entropy_and_logprobs on the Triton backend: the same bound end to end."""
    rows, vocab = 5, 700
    logits = random_logits((rows, vocab), dtype, 4.0).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,)).to(TEST_DEVICE)
    g_ent, g_lp = torch.randn(rows, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    ent, lp = entropy_gpu.entropy_and_logprobs(logits, targets, backend="triton")
    ((ent.double().cpu() * g_ent).sum() + (lp.double().cpu() * g_lp).sum()).backward()
    assert logits.grad.dtype == dtype
    want = reference_grad(logits.detach().double().cpu(), targets.cpu(), g_ent, g_lp, 1.0)
    got = logits.grad.cpu()
    accurate = want.abs() > 1e-3 * float(want.abs().max())  # away from cancellation near zero
    assert int(ulp_distance(got, want.to(dtype))[accurate].max()) <= 1
