"""Weighted co-moments of (x, y) pairs per segment of a packed stream (SPEC section 3).

One program per segment (``offsets`` = ``cu_seqlens``), all segments in one launch.
A program walks its segment in blocks; each block is reduced in registers by a
corrected two-pass (mean, then centred sums minus the first-order rounding
correction) and folded into the running state with Chan's merge. Values are
shifted by a pivot, the first used pair of the segment: shifted data stay small
(mean 1e6, unit variance loses nothing to the shift) and a constant segment gives
exactly zero variance, so it is reported as undefined, not as noise. Shifted
values are also divided by a running scale (the largest |shifted value| so far;
the state is rescaled when it grows, as softmax sums are when the maximum grows),
so squares neither underflow nor overflow float32 for data at 1e-30 or 1e30.

Output per segment, ``STATE_WIDTH`` values in the accumulation dtype:
``weight, pivot_x, pivot_y, mean_x, mean_y, M2x, M2y, Cxy, scale_x, scale_y``, where
the means are of ``(x - pivot_x) / scale_x`` and the sums in the same units. Callers
keep the sums in units of a scale (``CoMoments``): multiplied out, float64 sums of data
beyond about 1e+-154 would leave the float64 range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATE_WIDTH = 10


@triton.jit
def segment_comoments_kernel(
    x_ptr, y_ptr, weight_ptr, offsets_ptr, state_ptr, n_pairs,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    # Clamped to [0, n_pairs]: unchecked offsets may give wrong segments, never wild reads.
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + seg).to(tl.int64), 0), n_pairs)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + seg + 1).to(tl.int64), start), n_pairs)
    lanes = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=ACC), 0)
    n = zero
    pivot_x = zero
    pivot_y = zero
    mean_x = zero
    mean_y = zero
    m2x = zero
    m2y = zero
    cxy = zero
    scale_x = zero
    scale_y = zero
    # Scalar (not 16-byte) loads: segment ends are arbitrary runtime values. That is fine
    # here, the kernel reads 2 floats per token where token statistics read V.
    for block_start in range(start, end, BLOCK):
        idx = block_start + lanes
        inside = idx < end
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(ACC)
        y = tl.load(y_ptr + idx, mask=inside, other=0.0).to(ACC)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + idx, mask=inside, other=0.0).to(ACC)
            used = w > 0.0
        else:
            used = inside
            w = tl.where(inside, 1.0, 0.0).to(ACC)
        n_block = tl.sum(w, 0)
        # Pivot = the segment's first used pair, taken once (while nothing has been seen).
        first = tl.min(tl.where(used, lanes, BLOCK), 0)
        take = (n == 0.0) & (n_block > 0.0)
        pivot_x = tl.where(take, tl.sum(tl.where(lanes == first, x, 0.0), 0), pivot_x)
        pivot_y = tl.where(take, tl.sum(tl.where(lanes == first, y, 0.0), 0), pivot_y)
        # tl.where, not w * x: unused lanes may hold NaN or inf and must not leak in.
        xs = tl.where(used, x - pivot_x, 0.0)
        ys = tl.where(used, y - pivot_y, 0.0)
        # Grow the running scales to cover this block; rescale the state to the new units.
        new_scale_x = tl.maximum(scale_x, tl.max(tl.abs(xs), 0))
        new_scale_y = tl.maximum(scale_y, tl.max(tl.abs(ys), 0))
        ratio_x = tl.where(new_scale_x > 0.0, scale_x / new_scale_x, 1.0)
        ratio_y = tl.where(new_scale_y > 0.0, scale_y / new_scale_y, 1.0)
        mean_x *= ratio_x
        mean_y *= ratio_y
        m2x *= ratio_x * ratio_x
        m2y *= ratio_y * ratio_y
        cxy *= ratio_x * ratio_y
        scale_x = new_scale_x
        scale_y = new_scale_y
        xs = xs / tl.where(scale_x > 0.0, scale_x, 1.0)
        ys = ys / tl.where(scale_y > 0.0, scale_y, 1.0)
        inv_n_block = 1.0 / tl.where(n_block > 0.0, n_block, 1.0)
        mean_bx = tl.sum(w * xs, 0) * inv_n_block
        mean_by = tl.sum(w * ys, 0) * inv_n_block
        dx = tl.where(used, xs - mean_bx, 0.0)
        dy = tl.where(used, ys - mean_by, 0.0)
        wdx = w * dx
        wdy = w * dy
        # Corrected two-pass: subtracting (sum w d)^2 / n removes the error of the rounded mean.
        sum_dx = tl.sum(wdx, 0)
        sum_dy = tl.sum(wdy, 0)
        m2x_block = tl.sum(wdx * dx, 0) - sum_dx * sum_dx * inv_n_block
        m2y_block = tl.sum(wdy * dy, 0) - sum_dy * sum_dy * inv_n_block
        cxy_block = tl.sum(wdx * dy, 0) - sum_dx * sum_dy * inv_n_block
        mean_bx += sum_dx * inv_n_block
        mean_by += sum_dy * inv_n_block
        # Chan et al. merge of (n, mean, M2, C) with the block's.
        n_total = n + n_block
        frac = n_block / tl.where(n_total > 0.0, n_total, 1.0)
        delta_x = mean_bx - mean_x
        delta_y = mean_by - mean_y
        mean_x += delta_x * frac
        mean_y += delta_y * frac
        m2x += m2x_block + delta_x * delta_x * n * frac
        m2y += m2y_block + delta_y * delta_y * n * frac
        cxy += cxy_block + delta_x * delta_y * n * frac
        n = n_total
    out = state_ptr + seg * 10
    tl.store(out + 0, n)
    tl.store(out + 1, pivot_x)
    tl.store(out + 2, pivot_y)
    tl.store(out + 3, mean_x)
    tl.store(out + 4, mean_y)
    tl.store(out + 5, m2x)
    tl.store(out + 6, m2y)
    tl.store(out + 7, cxy)
    tl.store(out + 8, scale_x)
    tl.store(out + 9, scale_y)


def default_block(max_length: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(1, max_length))))


def launch_segment_comoments(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    offsets: torch.Tensor,
    state: torch.Tensor,
    *,
    max_length: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Fill ``state`` [S, STATE_WIDTH] with the co-moments of each segment.

    x, y:    contiguous 1-D tensors of the same length (fp16/bf16/fp32/fp64).
    weight:  None (every pair counts once) or a contiguous 1-D tensor of finite
             weights >= 0 in the accumulation dtype; pairs with weight 0 are skipped,
             whatever their values.
    offsets: contiguous int32/int64 [S + 1], non-decreasing, offsets[-1] <= len(x); other
             values are clamped into [0, len(x)] (no out-of-bounds access, meaningless segments).
    state:   contiguous [S, STATE_WIDTH], float32 (float64 for float64 inputs).
    Inputs are trusted: the public API validates them.
    """
    n_segments = state.shape[0]
    if n_segments == 0:
        return
    acc = tl.float64 if state.dtype == torch.float64 else tl.float32
    block = block or default_block(max_length if max_length is not None else 1024)
    num_warps = num_warps or (4 if block >= 512 else 1)
    has_weight = weight is not None
    segment_comoments_kernel[(n_segments,)](
        x, y, weight if has_weight else x, offsets, state, x.numel(),
        HAS_WEIGHT=has_weight, ACC=acc, BLOCK=block, num_warps=num_warps,
    )
