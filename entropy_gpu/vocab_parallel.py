"""Vocabulary-parallel token statistics: logits sharded along V across a
``torch.distributed`` group (Megatron-style tensor parallel; rank r holds columns
``[vocab_start, vocab_start + V_local)``).

Forward: each rank summarises its shard as softmax moments (docs/numerics.md,
"Vocabulary-parallel") plus, on the rank that owns it, the target logit; one all-gather of that small state
([world, rows, 9] floats) lets every rank merge the parts with the same rule that
merges vocabulary splits, and finish the statistics of the full rows. Backward:
no communication; each rank writes the gradient of its own columns from the
merged row state.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._autograd import (
    autocast_off,
    check_inplace_logits,
    mark_non_differentiable,
    saved_tensors_once,
)
from ._rows import as_rows
from ._validation import check_logits, plan_call
from .backend import token_moments
from .backward import logits_backward
from .kernels.stat_layout import STATE_MOMENTS, STATE_TARGET_LOGIT, STATE_WIDTH
from .moments import (
    DIFFERENTIABLE,
    ENTROPY,
    LOGPROB,
    STAT_NAMES,
    SoftmaxMoments,
    backward_row_params,
    finalize,
    reduce_moments,
    target_masks,
)
from .stats import TokenStats

# The state each rank contributes per row: the kernels' partial-state layout (stat_layout), then
# whether this rank's shard holds the row's target.
STATE_OWNER = STATE_WIDTH
GATHERED_STATE_WIDTH = STATE_WIDTH + 1


def _all_gather_stacked(state: Tensor, world: int, group) -> Tensor:
    # Concatenated along dim 0 (the layout every backend accepts), then split per rank.
    shape = (world * state.shape[0],) + tuple(state.shape[1:])
    out = torch.empty(shape, dtype=state.dtype, device=state.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, state.contiguous(), group=group)
    return out.view((world,) + tuple(state.shape))


class VocabParallelTokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor | None, inv_t: float, ignore_index: int,
                want: tuple[bool, ...], backend: str, inplace: bool, group, vocab_start: int,
                check_range: bool):
        rows = as_rows(logits)
        outer, inner, vocab_local = rows.shape
        n_rows = outer * inner
        world = dist.get_world_size(group)
        excluded = torch.full((n_rows,), -1, dtype=torch.long, device=logits.device)
        ignored = owned = None
        if targets is not None:
            local, owned, ignored = target_masks(targets, vocab_local, ignore_index, vocab_start)
            excluded = torch.where(owned, local, -1)
        mom = token_moments(rows, excluded, inv_temperature=inv_t, want=want, backend=backend)
        state = torch.zeros((n_rows, GATHERED_STATE_WIDTH), dtype=mom.s0.dtype, device=logits.device)
        state[:, :STATE_MOMENTS] = torch.stack(tuple(mom), dim=1)
        if targets is not None:
            col = excluded.clamp(min=0)
            flat_row = torch.arange(n_rows, device=logits.device)
            outer_index = torch.div(flat_row, inner, rounding_mode="floor")
            target_logit = rows[outer_index, flat_row % inner, col].to(state.dtype)
            state[:, STATE_TARGET_LOGIT] = torch.where(owned, target_logit, 0.0)
            state[:, STATE_OWNER] = owned.to(state.dtype)
        parts = _all_gather_stacked(state, world, group)  # the one collective
        merged = reduce_moments(SoftmaxMoments(*parts[..., :STATE_MOMENTS].unbind(-1)), dim=0, inv_t=inv_t)
        in_range = target_logit = None
        if targets is not None:
            owners = parts[..., STATE_OWNER].sum(0)
            if check_range:
                bad = ~ignored & (owners != 1)
                if bool(bad.any()):  # the gathered state is identical on every rank: all raise
                    row = int(bad.nonzero()[0])
                    what = ("is in no rank's shard (outside the full vocabulary?)" if owners[row] == 0 else
                            f"is claimed by {int(owners[row])} ranks: the shards overlap; check vocab_start")
                    raise ValueError(f"targets (flat row {row}) = {int(targets.reshape(-1)[row])} {what}")
            in_range = ~ignored & (owners == 1)
            target_logit = parts[..., STATE_TARGET_LOGIT].sum(0)
        fields = finalize(merged, target_logit, in_range, ignored, inv_t, want)
        # Flat fields, each its own tensor (the caller views them as the leading shape): views
        # made in here would be views of a multi-output Function, which may not be edited in place.
        fields = [f if w else None for f, w in zip(fields, want)]
        mark_non_differentiable(ctx, fields)
        ctx.set_materialize_grads(False)
        local_cols = excluded if targets is None else torch.where(in_range, excluded, -1)
        # The backward reads its own copy of the entropy: the field may be edited in place.
        entropy = fields[ENTROPY].clone() if fields[ENTROPY] is not None else None
        ctx.save_for_backward(logits, local_cols, in_range, ignored, merged.max, torch.log(merged.s0),
                              entropy)
        ctx.config = (inv_t, backend, inplace)
        ctx.consumed = False
        return tuple(fields)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        grad_entropy, grad_logprob = grads[ENTROPY], grads[LOGPROB]
        nothing = (None,) * 9
        if grad_entropy is None and grad_logprob is None:
            return (None,) + nothing
        inv_t, backend, inplace = ctx.config
        saved = saved_tensors_once(ctx, "vocab_parallel_token_stats", inplace)
        logits, local_cols, in_range, ignored, row_max, log_s0, entropy = saved
        params = backward_row_params(row_max, log_s0, entropy, grad_logprob, grad_entropy, in_range, ignored)
        with autocast_off(logits.device):
            grad = logits_backward(logits, params, local_cols, inv_temperature=inv_t, backend=backend,
                                   inplace=inplace)
        return (grad,) + nothing


def vocab_parallel_token_stats(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    stats: str | Iterable[str] | None = None,
    backend: str = "auto",
    check_targets_range: bool = True,
    inplace_backward: bool = False,
) -> TokenStats:
    """``token_stats`` of logits sharded along the vocabulary across ``group``.

    Every rank of ``group`` calls this with its shard ``logits`` [..., V_local] (columns
    ``[vocab_start, vocab_start + V_local)`` of the full logits; the shards partition
    the vocabulary) and the same rows and ``targets`` (global token ids). Every rank
    gets the statistics of the full rows, equal to ``token_stats`` on the unsharded
    logits up to rounding.

    Args:
        logits: this rank's shard, float16/bfloat16/float32/float64, any strides.
        targets: integer tensor of shape ``logits.shape[:-1]``, global ids, or None.
        group: the tensor-parallel process group (None: the default group).
        vocab_start: first global column of this shard; None means equal shards,
            ``rank * V_local``.
        temperature, ignore_index, stats, backend, inplace_backward: as in ``token_stats``.
        check_targets_range: raise ``ValueError`` (on every rank) when a target is in
            no rank's shard, or in several (overlapping shards); one host sync. With
            False those rows get NaN in the target-dependent fields.

    Communication: one all-gather of ``[world, rows, 9]`` floats in the forward, none
    in the backward. The backward assumes the upstream gradients of ``entropy`` and
    ``logprob`` are the same on every rank (true when every rank computes the same
    loss from these replicated statistics, as in Megatron-style tensor parallelism).
    Works with any backend whose collectives support the tensors' device (gloo: CPU,
    NCCL: CUDA).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_token_stats needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    check_logits(logits)
    vocab_local = logits.shape[-1]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * vocab_local
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        raise ValueError(
            f"vocab_start must be an int >= 0 (this shard's first global column), got {vocab_start!r}"
        )
    # The target range is checked after the gather: no single rank knows the full vocabulary.
    plan = plan_call(device=logits.device, lead_shape=tuple(logits.shape[:-1]), vocab=vocab_local,
                     targets=targets, temperature=temperature, ignore_index=ignore_index, stats=stats,
                     backend=backend, check_targets_range=False)
    differentiable = any(w for n, w in zip(STAT_NAMES, plan.want) if n in DIFFERENTIABLE)
    inplace = bool(inplace_backward) and differentiable and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        check_inplace_logits(logits)
    with autocast_off(logits.device):  # autocast leaves these statistics alone (docs/numerics.md)
        fields = VocabParallelTokenStatsFunction.apply(
            logits, targets, plan.inv_temperature, int(ignore_index), plan.want, plan.backend, inplace, group,
            int(vocab_start), bool(check_targets_range))
    lead = logits.shape[:-1]
    return TokenStats(*(f.view(lead) if f is not None else None for f in fields))
