"""The backward of ``token_stats`` outside autograd, in its two steps: the per-row
parameters from the forward's saved state and the upstream gradients
(``backward_params``), then one pass over the logits that writes their gradient
(``logits_backward``); ``logits_grad_from_state`` runs both. The autograd backwards
(``_autograd.py``, ``vocab_parallel.py``) run these; the training benchmarks
(``entropy_gpu.bench.train``) time the second step alone, from a state built once
(``saved_backward_params``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import as_rows
from .backend import token_stats_buffer, write_logits_grad
from .kernels.stat_layout import SAVED_LOG_S0, SAVED_ROW_MAX
from .moments import ENTROPY, STAT_NAMES, backward_row_params, target_masks


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


def backward_params(state: Tensor, targets: Tensor | None, vocab: int, ignore_index: int,
                    grad_entropy: Tensor | None, grad_logprob: Tensor | None) -> tuple[Tensor, Tensor]:
    """(params [5, rows], target columns [rows]) for ``logits_backward``, from the forward's
    ``state`` buffer (``token_stats_buffer(..., save_state=True)``) and the upstream gradients."""
    in_range = ignored = None
    target_cols = torch.full((state.shape[1],), -1, dtype=torch.long, device=state.device)
    if targets is not None:
        t, in_range, ignored = target_masks(targets, vocab, ignore_index)
        target_cols = torch.where(in_range, t, -1)
    params = backward_row_params(state[SAVED_ROW_MAX], state[SAVED_LOG_S0], state[ENTROPY], grad_logprob,
                                 grad_entropy, in_range, ignored)
    return params, target_cols


def logits_grad_from_state(logits: Tensor, targets: Tensor | None, state: Tensor, grad_entropy: Tensor | None,
                           grad_logprob: Tensor | None, *, inv_temperature: float, ignore_index: int,
                           backend: str, inplace: bool) -> Tensor:
    """The backward of ``token_stats`` in its two steps: ``backward_params`` from the forward's
    ``state`` and the upstream gradients, then ``logits_backward`` (a new tensor, or ``logits``
    overwritten when ``inplace``)."""
    params, target_cols = backward_params(state, targets, logits.shape[-1], ignore_index, grad_entropy,
                                          grad_logprob)
    return logits_backward(logits, params, target_cols, inv_temperature=inv_temperature, backend=backend,
                           inplace=inplace)


def saved_backward_params(logits: Tensor, targets: Tensor | None, grad_entropy: Tensor | None,
                          grad_logprob: Tensor | None, *, ignore_index: int = -100,
                          backend: str = "torch") -> tuple[Tensor, Tensor]:
    """``backward_params`` of ``logits`` [..., V] at temperature 1, as the forward would save
    them: its entropy and saved state computed here (flat ``targets`` and upstream gradients,
    one per row)."""
    want = tuple(name in ("entropy", "logprob") for name in STAT_NAMES)
    state = token_stats_buffer(logits, targets, inv_temperature=1.0, ignore_index=ignore_index, want=want,
                               backend=backend, save_state=True)
    return backward_params(state, targets, logits.shape[-1], ignore_index, grad_entropy, grad_logprob)
