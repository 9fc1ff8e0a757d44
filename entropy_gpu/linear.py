"""Fused LM head: token statistics from hidden states and the LM-head weight, without
ever holding the [N, V] logits.

Tokens and vocabulary are tiled; each logits tile is reduced to softmax moments at
once and merged with the moment-merge rule of docs/numerics.md, so the extra memory is a few tiles.
On GPU the forward is one Triton GEMM-fused kernel; elsewhere (and for float64) a
chunked torch loop. The backward (``logprob`` and ``entropy`` w.r.t. ``hidden``,
``weight`` and ``bias``) recomputes each tile, turns it into the logits gradient in
place and multiplies it out (two matmuls per tile), the same tiling as the forward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._autograd import autocast_off, upstream_grads
from ._rows import accumulation_dtype
from ._validation import check_lm_head, plan_call
from .backend import write_logits_grad
from .kernels.stat_layout import STATE_TARGET_LOGIT
from .moments import (
    DEFAULT_STATS,
    ENTROPY,
    LOGPROB,
    NLL_GRAD_NORM,
    STAT_NAMES,
    TARGET_STATS,
    SoftmaxMoments,
    accumulators_needed,
    backward_row_params,
    block_moments,
    finalize,
    merge_moments,
    reduce_moments,
    target_masks,
    unpack_moments,
)

LINEAR_STAT_NAMES = STAT_NAMES + ("hidden_norm", "lm_head_grad_norm")
LINEAR_TARGET_STATS = TARGET_STATS | {"lm_head_grad_norm"}
DEFAULT_LINEAR_STATS = DEFAULT_STATS

# Torch path tile: tokens x vocabulary columns, in the compute dtype. Four live at once
# (the tile and block_moments' three scratch buffers). CPU: 512 x 2048 (4 MiB fp32) was
# fastest of (64|128|256|512) x (1024..8192) at 512 x 512 x 32000 on 1 thread: 810 ms
# vs 1054 ms for 128 x 4096 (each weight chunk serves more tokens). CUDA (backward
# only; the forward is the Triton kernel): large tiles for cuBLAS.
CPU_TILE = (512, 2048)
CUDA_TILE_BYTES = 256 << 20
CUDA_TILE_VOCAB = 4096


class LinearTokenStats(NamedTuple):
    """``TokenStats`` fields of the logits ``hidden @ weight.T + bias``, plus the two
    LM-head quantities; a field not requested is ``None``. ``entropy`` and ``logprob``
    are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``."""

    logsumexp: Tensor | None = None
    entropy: Tensor | None = None
    logprob: Tensor | None = None
    sum_sq_probs: Tensor | None = None
    nll_grad_norm: Tensor | None = None
    varentropy: Tensor | None = None
    entropy_grad_norm: Tensor | None = None
    entropy_change: Tensor | None = None     #: grad_z H . grad_z log p_y (docs/numerics.md)
    hidden_norm: Tensor | None = None        #: ||h||_2
    lm_head_grad_norm: Tensor | None = None  #: ||d(-log p_y)/dW||_F = nll_grad_norm * ||h||_2


def tile_shape(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(tokens, vocabulary columns) of one tile on the torch path."""
    if device.type == "cuda":
        block_v = min(vocab, CUDA_TILE_VOCAB)
        itemsize = torch.finfo(dtype).bits // 8
        return max(1, min(n_tokens, CUDA_TILE_BYTES // (block_v * itemsize))), block_v
    return max(1, min(n_tokens, CPU_TILE[0])), min(vocab, CPU_TILE[1])


@functools.cache
def _cuda_mm_out_dtype() -> bool:
    """Whether torch.mm takes out_dtype (16-bit operands, fp32 output) on this CUDA build."""
    a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (or ``out += a @ b``) in ``out``'s dtype (fp32/fp64), for operands
    of any float dtype. Writing into ``out`` matters on CPU: a fresh tile-sized result
    per tile fragments the heap (measured ~10 tiles of resident memory instead of 4)."""
    dtype = out.dtype
    if a.dtype == dtype and b.dtype == dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.is_cuda and _cuda_mm_out_dtype():
        low = a.dtype if a.dtype != dtype else b.dtype
        result = torch.mm(a.to(low), b.to(low), out_dtype=dtype)  # tensor cores, fp32 accumulation and output
    else:
        result = a.to(dtype) @ b.to(dtype)
    return out.add_(result) if accumulate else out.copy_(result)


def _logits_tile(out: Tensor, h: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``out`` [rows, cols] = ``h @ w.T + bias`` in ``out``'s dtype."""
    _mm_into(out, h, w.t())
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def linear_moments_torch(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, excluded: Tensor | None, *,
    inv_temperature: float, need: tuple[bool, bool, bool, bool], tile: tuple[int, int],
) -> tuple[SoftmaxMoments, Tensor]:
    """Moments of every row of ``hidden @ weight.T + bias`` and each row's target logit
    (the column ``excluded`` [N], -1 for none, is left out of the q-sums), tile by tile."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    block_n, block_v = tile
    tile_buffer = torch.empty(block_n * block_v, device=hidden.device, dtype=dtype)
    workspace = torch.empty((3, block_n * block_v), device=hidden.device, dtype=dtype)
    parts, target_logits = [], []
    for n0 in range(0, n_tokens, block_n):
        h = hidden[n0:n0 + block_n]
        rows = h.shape[0]
        cols = excluded[n0:n0 + rows] if excluded is not None else None
        target_logit = torch.zeros(rows, device=hidden.device, dtype=dtype)
        state = None
        for v0 in range(0, vocab, block_v):
            w = weight[v0:v0 + block_v]
            z = _logits_tile(tile_buffer[: rows * w.shape[0]].view(rows, w.shape[0]), h, w,
                             None if bias is None else bias[v0:v0 + block_v])
            local = None
            if cols is not None:
                inside = (cols >= v0) & (cols < v0 + z.shape[1])
                local = torch.where(inside, cols - v0, -1)
                picked = z.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            mom = block_moments(z, inv_temperature, local, need, dtype, workspace)
            state = mom if state is None else merge_moments(state, mom, inv_temperature)
        parts.append(state)
        target_logits.append(target_logit)
    return SoftmaxMoments(*(torch.cat(x) for x in zip(*parts))), torch.cat(target_logits)


def linear_moments_triton(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, excluded: Tensor | None, *,
    inv_temperature: float, need: tuple[bool, bool, bool, bool],
) -> tuple[SoftmaxMoments, Tensor]:
    from .kernels.linear_token_stats import launch_linear_token_moments

    state, split_size = launch_linear_token_moments(
        hidden, weight, bias, excluded, inv_temperature=inv_temperature, ignore_index=-1, need=need)
    mom = reduce_moments(unpack_moments(state), dim=1, inv_t=inv_temperature)
    if excluded is None:
        return mom, torch.zeros_like(mom.s0)
    split = (excluded.clamp(min=0) // split_size).unsqueeze(1)
    return mom, state[..., STATE_TARGET_LOGIT].gather(1, split).squeeze(1)


def linear_grads(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, params: Tensor, target_cols: Tensor, *,
    inv_temperature: float, backend: str, tile: tuple[int, int], needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. (hidden, weight, bias) of ``sum a logprob + b entropy``; each logits
    tile is recomputed, turned into its gradient in place, and multiplied out."""
    need_hidden, need_weight, need_bias = needs
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    block_n, block_v = tile
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=dtype) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias else None
    tile_buffer = torch.empty(block_n * block_v, device=hidden.device, dtype=dtype)
    for v0 in range(0, vocab, block_v):
        w = weight[v0:v0 + block_v]
        b = None if bias is None else bias[v0:v0 + block_v]
        cols = w.shape[0]
        inside = (target_cols >= v0) & (target_cols < v0 + cols)
        local_cols = torch.where(inside, target_cols - v0, -1)
        grad_w = None
        if need_weight:
            grad_w = torch.zeros((cols, hidden.shape[1]), device=hidden.device, dtype=dtype)
        grad_b = torch.zeros(cols, device=hidden.device, dtype=dtype) if need_bias else None
        for n0 in range(0, n_tokens, block_n):
            h = hidden[n0:n0 + block_n]
            sl = slice(n0, n0 + h.shape[0])
            z = _logits_tile(tile_buffer[: h.shape[0] * cols].view(h.shape[0], cols), h, w, b)
            rows = z.unsqueeze(0)
            write_logits_grad(rows, rows, params[:, sl].contiguous(), local_cols[sl].contiguous(),
                              inv_temperature=inv_temperature, backend=backend)
            if need_hidden:
                _mm_into(grad_hidden[sl], z, w, accumulate=True)
            if need_weight:
                _mm_into(grad_w, z.t(), h, accumulate=True)
            if need_bias:
                grad_b += z.sum(0)
        if need_weight:
            grad_weight[v0:v0 + cols] = grad_w
        if need_bias:
            grad_bias[v0:v0 + cols] = grad_b
    return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight, grad_bias


def linear_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None, *, inv_temperature: float,
    ignore_index: int, want: Sequence[bool], backend: str, tile: tuple[int, int],
) -> tuple[list[Tensor | None], Tensor]:
    """(fields in ``LINEAR_STAT_NAMES`` order, None where not wanted; the [3, N] state
    ``row max, log s0, entropy`` the backward reads) for ``hidden`` [N, H]."""
    n_stats = len(STAT_NAMES)
    want_hidden_norm, want_lm_head = want[n_stats], want[n_stats + 1]
    want_logits = list(want[:n_stats])
    if want_lm_head:  # lm_head_grad_norm = nll_grad_norm * ||h||
        want_logits[NLL_GRAD_NORM] = True
    need = accumulators_needed(want_logits)
    vocab = weight.shape[0]
    in_range = ignored = excluded = None
    if targets is not None:
        t, in_range, ignored = target_masks(targets, vocab, ignore_index)
        excluded = torch.where(in_range, t, -1)
    if backend == "triton":
        mom, target_logit = linear_moments_triton(hidden, weight, bias, excluded,
                                                   inv_temperature=inv_temperature, need=need)
    else:
        mom, target_logit = linear_moments_torch(hidden, weight, bias, excluded,
                                                 inv_temperature=inv_temperature, need=need, tile=tile)
    stats = finalize(mom, target_logit if targets is not None else None, in_range, ignored, inv_temperature,
                     want_logits)
    hidden_norm = None
    if want_hidden_norm or want_lm_head:
        hidden_norm = torch.linalg.vector_norm(hidden, dim=-1, dtype=mom.s0.dtype)
    fields = [stats[k] if want[k] else None for k in range(n_stats)]
    fields.append(hidden_norm if want_hidden_norm else None)
    fields.append(stats[NLL_GRAD_NORM] * hidden_norm if want_lm_head else None)
    entropy = fields[ENTROPY] if fields[ENTROPY] is not None else torch.zeros_like(mom.s0)
    # A copy of the entropy: the returned field may be edited in place before the backward.
    state = torch.stack([mom.max, torch.log(mom.s0), entropy])
    return fields, state


def linear_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None, state: Tensor,
    grad_entropy: Tensor | None, grad_logprob: Tensor | None, *, inv_temperature: float, ignore_index: int,
    backend: str, tile: tuple[int, int], needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. (hidden, weight, bias) of ``sum(grad_entropy * entropy + grad_logprob
    * logprob)`` from the forward's ``state``; None where ``needs`` says no."""
    in_range = ignored = None
    target_cols = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
    if targets is not None:
        t, in_range, ignored = target_masks(targets, weight.shape[0], ignore_index)
        target_cols = torch.where(in_range, t, -1)
    row_max, log_s0, entropy = state
    params = backward_row_params(row_max, log_s0, entropy, grad_logprob, grad_entropy, in_range, ignored)
    return linear_grads(hidden, weight, bias, params, target_cols, inv_temperature=inv_temperature,
                        backend=backend, tile=tile, needs=needs)


# The fused LM head as torch.library custom ops (see _autograd.py for why custom ops).


@torch.library.custom_op(
    "entropy_gpu::linear_token_stats", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor? targets, float inv_temperature, "
           "int ignore_index, bool[] want, str backend, int[] tile) -> Tensor[]")
def linear_token_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None,
                          inv_temperature: float, ignore_index: int, want: list[bool], backend: str,
                          tile: list[int]) -> list[Tensor]:
    """The requested fields of ``hidden`` [N, H] (each its own [N] tensor, ``LINEAR_STAT_NAMES``
    order), then the [3, N] backward state."""
    with autocast_off(hidden.device):
        fields, state = linear_forward(hidden, weight, bias, targets, inv_temperature=inv_temperature,
                                       ignore_index=ignore_index, want=want, backend=backend,
                                       tile=tuple(tile))
    return [f for f in fields if f is not None] + [state]


@linear_token_stats_op.register_fake
def _linear_token_stats_fake(hidden, weight, bias, targets, inv_temperature, ignore_index, want, backend,
                             tile):
    dtype = accumulation_dtype(hidden.dtype)
    n_tokens = hidden.shape[0]
    return [hidden.new_empty((n_tokens,), dtype=dtype) for w in want if w] + [
        hidden.new_empty((3, n_tokens), dtype=dtype)]


@torch.library.custom_op(
    "entropy_gpu::linear_token_stats_backward", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor? targets, Tensor state, "
           "Tensor? grad_entropy, Tensor? grad_logprob, float inv_temperature, int ignore_index, "
           "str backend, int[] tile, bool[] needs) -> Tensor[]")
def linear_token_stats_backward_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None, state: Tensor,
    grad_entropy: Tensor | None, grad_logprob: Tensor | None, inv_temperature: float, ignore_index: int,
    backend: str, tile: list[int], needs: list[bool],
) -> list[Tensor]:
    """The gradients w.r.t. (hidden, weight, bias) that ``needs`` asks for, in that order."""
    with autocast_off(hidden.device):
        grads = linear_backward(hidden, weight, bias, targets, state, grad_entropy, grad_logprob,
                                inv_temperature=inv_temperature, ignore_index=ignore_index, backend=backend,
                                tile=tuple(tile), needs=tuple(needs))
    return [g for g in grads if g is not None]


@linear_token_stats_backward_op.register_fake
def _linear_token_stats_backward_fake(hidden, weight, bias, targets, state, grad_entropy, grad_logprob,
                                      inv_temperature, ignore_index, backend, tile, needs):
    return [torch.empty_like(x) for x, need in zip((hidden, weight, bias), needs) if need]


def _linear_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, inv_t, ignore_index, want, backend, tile = inputs
    wanted = [k for k, w in enumerate(want) if w]
    ctx.position = {k: i for i, k in enumerate(wanted)}
    ctx.mark_non_differentiable(*(output[i] for i, k in enumerate(wanted) if k not in (ENTROPY, LOGPROB)),
                                output[-1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, output[-1])
    ctx.config = (inv_t, ignore_index, backend, tile)


def _linear_backward(ctx, grads):
    grad_entropy, grad_logprob = upstream_grads(ctx.position, grads)
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    nothing = (None,) * 6
    if (grad_entropy is None and grad_logprob is None) or not any(needs):
        return (None, None, None) + nothing
    hidden, weight, bias, targets, state = ctx.saved_tensors
    needs[2] = needs[2] and bias is not None
    inv_t, ignore_index, backend, tile = ctx.config
    computed = iter(linear_token_stats_backward_op(hidden, weight, bias, targets, state, grad_entropy,
                                                   grad_logprob, inv_t, ignore_index, backend, tile, needs))
    return tuple(next(computed) if n else None for n in needs) + nothing


linear_token_stats_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def autocast_lm_head(hidden: Tensor, weight: Tensor,
                     bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inside ``torch.autocast`` for the tensors' device, the LM head's inputs are cast to
    the autocast dtype, as ``nn.Linear`` would cast them (float16/bfloat16/float32
    tensors only; float64 is left alone). Gradients flow back through the casts, so an
    fp32 ``weight`` still gets an fp32 gradient. Outside autocast: unchanged."""
    if not isinstance(hidden, Tensor) or hidden.device.type not in ("cpu", "cuda"):
        return hidden, weight, bias
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(x):
        eligible = (isinstance(x, Tensor) and x.device.type == device_type
                    and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
        return x.to(dtype) if eligible else x

    return cast(hidden), cast(weight), cast(bias)


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    stats: str | Iterable[str] | None = None,
    backend: str = "auto",
    check_targets_range: bool = True,
    tile: tuple[int, int] | None = None,
) -> LinearTokenStats:
    """Token statistics of the logits ``hidden @ weight.T + bias`` without materializing them.

    Args:
        hidden: [..., H] hidden states (the LM head's input), fp16/bf16/fp32/fp64.
        weight: [V, H] LM-head weight (``nn.Linear.weight``), same dtype and device.
        targets: integer tensor of shape ``hidden.shape[:-1]`` (sampled or label
            tokens) or None; needed for ``logprob``, ``nll_grad_norm``,
            ``entropy_change`` and ``lm_head_grad_norm``.
        bias: [V] or None.
        temperature, ignore_index, check_targets_range: as in ``token_stats``.
        stats: names from ``LINEAR_STAT_NAMES`` (``STAT_NAMES`` plus ``hidden_norm``
            and ``lm_head_grad_norm``), ``"all"``, or None for ``logsumexp, entropy``
            plus ``logprob, nll_grad_norm`` when targets are given.
        backend: ``"auto"`` (the Triton GEMM-fused kernel for CUDA tensors, the chunked
            torch loop elsewhere and for float64), ``"triton"`` or ``"torch"``.
        tile: (tokens, vocabulary columns) per tile on the torch path (forward on the
            torch backend, backward on both); None picks a device default. Extra
            memory is about four tiles in fp32 plus, for the backward, fp32
            accumulators of shape [N, H] and [tile columns, H].

    Returns:
        ``LinearTokenStats``: float32 fields (float64 for float64 inputs) of shape
        ``hidden.shape[:-1]``. The logits are computed with fp32 accumulation and never
        rounded to the input dtype (so for 16-bit inputs the numbers are slightly more
        accurate than ``token_stats(hidden @ weight.T)``). Each field is its own tensor.
        Under ``torch.autocast`` the inputs are first cast to the autocast dtype, as
        ``nn.Linear``'s would be (docs/numerics.md, "Behaving like a torch op").

    Autograd: ``entropy`` and ``logprob`` are differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias``; other fields come back with ``requires_grad=False``.

    Example:
        >>> import torch, entropy_gpu
        >>> hidden, weight = torch.randn(6, 64), torch.randn(1000, 64)
        >>> out = entropy_gpu.linear_token_stats(hidden, weight, torch.randint(0, 1000, (6,)),
        ...                                      stats=("entropy", "logprob", "lm_head_grad_norm"))
        >>> out.entropy.shape
        torch.Size([6])
    """
    hidden, weight, bias = autocast_lm_head(hidden, weight, bias)
    check_lm_head(hidden, weight, bias)
    vocab, hidden_dim = weight.shape
    lead = hidden.shape[:-1]
    plan = plan_call(device=hidden.device, lead_shape=tuple(lead), vocab=vocab, targets=targets,
                     temperature=temperature, ignore_index=ignore_index, stats=stats, backend=backend,
                     check_targets_range=check_targets_range, names=LINEAR_STAT_NAMES,
                     defaults=DEFAULT_LINEAR_STATS, target_names=LINEAR_TARGET_STATS, what="hidden")
    want, name = plan.want, plan.backend
    if name == "triton" and hidden.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("the Triton fused LM head supports float16/bfloat16/float32; "
                             "use backend='torch' for float64")
        name = "torch"
    if tile is not None and (len(tile) != 2 or any(int(x) < 1 for x in tile)):
        raise ValueError(f"tile must be (tokens, vocabulary columns), both >= 1, got {tile}")
    hidden2d = hidden.reshape(-1, hidden_dim)
    n_tokens = hidden2d.shape[0]
    tile = tuple(int(x) for x in tile) if tile is not None else tile_shape(
        n_tokens, vocab, accumulation_dtype(hidden.dtype), hidden.device)
    flat_targets = targets.reshape(-1) if targets is not None else None
    if n_tokens == 0:
        empty = torch.empty(lead, device=hidden.device, dtype=accumulation_dtype(hidden.dtype))
        return LinearTokenStats(*(empty if w else None for w in want))
    outputs = iter(linear_token_stats_op(hidden2d, weight, bias, flat_targets, plan.inv_temperature,
                                         int(ignore_index), list(want), name, list(tile)))
    return LinearTokenStats(*(next(outputs).view(lead) if w else None for w in want))
