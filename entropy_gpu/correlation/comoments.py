"""Weighted co-moments of (x, y) pairs: the mergeable state behind every Pearson
correlation in the package (SPEC section 3).

``CoMoments`` holds, per group, ``(n, mean_x, mean_y, m2_x, m2_y, c_xy)`` in
float64: the total weight, the means, ``sum w (x - mean_x)^2`` (and for y), and
``sum w (x - mean_x)(y - mean_y)``. Two states of disjoint pair sets merge exactly
(Chan et al.), so blocks, launches, batches and ranks all combine the same way;
``correlation`` turns a state into a ``Correlation``.

``segment_comoments_torch`` is the torch twin of ``kernels/segment_comoments.py``:
the same pivot, scaling and corrected two-pass, in float64 on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Correlation(NamedTuple):
    """A Pearson (or Spearman) correlation per group.

    ``corr`` is float32 (float64 for float64 inputs) and NaN where undefined;
    ``valid`` is True exactly where ``corr`` is defined: at least two pairs, both
    variances > 0, and no NaN or inf among the pairs used; ``n`` (float64) is the
    number of pairs used, or their total weight for weighted inputs.
    """

    corr: Tensor
    valid: Tensor
    n: Tensor


class CoMoments(NamedTuple):
    n: Tensor
    mean_x: Tensor
    mean_y: Tensor
    m2_x: Tensor
    m2_y: Tensor
    c_xy: Tensor

    @staticmethod
    def zeros(shape, device) -> "CoMoments":
        return CoMoments(*(torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(6)))

    def to(self, device) -> "CoMoments":
        return CoMoments(*(t.to(device) for t in self))


def merge_comoments(a: CoMoments, b: CoMoments) -> CoMoments:
    """State of the union of two disjoint sets of pairs (Chan et al.), elementwise."""
    n = a.n + b.n
    frac = b.n / torch.where(n > 0, n, 1.0)  # weight of b in the union; 0 when both are empty
    delta_x = b.mean_x - a.mean_x
    delta_y = b.mean_y - a.mean_y
    spread = a.n * frac  # n_a n_b / n
    both = (a.n > 0) & (b.n > 0)

    def between(dx: Tensor, dy: Tensor) -> Tensor:
        # An empty side has mean 0, so its delta is meaningless (and may overflow).
        return torch.where(both, dx * dy * spread, 0.0)

    return CoMoments(
        n=n,
        mean_x=a.mean_x + delta_x * frac,
        mean_y=a.mean_y + delta_y * frac,
        m2_x=a.m2_x + b.m2_x + between(delta_x, delta_x),
        m2_y=a.m2_y + b.m2_y + between(delta_y, delta_y),
        c_xy=a.c_xy + b.c_xy + between(delta_x, delta_y),
    )


def correlation(m: CoMoments, dtype: torch.dtype = torch.float32) -> Correlation:
    """Pearson correlation ``c_xy / sqrt(m2_x m2_y)``, NaN and ``valid=False`` where undefined."""
    finite = torch.isfinite(m.m2_x) & torch.isfinite(m.m2_y) & torch.isfinite(m.c_xy)
    valid = finite & (m.m2_x > 0) & (m.m2_y > 0)
    # sqrt each factor: the product m2_x * m2_y can overflow where neither does.
    corr = m.c_xy / (torch.sqrt(m.m2_x) * torch.sqrt(m.m2_y))
    corr = torch.where(valid, corr.clamp(-1.0, 1.0), float("nan"))
    return Correlation(corr.to(dtype), valid, m.n.to(torch.float64))


def comoments_from_kernel_state(state: Tensor) -> CoMoments:
    """CoMoments from the kernel's [S, 10] output, undoing its pivot and scale in float64."""
    s = state.to(torch.float64)
    scale_x = torch.where(s[:, 8] > 0, s[:, 8], 1.0)
    scale_y = torch.where(s[:, 9] > 0, s[:, 9], 1.0)
    return CoMoments(n=s[:, 0], mean_x=s[:, 1] + s[:, 3] * scale_x, mean_y=s[:, 2] + s[:, 4] * scale_y,
                     m2_x=s[:, 5] * scale_x * scale_x, m2_y=s[:, 6] * scale_y * scale_y,
                     c_xy=s[:, 7] * scale_x * scale_y)


def segment_comoments_torch(x: Tensor, y: Tensor, weight: Tensor | None, offsets: Tensor) -> CoMoments:
    """Co-moments of each segment ``[offsets[i], offsets[i+1])`` of the 1-D ``x, y``.

    ``weight``: None or finite weights >= 0 (pairs of weight 0 are skipped, whatever
    their values). Same contract as ``launch_segment_comoments`` (offsets that are not a
    valid ``cu_seqlens`` give meaningless segments, never an indexing error); float64.
    """
    n_segments = offsets.numel() - 1
    device = x.device
    total = x.numel()
    out = CoMoments.zeros((n_segments,), device)
    if n_segments <= 0 or total == 0:
        return out
    # Unchecked offsets are forced into a partition of [offsets[0], offsets[-1]] within [0, N].
    offsets = torch.cummax(offsets.to(device=device, dtype=torch.int64).clamp(0, total), 0).values
    first_pair = int(offsets[0])
    seg = torch.repeat_interleave(torch.arange(n_segments, device=device), offsets[1:] - offsets[:-1])
    covered = seg.numel()
    x64 = x[first_pair:first_pair + covered].to(torch.float64)
    y64 = y[first_pair:first_pair + covered].to(torch.float64)
    if weight is None:
        w = torch.ones(covered, dtype=torch.float64, device=device)
    else:
        w = weight[first_pair:first_pair + covered].to(torch.float64)
    used = w > 0

    def seg_sum(values: Tensor) -> Tensor:
        return torch.zeros(n_segments, dtype=torch.float64, device=device).index_add_(0, seg, values)

    # Pivot: the first used pair of each segment, an actual data value, so a constant
    # segment shifts to exact zeros (zero variance, not rounding noise).
    position = torch.arange(covered, device=device)
    first = torch.full((n_segments,), covered, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, seg, torch.where(used, position, covered), reduce="amin")
    has_pair = first < covered
    first = first.clamp(max=covered - 1)
    pivot_x = torch.where(has_pair, x64[first], 0.0)
    pivot_y = torch.where(has_pair, y64[first], 0.0)
    xs = torch.where(used, x64 - pivot_x[seg], 0.0)  # where, not w * x: skipped pairs may be NaN
    ys = torch.where(used, y64 - pivot_y[seg], 0.0)
    # Work in units of each segment's largest |shifted value|: squares stay in range.
    scale_x = torch.zeros(n_segments, dtype=torch.float64, device=device).scatter_reduce_(0, seg, xs.abs(), "amax")
    scale_y = torch.zeros(n_segments, dtype=torch.float64, device=device).scatter_reduce_(0, seg, ys.abs(), "amax")
    scale_x = torch.where(scale_x > 0, scale_x, 1.0)
    scale_y = torch.where(scale_y > 0, scale_y, 1.0)
    xs = xs / scale_x[seg]
    ys = ys / scale_y[seg]
    n = seg_sum(w)
    inv_n = 1.0 / torch.where(n > 0, n, 1.0)
    mean_x = seg_sum(w * xs) * inv_n
    mean_y = seg_sum(w * ys) * inv_n
    dx = torch.where(used, xs - mean_x[seg], 0.0)
    dy = torch.where(used, ys - mean_y[seg], 0.0)
    sum_dx = seg_sum(w * dx)
    sum_dy = seg_sum(w * dy)
    return CoMoments(
        n=n,
        mean_x=pivot_x + (mean_x + sum_dx * inv_n) * scale_x,
        mean_y=pivot_y + (mean_y + sum_dy * inv_n) * scale_y,
        m2_x=(seg_sum(w * dx * dx) - sum_dx * sum_dx * inv_n) * scale_x * scale_x,
        m2_y=(seg_sum(w * dy * dy) - sum_dy * sum_dy * inv_n) * scale_y * scale_y,
        c_xy=(seg_sum(w * dx * dy) - sum_dx * sum_dy * inv_n) * scale_x * scale_y,
    )
