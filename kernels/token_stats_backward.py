"""Backward of the differentiable token statistics (logprob, entropy) w.r.t. the logits.

With x = z / t, p = softmax(x) and upstream gradients a (of logprob) and b (of
entropy), each row's gradient is

    grad_j = (a onehot_j - p_j (a + b (log p_j + H))) / t,   log p_j = (z_j - m) / t - log s0

so one read of each logit and one write of its gradient suffice: the row scalars
(m, log s0, H, a, b) come from the forward (``entropy_gpu.moments.backward_row_params``).
The gradient may be written over the logits themselves (same pointer and strides):
each element is read before it is written, and no other program touches it.

Grid: axis 0 walks rows, axis 1 splits the vocabulary when rows are few.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax_moments import row_pointer


@triton.jit
def round_to_output(value, OUT: tl.constexpr):
    """``value`` (the accumulation dtype) in the gradient's dtype, rounded to nearest, ties
    to even, when that is narrower: ``cvt.rn.bf16x2.f32`` / ``cvt.rn.f16x2.f32`` in the PTX,
    checked by tests/kernels/test_compile_cuda.py. Triton 3.9's default is the same; the explicit
    mode pins it. (Its interpreter truncates fp32 -> bf16 whatever the mode: see
    docs/numerics.md for what the CPU tests check.)"""
    if OUT.primitive_bitwidth < value.dtype.primitive_bitwidth:
        return value.to(OUT, fp_downcast_rounding="rtne")
    else:
        return value.to(OUT)


@triton.jit
def token_stats_backward_kernel(
    logits_ptr, grad_ptr, params_ptr, target_cols_ptr,
    n_rows, inner_rows, vocab, split_size,
    stride_outer, stride_inner, stride_vocab,
    grad_stride_outer, grad_stride_inner, grad_stride_vocab,
    inv_t,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    # params: [5, n_rows] = row_max, log_s0, entropy, coef_logprob, coef_entropy; pointer
    # steps, so no int32 product k * n_rows.
    param = params_ptr + row
    row_max = tl.load(param).to(ACC)
    param += n_rows
    log_s0 = tl.load(param).to(ACC)
    param += n_rows
    ent = tl.load(param).to(ACC)
    param += n_rows
    coef_logprob = tl.load(param).to(ACC)
    param += n_rows
    coef_entropy = tl.load(param).to(ACC)
    target_col = tl.load(target_cols_ptr + row)
    masked_value = 0.0 * (coef_logprob + coef_entropy)  # 0, or NaN for a NaN row
    src = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    dst = row_pointer(grad_ptr, row, inner_rows, grad_stride_outer, grad_stride_inner)
    start = split * split_size
    end = tl.minimum(start + split_size, vocab)
    cols = tl.arange(0, BLOCK_V)
    for block_start in range(start, end, BLOCK_V):
        idx = block_start + cols
        inside = idx < end
        z = tl.load(src + idx * stride_vocab, mask=inside, other=0.0).to(ACC)
        logp = (z - row_max) * inv_t - log_s0
        p = tl.exp(logp)
        weight = tl.where(z == float("-inf"), masked_value, p * (coef_logprob + coef_entropy * (logp + ent)))
        grad = (tl.where(idx == target_col, coef_logprob, 0.0) - weight) * inv_t
        tl.store(dst + idx * grad_stride_vocab, round_to_output(grad, grad_ptr.dtype.element_ty), mask=inside)


def _default_block_v(vocab: int, dtype: torch.dtype) -> int:
    cap = 2048 if dtype == torch.float64 else 4096
    return max(16, min(cap, triton.next_power_of_2(vocab)))


def _default_num_splits(n_rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    wanted_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    if n_rows >= wanted_programs:
        return 1
    return max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(wanted_programs, n_rows)))


def launch_token_stats_backward(
    rows: torch.Tensor,
    grad: torch.Tensor,
    params: torch.Tensor,
    target_cols: torch.Tensor,
    *,
    inv_temperature: float,
    block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Write the logits gradient of every row into ``grad``.

    rows:        [outer, inner, V] strided view of the logits.
    grad:        [outer, inner, V] strided view of the output (same dtype as rows, or
                 wider); may be ``rows`` itself (in-place backward).
    params:      contiguous [5, outer * inner] in the accumulation dtype (fp32, fp64 for
                 fp64 logits), from ``entropy_gpu.moments.backward_row_params``.
    target_cols: contiguous int64 [outer * inner], the one-hot column or -1.
    Inputs are trusted: the public API validates them.
    """
    outer, inner, vocab = rows.shape
    n_rows = outer * inner
    if n_rows == 0:
        return
    acc = tl.float64 if params.dtype == torch.float64 else tl.float32
    block_v = block_v or _default_block_v(vocab, rows.dtype)
    splits = num_splits or _default_num_splits(n_rows, vocab, block_v, rows.device)
    split_size = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, split_size)
    num_warps = num_warps or (8 if block_v >= 2048 else 4)
    token_stats_backward_kernel[(n_rows, splits)](
        rows, grad, params, target_cols,
        n_rows, inner, vocab, split_size, *rows.stride(), *grad.stride(),
        inv_temperature,
        ACC=acc, BLOCK_V=block_v, num_warps=num_warps,
    )
