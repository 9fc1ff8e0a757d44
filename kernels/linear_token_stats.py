"""Fused LM head: softmax moments of ``hidden @ weight.T (+ bias)`` without the logits.

Each program owns BLOCK_N tokens and one slice of the vocabulary. It walks the slice
in BLOCK_V columns; every [BLOCK_N, BLOCK_V] logits tile is a tl.dot over the hidden
dimension (fp32 accumulation), folded at once into per-token running moments
(docs/numerics.md, one state per token instead of per lane) and dropped. The target
logit is picked from the tile that holds it. Output: a [N, splits, STATE_WIDTH] state
(``stat_layout``: m, s0, s1, s2, q0, q1, q2, target logit) per vocabulary slice, merged by the caller
with the same rule that merges tensor-parallel shards.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import stat_layout
from .softmax_moments import recentre_on_max
from .stat_layout import STATE_WIDTH, vocab_splits


@triton.jit
def linear_token_moments_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, state_ptr,
    n_tokens, vocab, hidden_dim, split_size,
    stride_hn, stride_hk, stride_wv, stride_wk,
    inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr,
    NEED_S1: tl.constexpr, NEED_S2: tl.constexpr, NEED_Q0: tl.constexpr, NEED_Q12: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block_n = tl.program_id(0)
    split = tl.program_id(1)
    tokens = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < n_tokens
    tokens = tokens.to(tl.int64)
    if HAS_TARGETS:
        target = tl.load(targets_ptr + tokens, mask=token_ok, other=-1).to(tl.int64)
        target = tl.where(target == ignore_index, -1, target)  # an ignored row excludes nothing
    else:
        target = tl.full([BLOCK_N], -1, tl.int64)

    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    m = zero - float("inf")
    s0 = zero
    s1 = zero
    s2 = zero
    q0 = zero
    q1 = zero
    q2 = zero
    z_target = zero
    ks = tl.arange(0, BLOCK_K)
    start = split * split_size
    end = tl.minimum(start + split_size, vocab)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < end
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, hidden_dim, BLOCK_K):
            k = k0 + ks
            k_ok = k < hidden_dim
            h = tl.load(hidden_ptr + tokens[:, None] * stride_hn + k[None, :] * stride_hk,
                        mask=token_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + k[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST_OPERANDS:  # interpreter only: its bf16 tl.dot multiplies bit patterns
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc, float("-inf"))

        m_new = tl.maximum(m, tl.max(z, 1))
        s0, s1, s2, q0, q1, q2 = recentre_on_max(m, m_new, inv_t, s0, s1, s2, q0, q1, q2,
                                                 NEED_S1, NEED_S2, NEED_Q0, NEED_Q12)
        m = m_new
        finite = z != float("-inf")
        d = tl.where(finite, (z - m[:, None]) * inv_t, 0.0)
        e = tl.where(finite, tl.exp(d), 0.0)
        s0 += tl.sum(e, 1)
        if NEED_S1:
            s1 += tl.sum(e * d, 1)
        if NEED_S2:
            s2 += tl.sum(e * d * d, 1)
        is_target = cols[None, :] == target[:, None]
        if HAS_TARGETS:
            z_target += tl.sum(tl.where(is_target, z, 0.0), 1)
        if NEED_Q0 or NEED_Q12:
            e_q = tl.where(is_target, 0.0, e)
            e2 = e_q * e_q
            q0 += tl.sum(e2, 1)
            if NEED_Q12:
                q1 += tl.sum(e2 * d, 1)
                q2 += tl.sum(e2 * d * d, 1)

    state = state_ptr + (tokens * tl.num_programs(1) + split) * stat_layout.STATE_WIDTH
    tl.store(state + stat_layout.STATE_MAX, m, mask=token_ok)
    tl.store(state + stat_layout.STATE_S0, s0, mask=token_ok)
    tl.store(state + stat_layout.STATE_S1, s1, mask=token_ok)
    tl.store(state + stat_layout.STATE_S2, s2, mask=token_ok)
    tl.store(state + stat_layout.STATE_Q0, q0, mask=token_ok)
    tl.store(state + stat_layout.STATE_Q1, q1, mask=token_ok)
    tl.store(state + stat_layout.STATE_Q2, q2, mask=token_ok)
    tl.store(state + stat_layout.STATE_TARGET_LOGIT, z_target, mask=token_ok)


def default_tile(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_stages): the largest tiles without register spills on
    sm_80/sm_90 (python -m entropy_gpu.kernels.aot); fp32 ("ieee" products, no tensor
    cores) needs smaller ones."""
    return (32, 64, 32, 2) if dtype == torch.float32 else (64, 128, 64, 3)


def _default_num_splits(n_tokens: int, vocab: int, block_n: int, block_v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    token_blocks = triton.cdiv(n_tokens, block_n)
    wanted_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, vocab // (4 * block_v))  # keep a few tiles per program
    return max(1, min(most, triton.cdiv(wanted_programs, token_blocks)))


def launch_linear_token_moments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | None,
    *,
    inv_temperature: float,
    ignore_index: int,
    need: tuple[bool, bool, bool, bool],
    block_n: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Moments of ``hidden @ weight.T + bias`` per token and vocabulary split.

    hidden [N, H], weight [V, H] (any strides), bias [V] or None, all fp16/bf16/fp32 of
    one dtype; targets contiguous integer [N] or None (need = (s1, s2, q0, q12) flags).
    Returns (state [N, splits, STATE_WIDTH] fp32, split_size): split ``j`` covers columns
    ``[j * split_size, (j + 1) * split_size)``; a token's target logit is in the
    split that holds its target (0 elsewhere).
    """
    n_tokens, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    tile_n, tile_v, tile_k, stages = default_tile(hidden.dtype)
    min_block = 16  # tl.dot needs every dimension >= 16
    block_n = block_n or max(min_block, min(tile_n, triton.next_power_of_2(n_tokens)))
    block_v = block_v or max(min_block, min(tile_v, triton.next_power_of_2(vocab)))
    block_k = block_k or max(min_block, min(tile_k, triton.next_power_of_2(hidden_dim)))
    num_stages = num_stages or stages
    splits = num_splits or _default_num_splits(n_tokens, vocab, block_n, block_v, hidden.device)
    split_size, splits = vocab_splits(vocab, splits, block_v)
    state = torch.empty((n_tokens, splits, STATE_WIDTH), device=hidden.device, dtype=torch.float32)
    if n_tokens == 0:
        return state, split_size
    need_s1, need_s2, need_q0, need_q12 = need
    # fp32 inputs: full-precision products (TF32 would round the logits to ~1e-3).
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    # Triton's interpreter has no bf16 tl.dot (triton-lang/triton#11584): upcast there.
    # bf16 products are exact in fp32, so this computes the same thing.
    upcast = hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if upcast:
        precision = "ieee"
    linear_token_moments_kernel[(triton.cdiv(n_tokens, block_n), splits)](
        hidden,
        weight,
        bias if bias is not None else weight,
        targets if targets is not None else state,
        state,
        n_tokens,
        vocab,
        hidden_dim,
        split_size,
        *hidden.stride(),
        *weight.stride(),
        inv_temperature,
        ignore_index,
        HAS_BIAS=bias is not None,
        HAS_TARGETS=targets is not None,
        NEED_S1=need_s1,
        NEED_S2=need_s2,
        NEED_Q0=need_q0,
        NEED_Q12=need_q12,
        DOT_PRECISION=precision,
        UPCAST_OPERANDS=upcast,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps or 8,
        num_stages=num_stages,
    )
    return state, split_size
