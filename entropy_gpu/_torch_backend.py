"""The torch backend: the pure-PyTorch twin of every row kernel, one pass over blocks
of rows, any device. ``backend.py`` dispatches here or to the Triton kernels.

Each block of rows is copied once into the compute dtype and reduced to its
moments while it is still in cache; extra memory is a few blocks (never an fp32
copy of all logits). ``BLOCK_BYTES`` bounds one working block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._row_blocks import for_each_block
from ._rows import accumulation_dtype
from .kernels.stat_layout import SAVED_LOG_S0, SAVED_ROW_MAX, STATE_MOMENTS
from .moments import (
    BACKWARD_PARAMS,
    SoftmaxMoments,
    accumulators_needed,
    block_moments,
    finalize,
    logits_grad,
    target_masks,
)

# One working block in the compute dtype; three live at once (centred logits, exp,
# exp * d). 2 MiB measured fastest at 2048 x 32000 fp32 on a 2-core AMD EPYC
# (0.25 / 0.5 / 1 / 2 / 4 MiB: 1.3x / 2.1x / 3.4x / 4.3x / 3.6x eager).
BLOCK_BYTES = 2 << 20


def rows_per_block(vocab: int, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> int:
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, block_bytes // (vocab * itemsize))


def _row_blocks(outer: int, inner: int, step: int) -> list[tuple[int, int, int]]:
    """(o, start, stop) of every block of at most ``step`` rows, in row order."""
    return [(o, start, min(start + step, inner)) for o in range(outer) for start in range(0, inner, step)]


class _Workspaces:
    """One block-sized scratch buffer per worker of ``for_each_block``, made on first use."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.buffers: dict[int, Tensor] = {}

    def __getitem__(self, worker: int) -> Tensor:
        if worker not in self.buffers:  # each worker touches only its own key
            self.buffers[worker] = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        return self.buffers[worker]


def token_stats_torch(
    rows: Tensor,
    targets: Tensor | None,
    out: Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    want: Sequence[bool],
    save_state: bool = False,
    block_bytes: int = BLOCK_BYTES,
) -> None:
    """Same contract as ``entropy_gpu.kernels.token_stats.launch_token_stats``.

    The blocks only reduce logits to moments (and gather the target logits); the per-row
    statistics are finalised once for all rows afterwards: a block runs a dozen large ops
    and no tiny ones (fewer Python round trips per block, which worker threads share)."""
    outer, inner, vocab = rows.shape
    need = accumulators_needed(want)
    step = max(1, min(inner, rows_per_block(vocab, out.dtype, block_bytes)))
    blocks = _row_blocks(outer, inner, step)
    workspaces = _Workspaces((3, step * vocab), rows.device, out.dtype)
    n_rows = outer * inner
    # a block's rows are contiguous in it
    moments = torch.empty((n_rows, STATE_MOMENTS), device=rows.device, dtype=out.dtype)
    if targets is None:
        excluded = target_logit = in_range = ignored = col = None
    else:
        t, in_range, ignored = target_masks(targets, vocab, ignore_index)
        col = torch.where(in_range, t, 0).unsqueeze(1)
        excluded = torch.where(in_range, t, -1)
        target_logit = torch.empty(n_rows, device=rows.device, dtype=out.dtype)

    def run_block(index: int, worker: int) -> None:
        o, start, stop = blocks[index]
        block = rows[o, start:stop]
        sl = slice(o * inner + start, o * inner + stop)
        block_excluded = None if excluded is None else excluded[sl]
        mom = block_moments(block, inv_temperature, block_excluded, need, out.dtype, workspaces[worker])
        torch.stack(mom, dim=1, out=moments[sl])
        if target_logit is not None:
            target_logit[sl] = block.gather(1, col[sl]).squeeze(1)

    for_each_block(rows.device, len(blocks), run_block)
    if not blocks:
        return
    mom = SoftmaxMoments(*moments.unbind(1))
    stats = finalize(mom, target_logit, in_range, ignored, inv_temperature, want)
    for k, value in enumerate(stats):
        if value is not None:
            out[k] = value
    if save_state:
        out[SAVED_ROW_MAX] = mom.max
        out[SAVED_LOG_S0] = torch.log(mom.s0)


def token_moments_torch(rows: Tensor, excluded: Tensor, *, inv_temperature: float, want: Sequence[bool],
                        block_bytes: int = BLOCK_BYTES) -> SoftmaxMoments:
    """Same contract as ``backend.token_moments``: the moments of every row of ``rows``
    [outer, inner, V], column ``excluded`` [rows] (-1 for none) left out of the q-sums."""
    outer, inner, vocab = rows.shape
    dtype = accumulation_dtype(rows.dtype)
    need = accumulators_needed(want)
    step = max(1, min(inner, rows_per_block(vocab, dtype, block_bytes)))
    blocks = _row_blocks(outer, inner, step)
    if not blocks:
        empty = torch.empty(0, device=rows.device, dtype=dtype)
        return SoftmaxMoments(*(empty,) * STATE_MOMENTS)
    workspaces = _Workspaces((3, step * vocab), rows.device, dtype)
    parts: list[SoftmaxMoments | None] = [None] * len(blocks)

    def run_block(index: int, worker: int) -> None:
        o, start, stop = blocks[index]
        first = o * inner + start
        parts[index] = block_moments(rows[o, start:stop], inv_temperature,
                                     excluded[first:first + stop - start], need, dtype, workspaces[worker])

    for_each_block(rows.device, len(blocks), run_block)
    return SoftmaxMoments(*(torch.cat(x) for x in zip(*parts)))


def token_stats_backward_torch(
    rows: Tensor,
    grad: Tensor,
    params: Tensor,
    target_cols: Tensor,
    *,
    inv_temperature: float,
    block_bytes: int = BLOCK_BYTES,
) -> None:
    """Same contract as ``entropy_gpu.kernels.token_stats_backward.launch_token_stats_backward``;
    rows in blocks, so extra memory is a few blocks whatever the batch."""
    outer, inner, vocab = rows.shape
    step = max(1, min(inner, rows_per_block(vocab, params.dtype, block_bytes)))
    blocks = _row_blocks(outer, inner, step)
    # decided once per call (a host sync on CUDA), not per block
    entropy_term = bool((params[BACKWARD_PARAMS.index("coef_entropy")] != 0).any())

    def run_block(index: int, worker: int) -> None:
        o, start, stop = blocks[index]
        sl = slice(o * inner + start, o * inner + stop)
        logits_grad(rows[o, start:stop], params[:, sl], target_cols[sl], inv_temperature,
                    out=grad[o, start:stop], entropy_term=entropy_term)

    for_each_block(rows.device, len(blocks), run_block)
