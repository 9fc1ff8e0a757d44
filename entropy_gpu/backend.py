"""Backend selection and dispatch: Triton kernels on GPU, plain PyTorch elsewhere.

``backend="auto"`` picks ``"triton"`` for CUDA tensors when Triton imports, else
``"torch"``. The environment variable ``ENTROPY_GPU_BACKEND`` (``triton`` or
``torch``) overrides ``"auto"``; an explicit ``backend=`` argument always wins.
On CPU tensors the Triton kernels run only under ``TRITON_INTERPRET=1`` (slow;
meant for tests).

``token_stats_buffer``, ``token_moments`` and ``write_logits_grad`` (internal) run one
row operation on the chosen backend: a Triton kernel or its twin in ``_torch_backend``.
Inputs are validated by the caller (the public API).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ._rows import accumulation_dtype, as_rows
from ._torch_backend import token_moments_torch, token_stats_backward_torch, token_stats_torch
from .kernels.stat_layout import ROWS_WITH_SAVED_STATE
from .moments import STAT_NAMES, SoftmaxMoments, reduce_moments, unpack_moments

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "ENTROPY_GPU_BACKEND"


# Looked up once at import (finding the spec does not import Triton). A plain constant,
# not functools.cache: torch.compile traces resolve_backend, and Dynamo warns on caches.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on()


def resolve_backend(device: torch.device | torch.Tensor | str = "cpu", backend: str = "auto") -> str:
    """Return the backend (``"triton"`` or ``"torch"``) a call would use for ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when ``"triton"``
    is asked for where it cannot run.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env:
            if env not in ("triton", "torch"):
                raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {env!r}")
            backend = env
        else:
            backend = "triton" if device.type == "cuda" and triton_supports(device) else "torch"
    if backend == "triton" and not triton_supports(device):
        why = ("Triton is not installed" if not triton_importable() else
               f"tensors on {device.type!r} need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors")
        raise RuntimeError(f"the Triton backend cannot run here: {why}; use backend='torch'")
    return backend


def token_stats_buffer(
    logits: Tensor, targets: Tensor | None, *, inv_temperature: float, ignore_index: int,
    want: Sequence[bool], backend: str, save_state: bool = False,
) -> Tensor:
    """[len(STAT_NAMES) or ROWS_WITH_SAVED_STATE, rows] buffer of statistics (``STAT_NAMES``
    order, then the saved state: ``stat_layout.SAVED_ROW_MAX``, ``SAVED_LOG_S0``) of the rows
    of ``logits`` [..., V] (``as_rows``), ``targets`` of its leading shape (or flat) or None."""
    rows = as_rows(logits)
    flat_targets = targets.reshape(-1).contiguous() if targets is not None else None
    outer, inner, _ = rows.shape
    n_out = ROWS_WITH_SAVED_STATE if save_state else len(STAT_NAMES)
    out = torch.empty((n_out, outer * inner), device=rows.device, dtype=accumulation_dtype(rows.dtype))
    if outer * inner:
        kwargs = dict(inv_temperature=inv_temperature, ignore_index=ignore_index, want=want,
                      save_state=save_state)
        if backend == "triton":
            from .kernels.token_stats import launch_token_stats

            launch_token_stats(rows, flat_targets, out, **kwargs)
        else:
            token_stats_torch(rows, flat_targets, out, **kwargs)
    return out


def token_moments(rows: Tensor, excluded: Tensor, *, inv_temperature: float, want: Sequence[bool],
                  backend: str) -> SoftmaxMoments:
    """Moments of every row of ``rows`` [outer, inner, V] (a vocabulary shard), target
    column ``excluded`` [rows] (-1 for none) left out of the q-sums."""
    if backend == "triton":
        from .kernels.token_stats import launch_token_moments

        state = launch_token_moments(rows, excluded.contiguous(), inv_temperature=inv_temperature, want=want)
        return reduce_moments(unpack_moments(state), dim=1, inv_t=inv_temperature)
    return token_moments_torch(rows, excluded, inv_temperature=inv_temperature, want=want)


def segment_comoments_state_triton(x: Tensor, y: Tensor, weight: Tensor | None, offsets: Tensor,
                                   max_length: int | None, dtype: torch.dtype) -> Tensor:
    """[segments, STATE_WIDTH] co-moment state of the segments of 1-D ``x, y`` from the Triton
    kernel, in ``dtype`` (the torch twin and the reading of this state: ``correlation/``)."""
    from .kernels.segment_comoments import STATE_WIDTH, launch_segment_comoments

    state = torch.empty((offsets.numel() - 1, STATE_WIDTH), device=x.device, dtype=dtype)
    launch_segment_comoments(x.contiguous(), y.contiguous(),
                             None if weight is None else weight.to(dtype).contiguous(),
                             offsets.contiguous(), state, max_length=max_length)
    return state


def write_logits_grad(rows: Tensor, grad_rows: Tensor, params: Tensor, target_cols: Tensor, *,
                      inv_temperature: float, backend: str) -> None:
    """Gradient of ``a logprob + b entropy`` for every row of ``rows`` into ``grad_rows``
    (both [outer, inner, V]; may be the same memory)."""
    if backend == "triton":
        from .kernels.token_stats_backward import launch_token_stats_backward

        launch_token_stats_backward(rows, grad_rows, params.contiguous(), target_cols.contiguous(),
                                    inv_temperature=inv_temperature)
    else:
        token_stats_backward_torch(rows, grad_rows, params, target_cols, inv_temperature=inv_temperature)
