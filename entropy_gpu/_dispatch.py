"""Backend dispatch for the row kernels: forward statistics, partial moments and the
logits gradient, each on Triton or on the torch twin. Inputs are validated by the
caller (the public API)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._torch_backend import rows_per_block, token_stats_backward_torch, token_stats_torch
from .moments import SoftmaxMoments, accumulators_needed, block_moments, reduce_moments, unpack_moments

N_OUTPUTS = 7      # STAT_NAMES
N_WITH_STATE = 9   # + row maximum, log s0 (saved for backward)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_stats_buffer(
    rows: Tensor, flat_targets: Tensor | None, *, inv_temperature: float, ignore_index: int,
    want: Sequence[bool], backend: str, save_state: bool = False,
) -> Tensor:
    """[7 or 9, rows] buffer of statistics (``STAT_NAMES`` order, then the saved state)."""
    outer, inner, _ = rows.shape
    out = torch.empty((N_WITH_STATE if save_state else N_OUTPUTS, outer * inner), device=rows.device,
                      dtype=accumulation_dtype(rows.dtype))
    if outer * inner:
        kwargs = dict(inv_temperature=inv_temperature, ignore_index=ignore_index, want=want, save_state=save_state)
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
    outer, inner, vocab = rows.shape
    dtype = accumulation_dtype(rows.dtype)
    if backend == "triton":
        from .kernels.token_stats import launch_token_moments

        state = launch_token_moments(rows, excluded.contiguous(), inv_temperature=inv_temperature, want=want)
        return reduce_moments(unpack_moments(state), dim=1, inv_t=inv_temperature)
    need = accumulators_needed(want)
    step = max(1, min(inner, rows_per_block(vocab, dtype)))
    workspace = torch.empty((3, step * vocab), device=rows.device, dtype=dtype)
    parts = []
    for o in range(outer):
        for start in range(0, inner, step):
            first = o * inner + start
            block = rows[o, start:start + step]
            parts.append(block_moments(block, inv_temperature, excluded[first:first + block.shape[0]], need, dtype,
                                       workspace))
    if not parts:
        empty = torch.empty(0, device=rows.device, dtype=dtype)
        return SoftmaxMoments(*(empty,) * 7)
    return SoftmaxMoments(*(torch.cat(x) for x in zip(*parts)))


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
