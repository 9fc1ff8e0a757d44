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

from .moments import SoftmaxMoments, accumulators_needed, block_moments, finalize, logits_grad, target_masks

# One working block in the compute dtype; three live at once (centred logits, exp,
# exp * d). 2 MiB measured fastest at 2048 x 32000 fp32 on a 2-core AMD EPYC
# (0.25 / 0.5 / 1 / 2 / 4 MiB: 1.3x / 2.1x / 3.4x / 4.3x / 3.6x eager).
BLOCK_BYTES = 2 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_block(vocab: int, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> int:
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, block_bytes // (vocab * itemsize))


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
    """Same contract as ``entropy_gpu.kernels.token_stats.launch_token_stats``."""
    outer, inner, vocab = rows.shape
    need = accumulators_needed(want)
    step = min(inner, rows_per_block(vocab, out.dtype, block_bytes))
    workspace = torch.empty((3, step * vocab), device=rows.device, dtype=out.dtype)
    for o in range(outer):
        for start in range(0, inner, step):
            block = rows[o, start:start + step]
            first = o * inner + start
            sl = slice(first, first + block.shape[0])
            if targets is None:
                mom = block_moments(block, inv_temperature, None, need, out.dtype, workspace)
                stats = finalize(mom, None, None, None, inv_temperature, want)
            else:
                t, in_range, ignored = target_masks(targets[sl], vocab, ignore_index)
                col = torch.where(in_range, t, 0)
                mom = block_moments(block, inv_temperature, torch.where(in_range, t, -1), need, out.dtype,
                                    workspace)
                target_logit = block.gather(1, col.unsqueeze(1)).squeeze(1).to(out.dtype)
                stats = finalize(mom, target_logit, in_range, ignored, inv_temperature, want)
            for k, value in enumerate(stats):
                if value is not None:
                    out[k, sl] = value
            if save_state:
                out[7, sl] = mom.max
                out[8, sl] = torch.log(mom.s0)


def token_moments_torch(rows: Tensor, excluded: Tensor, *, inv_temperature: float, want: Sequence[bool],
                        block_bytes: int = BLOCK_BYTES) -> SoftmaxMoments:
    """Same contract as ``backend.token_moments``: the moments of every row of ``rows``
    [outer, inner, V], column ``excluded`` [rows] (-1 for none) left out of the q-sums."""
    outer, inner, vocab = rows.shape
    dtype = accumulation_dtype(rows.dtype)
    need = accumulators_needed(want)
    step = max(1, min(inner, rows_per_block(vocab, dtype, block_bytes)))
    workspace = torch.empty((3, step * vocab), device=rows.device, dtype=dtype)
    parts = []
    for o in range(outer):
        for start in range(0, inner, step):
            first = o * inner + start
            block = rows[o, start:start + step]
            block_excluded = excluded[first:first + block.shape[0]]
            parts.append(block_moments(block, inv_temperature, block_excluded, need, dtype, workspace))
    if not parts:
        empty = torch.empty(0, device=rows.device, dtype=dtype)
        return SoftmaxMoments(*(empty,) * 7)
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
    step = min(inner, rows_per_block(vocab, params.dtype, block_bytes))
    # params[4] is coef_entropy; decided once per call (a host sync on CUDA), not per block
    entropy_term = bool((params[4] != 0).any())
    for o in range(outer):
        for start in range(0, inner, step):
            stop = min(start + step, inner)
            sl = slice(o * inner + start, o * inner + stop)
            logits_grad(rows[o, start:stop], params[:, sl], target_cols[sl], inv_temperature,
                        out=grad[o, start:stop], entropy_term=entropy_term)
