"""Fused token statistics: one read of each logit row gives any subset of
logsumexp, entropy, target logprob, sum of squared probabilities, the two
logit-gradient norms and the varentropy (definitions: docs/numerics.md).

Grid: axis 0 walks rows (no 65535 limit), axis 1 splits the vocabulary so that a
few long rows still fill the GPU. With one split the kernel finishes the row
itself; with several, each program writes its partial moments and a small merge
kernel combines them (the same rescaling that merges tensor-parallel shards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import stat_layout
from .softmax_moments import (
    load_target,
    recentre_factors,
    recentre_moments,
    recentre_on_max,
    row_pointer,
    store_token_stats,
)
from .stat_layout import STAT_NAMES, STATE_WIDTH, accumulators_needed, vocab_splits

OUTPUT_ORDER = STAT_NAMES  # the rows of the output buffer and the ``want`` flags


@triton.jit
def token_stats_kernel(
    logits_ptr, targets_ptr, out_ptr, state_ptr,
    n_rows, inner_rows, vocab, split_size,
    stride_outer, stride_inner, stride_vocab,
    inv_t, ignore_index,
    HAS_TARGETS: tl.constexpr, PARTIAL: tl.constexpr,
    NEED_S1: tl.constexpr, NEED_S2: tl.constexpr, NEED_Q0: tl.constexpr, NEED_Q12: tl.constexpr,
    W_LSE: tl.constexpr, W_ENT: tl.constexpr, W_LOGPROB: tl.constexpr, W_SUMSQ: tl.constexpr,
    W_NLL_GRAD: tl.constexpr, W_VARENT: tl.constexpr, W_ENT_GRAD: tl.constexpr, W_ENT_CHANGE: tl.constexpr,
    W_STATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    target, in_range, ignored = load_target(targets_ptr, row, vocab, ignore_index, HAS_TARGETS)
    excluded = tl.where(in_range, target, -1)  # column left out of the q-sums

    start = split * split_size
    end = tl.minimum(start + split_size, vocab)
    cols = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], dtype=ACC)
    m = tl.max(zero, 0) - float("inf")
    s0 = zero
    s1 = zero
    s2 = zero
    q0 = zero
    q1 = zero
    q2 = zero
    for block_start in range(start, end, BLOCK_V):
        idx = block_start + cols
        z = tl.load(row_ptr + idx * stride_vocab, mask=idx < end, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        if m_new > m:  # rare after the first blocks: skip the re-centring otherwise
            # Re-centre the running sums on the new maximum (scalar factors, vector sums).
            s0, s1, s2, q0, q1, q2 = recentre_on_max(m, m_new, inv_t, s0, s1, s2, q0, q1, q2,
                                                     NEED_S1, NEED_S2, NEED_Q0, NEED_Q12)
            m = m_new
        # -inf entries (masked vocabulary, padding lanes) contribute nothing; NaN passes through.
        finite = z != float("-inf")
        d = tl.where(finite, (z - m) * inv_t, 0.0)
        e = tl.where(finite, tl.exp(d), 0.0)
        s0 += e
        if NEED_S1:
            s1 += e * d
        if NEED_S2:
            s2 += e * d * d
        if NEED_Q0 or NEED_Q12:
            e_q = tl.where(idx != excluded, e, 0.0)
            e2 = e_q * e_q
            q0 += e2
            if NEED_Q12:
                q1 += e2 * d
                q2 += e2 * d * d

    s0_sum = tl.sum(s0, 0)
    s1_sum = tl.sum(s1, 0)
    s2_sum = tl.sum(s2, 0)
    q0_sum = tl.sum(q0, 0)
    q1_sum = tl.sum(q1, 0)
    q2_sum = tl.sum(q2, 0)
    if PARTIAL:
        state = state_ptr + (row * tl.num_programs(1) + split) * stat_layout.STATE_WIDTH
        tl.store(state + stat_layout.STATE_MAX, m)
        tl.store(state + stat_layout.STATE_S0, s0_sum)
        tl.store(state + stat_layout.STATE_S1, s1_sum)
        tl.store(state + stat_layout.STATE_S2, s2_sum)
        tl.store(state + stat_layout.STATE_Q0, q0_sum)
        tl.store(state + stat_layout.STATE_Q1, q1_sum)
        tl.store(state + stat_layout.STATE_Q2, q2_sum)
    else:
        store_token_stats(
            out_ptr, n_rows, row, m, s0_sum, s1_sum, s2_sum, q0_sum, q1_sum, q2_sum,
            row_ptr, stride_vocab, target, in_range, ignored, inv_t, ACC,
            W_LSE, W_ENT, W_LOGPROB, W_SUMSQ, W_NLL_GRAD, W_VARENT, W_ENT_GRAD, W_ENT_CHANGE, W_STATE,
        )


@triton.jit
def token_stats_merge_kernel(
    logits_ptr, targets_ptr, out_ptr, state_ptr,
    n_rows, inner_rows, vocab, num_splits,
    stride_outer, stride_inner, stride_vocab,
    inv_t, ignore_index,
    HAS_TARGETS: tl.constexpr,
    NEED_S1: tl.constexpr, NEED_S2: tl.constexpr, NEED_Q12: tl.constexpr,
    W_LSE: tl.constexpr, W_ENT: tl.constexpr, W_LOGPROB: tl.constexpr, W_SUMSQ: tl.constexpr,
    W_NLL_GRAD: tl.constexpr, W_VARENT: tl.constexpr, W_ENT_GRAD: tl.constexpr, W_ENT_CHANGE: tl.constexpr,
    W_STATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the per-split moments of one row and store its statistics."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    valid = splits < num_splits
    state = state_ptr + (row * num_splits + splits) * stat_layout.STATE_WIDTH
    m_part = tl.load(state + stat_layout.STATE_MAX, mask=valid, other=float("-inf"))
    m = tl.max(m_part, 0)
    # Each split's sums moved to the row maximum (splits that saw no finite logit hold zeros).
    delta, scale = recentre_factors(m_part, m, inv_t)
    s0, s1, s2 = recentre_moments(
        tl.load(state + stat_layout.STATE_S0, mask=valid, other=0.0),
        tl.load(state + stat_layout.STATE_S1, mask=valid, other=0.0),
        tl.load(state + stat_layout.STATE_S2, mask=valid, other=0.0), scale, delta, NEED_S1, NEED_S2)
    q0, q1, q2 = recentre_moments(
        tl.load(state + stat_layout.STATE_Q0, mask=valid, other=0.0),
        tl.load(state + stat_layout.STATE_Q1, mask=valid, other=0.0),
        tl.load(state + stat_layout.STATE_Q2, mask=valid, other=0.0),
        scale * scale, delta, NEED_Q12, NEED_Q12)
    row_ptr = row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner)
    target, in_range, ignored = load_target(targets_ptr, row, vocab, ignore_index, HAS_TARGETS)
    store_token_stats(
        out_ptr, n_rows, row, m,
        tl.sum(s0, 0), tl.sum(s1, 0), tl.sum(s2, 0), tl.sum(q0, 0), tl.sum(q1, 0), tl.sum(q2, 0),
        row_ptr, stride_vocab, target, in_range, ignored, inv_t, ACC,
        W_LSE, W_ENT, W_LOGPROB, W_SUMSQ, W_NLL_GRAD, W_VARENT, W_ENT_GRAD, W_ENT_CHANGE, W_STATE,
    )


def _default_block_v(vocab: int, dtype: torch.dtype, n_accumulators: int) -> int:
    # Enough columns per block for 16-byte loads in every thread, fewer when many
    # accumulators compete for registers.
    cap = 4096 if n_accumulators <= 3 else 2048
    if dtype == torch.float64:
        cap //= 2
    return max(16, min(cap, triton.next_power_of_2(vocab)))


def _default_num_splits(n_rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted_programs = 4 * sms
    if n_rows >= wanted_programs:
        return 1
    most = max(1, vocab // (2 * block_v))  # keep at least two blocks per split
    return max(1, min(most, math.ceil(wanted_programs / n_rows)))


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1, 2: 65535)


def launch_plan(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, want: Sequence[bool],
                block_v: int | None = None, num_splits: int | None = None,
                num_warps: int | None = None) -> dict:
    """Launch configuration: rows on grid axis 0 (up to 2^31 - 1), splits on axis 1."""
    if n_rows > MAX_GRID_X:
        raise ValueError(f"{n_rows} rows exceed the {MAX_GRID_X} programs of one launch; split the batch")
    need_s1, need_s2, need_q0, need_q12 = accumulators_needed(want)
    n_acc = 1 + need_s1 + need_s2 + need_q0 + 2 * need_q12
    block_v = block_v or _default_block_v(vocab, dtype, n_acc)
    splits = num_splits or _default_num_splits(n_rows, vocab, block_v, device)
    split_size, splits = vocab_splits(vocab, splits, block_v)
    return dict(grid=(n_rows, splits), block_v=block_v, split_size=split_size,
                num_warps=num_warps or (8 if block_v >= 2048 else 4))


def _want_flags(want: Sequence[bool], save_state: bool) -> dict:
    names = ("W_LSE", "W_ENT", "W_LOGPROB", "W_SUMSQ", "W_NLL_GRAD", "W_VARENT", "W_ENT_GRAD", "W_ENT_CHANGE")
    return {**dict(zip(names, (bool(w) for w in want))), "W_STATE": bool(save_state)}


def launch_token_stats(
    rows: torch.Tensor,
    targets: torch.Tensor | None,
    out: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    want: Sequence[bool],
    save_state: bool = False,
    block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch the fused kernel(s).

    rows:    [outer, inner, V] strided view of the logits (any strides, fp16/bf16/fp32/fp64).
    targets: contiguous integer [outer * inner] or None.
    out:     contiguous [len(STAT_NAMES), outer * inner] buffer (fp32, or fp64 for fp64 logits); only
             the rows flagged in ``want`` (order: ``OUTPUT_ORDER``) are written. With
             ``save_state`` it is [ROWS_WITH_SAVED_STATE, outer * inner] and rows
             SAVED_ROW_MAX, SAVED_LOG_S0 receive the row maximum and ``log s0``.
    Inputs are trusted: the public API validates them. Out-of-range targets are never
    dereferenced; their target-dependent outputs are NaN.
    """
    outer, inner, vocab = rows.shape
    n_rows = outer * inner
    if n_rows == 0:
        return
    acc = tl.float64 if rows.dtype == torch.float64 else tl.float32
    need_s1, need_s2, need_q0, need_q12 = accumulators_needed(want)
    plan = launch_plan(n_rows, vocab, rows.dtype, rows.device, want, block_v, num_splits, num_warps)
    block_v, split_size, num_warps = plan["block_v"], plan["split_size"], plan["num_warps"]
    splits = plan["grid"][1]
    stride_outer, stride_inner, stride_vocab = rows.stride()
    has_targets = targets is not None
    targets_arg = targets if has_targets else out  # never read when HAS_TARGETS is False
    flags = _want_flags(want, save_state)
    common = (n_rows, inner, vocab)
    strides = (stride_outer, stride_inner, stride_vocab)
    if splits == 1:
        token_stats_kernel[(n_rows, 1)](
            rows, targets_arg, out, out, *common, split_size, *strides,
            inv_temperature, ignore_index,
            HAS_TARGETS=has_targets, PARTIAL=False,
            NEED_S1=need_s1, NEED_S2=need_s2, NEED_Q0=need_q0, NEED_Q12=need_q12,
            ACC=acc, BLOCK_V=block_v, num_warps=num_warps, **flags,
        )
        return
    state = torch.empty((n_rows, splits, STATE_WIDTH), device=rows.device, dtype=out.dtype)
    token_stats_kernel[(n_rows, splits)](
        rows, targets_arg, out, state, *common, split_size, *strides,
        inv_temperature, ignore_index,
        HAS_TARGETS=has_targets, PARTIAL=True,
        NEED_S1=need_s1, NEED_S2=need_s2, NEED_Q0=need_q0, NEED_Q12=need_q12,
        ACC=acc, BLOCK_V=block_v, num_warps=num_warps, **flags,
    )
    token_stats_merge_kernel[(n_rows,)](
        rows, targets_arg, out, state, *common, splits, *strides,
        inv_temperature, ignore_index,
        HAS_TARGETS=has_targets, NEED_S1=need_s1, NEED_S2=need_s2, NEED_Q12=need_q12,
        ACC=acc, BLOCK_S=triton.next_power_of_2(splits), num_warps=4, **flags,
    )


def launch_token_moments(
    rows: torch.Tensor,
    excluded: torch.Tensor,
    *,
    inv_temperature: float,
    want: Sequence[bool],
    block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Partial moments only: returns a [outer * inner, splits, STATE_WIDTH] state
    (``stat_layout``: m, s0, s1, s2, q0, q1, q2, unused) per vocabulary split, for the
    caller to merge (a shard of a vocabulary-parallel row).

    excluded: contiguous int64 [outer * inner], the column left out of the q-sums or
    -1 for none.
    """
    outer, inner, vocab = rows.shape
    n_rows = outer * inner
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    need_s1, need_s2, need_q0, need_q12 = accumulators_needed(want)
    plan = launch_plan(n_rows, vocab, rows.dtype, rows.device, want, block_v, num_splits, num_warps)
    block_v, split_size, num_warps = plan["block_v"], plan["split_size"], plan["num_warps"]
    splits = plan["grid"][1]
    state = torch.empty((n_rows, splits, STATE_WIDTH), device=rows.device, dtype=acc_dtype)
    if n_rows == 0:
        return state
    token_stats_kernel[(n_rows, splits)](
        rows, excluded, state, state, n_rows, inner, vocab, split_size, *rows.stride(),
        inv_temperature, -1,  # ignore_index = -1: a row with nothing to exclude passes -1
        HAS_TARGETS=True, PARTIAL=True,
        NEED_S1=need_s1, NEED_S2=need_s2, NEED_Q0=need_q0, NEED_Q12=need_q12,
        ACC=tl.float64 if rows.dtype == torch.float64 else tl.float32,
        BLOCK_V=block_v, num_warps=num_warps, **_want_flags(want, False),
    )
    return state
