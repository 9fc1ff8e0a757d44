"""Public API: exact Spearman rank correlation per row or per packed segment.

Spearman is the Pearson correlation of the ranks, ties getting the average of the
ranks they span (as ``scipy.stats.spearmanr``). Ranks need every value of a group
at once, so this is **not streaming**: no state, no merging, one sort of the used
pairs (O(N log N)). It runs as torch ops on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_cu_seqlens, check_dim, check_mask, check_pair
from .comoments import Correlation, correlation, segment_comoments_torch


def _average_ranks(values: Tensor, segment: Tensor, segment_start: Tensor) -> Tensor:
    """1-based ranks of ``values`` within their segment, ties averaged.

    ``segment`` is sorted (non-decreasing); ``segment_start[s]`` is where segment ``s``
    begins in ``values``.
    """
    n = values.numel()
    # Sort by value, then stably by segment: groups stay contiguous and sorted inside.
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(segment[order], stable=True).indices]
    sorted_values = values[order]
    sorted_segment = segment[order]
    new_run = torch.ones(n, dtype=torch.bool, device=values.device)
    new_run[1:] = (sorted_values[1:] != sorted_values[:-1]) | (sorted_segment[1:] != sorted_segment[:-1])
    run_start = torch.nonzero(new_run).squeeze(1)
    run_length = torch.diff(run_start, append=torch.tensor([n], device=values.device))
    run_id = torch.cumsum(new_run, 0) - 1
    mean_position = run_start.to(torch.float64) + 0.5 * (run_length - 1).to(torch.float64)
    sorted_rank = mean_position[run_id] - segment_start[sorted_segment].to(torch.float64) + 1.0
    ranks = torch.empty(n, dtype=torch.float64, device=values.device)
    ranks[order] = sorted_rank
    return ranks


def _segment_spearman(x: Tensor, y: Tensor, used: Tensor | None, offsets: Tensor,
                      dtype: torch.dtype) -> Correlation:
    device = x.device
    offsets = offsets.to(device=device, dtype=torch.int64)
    n_segments = offsets.numel() - 1
    segment = torch.repeat_interleave(torch.arange(n_segments, device=device), offsets[1:] - offsets[:-1])
    if used is None:
        used = torch.ones_like(segment, dtype=torch.bool)
    # A NaN in a used pair makes its group undefined (as in pearson); ranks would hide it.
    nan_pair = (torch.isnan(x) | torch.isnan(y)) & used
    nan_count = torch.zeros(n_segments, dtype=torch.int64, device=device)
    has_nan = nan_count.index_add_(0, segment, nan_pair.long()) > 0
    segment = segment[used]
    counts = torch.bincount(segment, minlength=n_segments)
    starts = torch.zeros(n_segments + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=starts[1:])
    rank_x = _average_ranks(x[used].to(torch.float64), segment, starts)
    rank_y = _average_ranks(y[used].to(torch.float64), segment, starts)
    result = correlation(segment_comoments_torch(rank_x, rank_y, None, starts), dtype)
    return Correlation(torch.where(has_nan, float("nan"), result.corr).to(dtype), result.valid & ~has_nan,
                       result.n)


def _out_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def spearman(x: Tensor, y: Tensor, mask: Tensor | None = None, dim: int = -1) -> Correlation:
    """Exact Spearman rank correlation of ``x`` and ``y`` along ``dim`` (ties averaged).

    Not streaming: every pair of a row is ranked at once. Same shapes, mask and
    validity rules as ``pearson``, except that ``±inf`` values are ranked like any
    other (only NaN in a used pair makes a row undefined).

    Example:
        >>> import torch, entropy_gpu
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> entropy_gpu.spearman(x, x ** 3).corr
        tensor([1.])
    """
    check_pair(x, y)
    d = check_dim(dim, x.dim())
    if mask is not None:
        check_mask(mask, x)
    out_shape = x.shape[:d] + x.shape[d + 1:]
    rows, length = out_shape.numel(), x.shape[d]
    flat = [t.movedim(d, -1).reshape(-1) if t is not None else None for t in (x, y, mask)]
    offsets = torch.arange(rows + 1, device=x.device) * length
    result = _segment_spearman(*flat, offsets, _out_dtype(x, y))
    return Correlation(*(t.view(out_shape) for t in result))


def segment_spearman(x: Tensor, y: Tensor, cu_seqlens: Tensor, mask: Tensor | None = None) -> Correlation:
    """Exact Spearman rank correlation of each packed segment (see ``segment_pearson``).

    Not streaming. Returns a ``Correlation`` of shape ``[S]``.
    """
    check_pair(x, y)
    if x.dim() != 1:
        raise ValueError(f"x and y must be 1-D packed streams, got shape {tuple(x.shape)} "
                         f"(flatten a [1, N] batch with x.view(-1))")
    check_cu_seqlens(cu_seqlens, x.numel(), x.device)
    if mask is not None:
        check_mask(mask, x)
    return _segment_spearman(x, y, mask, cu_seqlens, _out_dtype(x, y))
