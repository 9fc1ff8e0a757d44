"""The ``token_stats`` custom ops (``torch.ops.entropy_gpu.token_stats`` and its backward)
and their autograd: ``logprob`` and ``entropy`` are differentiable w.r.t. the logits;
every other field is marked non-differentiable (``requires_grad=False``), so a loss
built on it gets no silent wrong gradient. Every field is its own tensor (editable in
place), and the ops trace under ``torch.compile(fullgraph=True)``.

The backward reads the logits once and writes the gradient once (both upstream
gradients combined in one pass). With ``inplace_backward`` the gradient is written
over the logits buffer; see ``check_inplace_logits`` for the contract.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._rows import accumulation_dtype, as_rows
from .backend import token_stats_buffer
from .backward import logits_grad_from_state
from .kernels.stat_layout import ROWS_WITH_SAVED_STATE
from .moments import DIFFERENTIABLE, ENTROPY, LOGPROB, STAT_NAMES

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


def saved_tensors_once(ctx, api: str, inplace: bool) -> tuple:
    """``ctx.saved_tensors`` for a backward that may write the gradient over the logits
    (``ctx.consumed`` starts False): with ``inplace``, a second backward through the same
    call raises, since the logits buffer already holds the first gradient."""
    if inplace and ctx.consumed:
        raise RuntimeError(f"{api}(inplace_backward=True): the logits buffer already holds the gradient "
                           "of an earlier backward; a second backward (retain_graph=True) cannot run")
    ctx.consumed = inplace
    return ctx.saved_tensors


def autocast_off(device: torch.device):
    """A context in which autocast is off for ``device``: the statistics and the LM-head
    matmuls inside the ops choose their own precision (docs/numerics.md, "Behaving like a torch op")."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# The token_stats op. A torch.library custom op (not a bare autograd.Function) so that
# torch.compile(fullgraph=True) traces a loss that calls it: the fake implementation gives
# the output shapes, register_autograd the backward. The op is opaque to the compiler on
# both backends; the Triton launchers pick blocks on the host, and the kernels would gain
# nothing from being visible to Inductor (they read the logits once and write N floats).


# Schemas spelled out: this module uses string annotations (from __future__), which
# older torch releases cannot infer a schema from.
@torch.library.custom_op(
    "entropy_gpu::token_stats", mutates_args=(),
    schema="(Tensor logits, Tensor? targets, float inv_temperature, int ignore_index, bool[] want, "
           "str backend, bool save_state, bool inplace_backward) -> Tensor[]")
def token_stats_op(logits: Tensor, targets: Tensor | None, inv_temperature: float, ignore_index: int,
                   want: list[bool], backend: str, save_state: bool, inplace_backward: bool) -> list[Tensor]:
    """The requested fields (``STAT_NAMES`` order, each its own tensor of shape
    ``logits.shape[:-1]``), then, when ``save_state``, the [9, rows] buffer the backward
    reads. ``inplace_backward`` only matters to the backward."""
    lead = logits.shape[:-1]
    with autocast_off(logits.device):
        out = token_stats_buffer(logits, targets, inv_temperature=inv_temperature, ignore_index=ignore_index,
                                 want=want, backend=backend, save_state=save_state)
    # Copies of N floats, not views of one buffer: each field can be edited in place
    # without touching the others or the state the backward reads.
    fields = [out[k].view(lead).clone() for k, w in enumerate(want) if w]
    if not save_state:
        return fields
    for k, w in enumerate(want):
        if not w:
            out[k].zero_()  # rows of statistics not computed: defined values in the state output
    return fields + [out]


@token_stats_op.register_fake
def _token_stats_fake(logits, targets, inv_temperature, ignore_index, want, backend, save_state,
                      inplace_backward):
    lead = logits.shape[:-1]
    dtype = accumulation_dtype(logits.dtype)
    fields = [logits.new_empty(lead, dtype=dtype) for w in want if w]
    if save_state:
        fields.append(logits.new_empty((ROWS_WITH_SAVED_STATE, math.prod(lead)), dtype=dtype))
    return fields


@torch.library.custom_op(
    "entropy_gpu::token_stats_backward", mutates_args=(),
    schema="(Tensor logits, Tensor? targets, Tensor state, Tensor? grad_entropy, Tensor? grad_logprob, "
           "float inv_temperature, int ignore_index, str backend) -> Tensor")
def token_stats_backward_op(logits: Tensor, targets: Tensor | None, state: Tensor,
                            grad_entropy: Tensor | None, grad_logprob: Tensor | None,
                            inv_temperature: float, ignore_index: int, backend: str) -> Tensor:
    """The gradient w.r.t. ``logits`` of ``sum(grad_entropy * entropy + grad_logprob * logprob)``."""
    with autocast_off(logits.device):
        return logits_grad_from_state(logits, targets, state, grad_entropy, grad_logprob,
                                      inv_temperature=inv_temperature, ignore_index=ignore_index,
                                      backend=backend, inplace=False)


@token_stats_backward_op.register_fake
def _token_stats_backward_fake(logits, targets, state, grad_entropy, grad_logprob, inv_temperature,
                               ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def upstream_grads(position: dict[int, int], grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """(entropy's, logprob's) upstream gradient among an op's output ``grads``; ``position``
    maps a statistic's index to its output index (absent: not an output)."""
    return tuple(grads[position[k]] if k in position else None for k in (ENTROPY, LOGPROB))


def _token_stats_setup_context(ctx, inputs, output) -> None:
    logits, targets, inv_t, ignore_index, want, backend, save_state, inplace = inputs
    wanted = [k for k, w in enumerate(want) if w]
    # statistic index -> output index; without a saved state nothing is differentiable
    ctx.position = {k: i for i, k in enumerate(wanted)} if save_state else {}
    ctx.mark_non_differentiable(*(output[i] for i, k in enumerate(wanted)
                                  if k not in _DIFFERENTIABLE_FIELDS or not save_state),
                                *output[len(wanted):])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, output[-1] if save_state else None)
    ctx.config = (inv_t, ignore_index, backend, inplace)
    ctx.consumed = False


def _token_stats_backward(ctx, grads):
    grad_entropy, grad_logprob = upstream_grads(ctx.position, grads)
    nothing = (None,) * 7
    if grad_entropy is None and grad_logprob is None:
        return (None,) + nothing
    inv_t, ignore_index, backend, inplace = ctx.config
    logits, targets, state = saved_tensors_once(ctx, "token_stats", inplace)
    if not inplace:
        grad = token_stats_backward_op(logits, targets, state, grad_entropy, grad_logprob, inv_t,
                                       ignore_index, backend)
        return (grad,) + nothing
    # In place (eager only: run_token_stats turns it off under torch.compile).
    with autocast_off(logits.device):
        grad = logits_grad_from_state(logits, targets, state, grad_entropy, grad_logprob,
                                      inv_temperature=inv_t, ignore_index=ignore_index, backend=backend,
                                      inplace=True)
    return (grad,) + nothing


token_stats_op.register_autograd(_token_stats_backward, setup_context=_token_stats_setup_context)
