"""Autograd for the statistics of ``token_stats``: ``logprob`` and ``entropy`` are
differentiable w.r.t. the logits; every other field is marked non-differentiable
(``requires_grad=False``), so a loss built on it gets no silent wrong gradient.

The backward reads the logits once and writes the gradient once (both upstream
gradients combined in one pass). With ``inplace_backward`` the gradient is written
over the logits buffer; see ``check_inplace_logits`` for the contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._validation import as_rows
from .backend import token_stats_buffer, write_logits_grad
from .moments import DIFFERENTIABLE, ENTROPY, LOGPROB, STAT_NAMES, backward_row_params, target_masks

_DIFFERENTIABLE_FIELDS = frozenset(STAT_NAMES.index(n) for n in DIFFERENTIABLE)


def check_inplace_logits(logits: Tensor) -> None:
    """The in-place backward overwrites ``logits`` with its gradient. That is only sound
    when the logits are an intermediate of the graph (e.g. the LM-head output) whose
    values nothing else needs after this backward, and when every element has its own
    memory (the rows are a view, not a copy, and nothing is broadcast)."""
    if logits.grad_fn is None:
        raise ValueError("inplace_backward=True needs logits computed inside the autograd graph (e.g. the "
                         "LM head's output), not a leaf tensor: its gradient would overwrite the leaf itself")
    if any(stride == 0 and size > 1 for size, stride in zip(logits.shape, logits.stride())):
        raise ValueError("inplace_backward=True needs logits without broadcast (stride-0) dimensions: "
                         "several gradient entries would share one memory location; pass .contiguous()")
    rows = as_rows(logits)
    if rows.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
        raise ValueError("inplace_backward=True: these logits' strides need a copy to be read as rows, so "
                         "the gradient cannot be written in place; pass .contiguous() logits")


def mark_non_differentiable(ctx, fields: Sequence[Tensor | None]) -> None:
    """Every returned field but entropy and logprob gets requires_grad=False."""
    ctx.mark_non_differentiable(*(f for k, f in enumerate(fields)
                                  if f is not None and k not in _DIFFERENTIABLE_FIELDS))


def logits_backward(logits: Tensor, params: Tensor, target_cols: Tensor, *, inv_temperature: float,
                    backend: str, inplace: bool) -> Tensor:
    """The gradient w.r.t. ``logits`` [..., V] from per-row ``params`` and one-hot columns:
    a new tensor, or ``logits`` itself overwritten when ``inplace``."""
    rows = as_rows(logits)
    if inplace:
        grad, grad_rows = logits, rows
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(rows.shape)
    write_logits_grad(rows, grad_rows, params, target_cols, inv_temperature=inv_temperature, backend=backend)
    if inplace:
        # Anything else that saved these logits for its backward now fails loudly
        # ("modified by an inplace operation") instead of reading the gradient.
        torch.autograd.graph.increment_version(logits)
    return grad


def saved_tensors_once(ctx, api: str, inplace: bool) -> tuple:
    """``ctx.saved_tensors`` for a backward that may write the gradient over the logits
    (``ctx.consumed`` starts False): with ``inplace``, a second backward through the same
    call raises, since the logits buffer already holds the first gradient."""
    if inplace and ctx.consumed:
        raise RuntimeError(f"{api}(inplace_backward=True): the logits buffer already holds the gradient "
                           "of an earlier backward; a second backward (retain_graph=True) cannot run")
    ctx.consumed = inplace
    return ctx.saved_tensors


def backward_params(state: Tensor, targets: Tensor | None, vocab: int, ignore_index: int,
                    grad_entropy: Tensor | None, grad_logprob: Tensor | None) -> tuple[Tensor, Tensor]:
    """(params [5, rows], target columns [rows]) for ``logits_backward``, from the forward's
    ``state`` buffer (``token_stats_buffer(..., save_state=True)``) and the upstream gradients."""
    in_range = ignored = None
    target_cols = torch.full((state.shape[1],), -1, dtype=torch.long, device=state.device)
    if targets is not None:
        t, in_range, ignored = target_masks(targets, vocab, ignore_index)
        target_cols = torch.where(in_range, t, -1)
    params = backward_row_params(state[7], state[8], state[ENTROPY], grad_logprob, grad_entropy, in_range,
                                 ignored)
    return params, target_cols


class TokenStatsFunction(torch.autograd.Function):
    """token_stats with a backward for entropy and logprob (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor | None, inv_t: float, ignore_index: int,
                want: Sequence[bool], backend: str, inplace: bool):
        lead = logits.shape[:-1]
        rows = as_rows(logits)
        flat_targets = targets.reshape(-1).contiguous() if targets is not None else None
        out = token_stats_buffer(rows, flat_targets, inv_temperature=inv_t, ignore_index=ignore_index,
                                 want=want, backend=backend, save_state=True)
        fields = [out[k].view(lead) if w else None for k, w in enumerate(want)]
        mark_non_differentiable(ctx, fields)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, out)
        ctx.config = (inv_t, ignore_index, backend, inplace)
        ctx.consumed = False
        return tuple(fields)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        grad_entropy, grad_logprob = grads[ENTROPY], grads[LOGPROB]
        nothing = (None,) * 6
        if grad_entropy is None and grad_logprob is None:
            return (None,) + nothing
        inv_t, ignore_index, backend, inplace = ctx.config
        logits, targets, out = saved_tensors_once(ctx, "token_stats", inplace)
        params, target_cols = backward_params(out, targets, logits.shape[-1], ignore_index, grad_entropy,
                                              grad_logprob)
        grad = logits_backward(logits, params, target_cols, inv_temperature=inv_t, backend=backend,
                               inplace=inplace)
        return (grad,) + nothing
