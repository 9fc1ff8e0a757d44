"""Weighted co-moments of (x, y) pairs: the mergeable state behind every Pearson
correlation in the package (docs/correlation.md).

``CoMoments`` holds, per group, the total weight ``n``, the means, and the second
co-moments ``M2x = sum w (x - mean_x)^2``, ``M2y`` and ``Cxy = sum w (x - mean_x)(y - mean_y)``
in units of a per-group scale: ``scaled_m2_x = M2x / scale_x^2``,
``scaled_c_xy = Cxy / (scale_x scale_y)``. The scales are about the spread of the data, so
the scaled sums stay near ``n`` for data anywhere in the float64 range (raw ``M2x`` of
data at 1e200 overflows, at 1e-160 it is subnormal). All in float64. Two states of
disjoint pair sets merge exactly (Chan et al.), so blocks, launches, batches and ranks
all combine the same way; ``correlation`` turns a state into a ``Correlation``.

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
    """Float64 co-moments per group; second moments in units of ``scale_x``, ``scale_y``.

    A scale is 0 where the group has no spread on that side (no pairs, or a constant
    side); its scaled sums are then 0. Any positive scale is a valid unit: ``merge_comoments``
    picks the larger of the two and rescales the other state to it.
    """

    n: Tensor
    mean_x: Tensor
    mean_y: Tensor
    scaled_m2_x: Tensor
    scaled_m2_y: Tensor
    scaled_c_xy: Tensor
    scale_x: Tensor
    scale_y: Tensor

    @staticmethod
    def zeros(shape, device) -> CoMoments:
        return CoMoments(*(torch.zeros(shape, dtype=torch.float64, device=device) for _ in CoMoments._fields))

    def to(self, device) -> CoMoments:
        return CoMoments(*(t.to(device) for t in self))


def _safe(scale: Tensor) -> Tensor:
    """A divisor for a scale: 1 where it is 0 (or NaN: the state is invalid anyway)."""
    return torch.where(scale > 0, scale, 1.0)


def comoments_from_unscaled(n: Tensor, mean_x: Tensor, mean_y: Tensor, m2_x: Tensor, m2_y: Tensor,
                            c_xy: Tensor) -> CoMoments:
    """CoMoments from raw float64 sums (the state_dict layout before the scales).

    Scales ``sqrt(M2)``: the scaled second moments become 1 (0 without spread). Raw sums
    that had already over- or underflowed stay as wrong as they were (inf gives an
    invalid correlation).
    """
    scale_x = torch.sqrt(m2_x)
    scale_y = torch.sqrt(m2_y)
    # Divide one factor at a time: scale_x * scale_y can leave the range where each does not.
    unit_x, unit_y = _safe(scale_x), _safe(scale_y)
    return CoMoments(n, mean_x, mean_y, m2_x / unit_x / unit_x, m2_y / unit_y / unit_y,
                     c_xy / unit_x / unit_y, scale_x, scale_y)


def merge_comoments(a: CoMoments, b: CoMoments) -> CoMoments:
    """State of the union of two disjoint sets of pairs (Chan et al.), elementwise.

    The union's scale covers both scales and the distance between the means, so every
    term below is at most about ``n``; a state whose scale is far below the other's
    contributes below float64 resolution and may underflow to 0, which is then exact
    to rounding (Cauchy-Schwarz bounds its ``Cxy`` share the same way).
    """
    n = a.n + b.n
    frac = b.n / torch.where(n > 0, n, 1.0)  # weight of b in the union; 0 when both are empty
    delta_x = b.mean_x - a.mean_x
    delta_y = b.mean_y - a.mean_y
    spread = a.n * frac  # n_a n_b / n
    both = (a.n > 0) & (b.n > 0)
    # An empty side has mean 0, so the deltas are meaningless there (and may be huge).
    between_x = torch.where(both, delta_x, 0.0)
    between_y = torch.where(both, delta_y, 0.0)
    scale_x = torch.maximum(torch.maximum(a.scale_x, b.scale_x), between_x.abs())
    scale_y = torch.maximum(torch.maximum(a.scale_y, b.scale_y), between_y.abs())
    unit_x, unit_y = _safe(scale_x), _safe(scale_y)
    ax, bx, dx = a.scale_x / unit_x, b.scale_x / unit_x, between_x / unit_x  # all in [-1, 1]
    ay, by, dy = a.scale_y / unit_y, b.scale_y / unit_y, between_y / unit_y
    return CoMoments(
        n=n,
        mean_x=a.mean_x + delta_x * frac,
        mean_y=a.mean_y + delta_y * frac,
        scaled_m2_x=a.scaled_m2_x * ax * ax + b.scaled_m2_x * bx * bx + dx * dx * spread,
        scaled_m2_y=a.scaled_m2_y * ay * ay + b.scaled_m2_y * by * by + dy * dy * spread,
        scaled_c_xy=a.scaled_c_xy * ax * ay + b.scaled_c_xy * bx * by + dx * dy * spread,
        scale_x=scale_x,
        scale_y=scale_y,
    )


def correlation(m: CoMoments, dtype: torch.dtype = torch.float32) -> Correlation:
    """Pearson correlation ``Cxy / sqrt(M2x M2y)``, NaN and ``valid=False`` where undefined.

    The scales cancel, so it is computed from the scaled sums alone.
    """
    finite = (torch.isfinite(m.scaled_m2_x) & torch.isfinite(m.scaled_m2_y) & torch.isfinite(m.scaled_c_xy)
              & torch.isfinite(m.scale_x) & torch.isfinite(m.scale_y))
    valid = finite & (m.scaled_m2_x > 0) & (m.scaled_m2_y > 0)
    corr = m.scaled_c_xy / (torch.sqrt(m.scaled_m2_x) * torch.sqrt(m.scaled_m2_y))
    corr = torch.where(valid, corr.clamp(-1.0, 1.0), float("nan"))
    return Correlation(corr.to(dtype), valid, m.n.to(torch.float64))


def comoments_from_kernel_state(state: Tensor) -> CoMoments:
    """CoMoments from the kernel's [S, 10] output (already in units of its scales), in float64."""
    s = state.to(torch.float64)
    return CoMoments(n=s[:, 0], mean_x=s[:, 1] + s[:, 3] * s[:, 8], mean_y=s[:, 2] + s[:, 4] * s[:, 9],
                     scaled_m2_x=s[:, 5], scaled_m2_y=s[:, 6], scaled_c_xy=s[:, 7], scale_x=s[:, 8],
                     scale_y=s[:, 9])


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
    scale_x = torch.zeros_like(pivot_x).scatter_reduce_(0, seg, xs.abs(), "amax")
    scale_y = torch.zeros_like(pivot_y).scatter_reduce_(0, seg, ys.abs(), "amax")
    xs = xs / _safe(scale_x)[seg]
    ys = ys / _safe(scale_y)[seg]
    n = seg_sum(w)
    inv_n = 1.0 / torch.where(n > 0, n, 1.0)
    mean_x = seg_sum(w * xs) * inv_n
    mean_y = seg_sum(w * ys) * inv_n
    dx = torch.where(used, xs - mean_x[seg], 0.0)
    dy = torch.where(used, ys - mean_y[seg], 0.0)
    sum_dx = seg_sum(w * dx)
    sum_dy = seg_sum(w * dy)
    # The sums stay in units of the scales: multiplied out, they leave float64's range
    # for data beyond about 1e+-154.
    return CoMoments(
        n=n,
        mean_x=pivot_x + (mean_x + sum_dx * inv_n) * scale_x,
        mean_y=pivot_y + (mean_y + sum_dy * inv_n) * scale_y,
        scaled_m2_x=seg_sum(w * dx * dx) - sum_dx * sum_dx * inv_n,
        scaled_m2_y=seg_sum(w * dy * dy) - sum_dy * sum_dy * inv_n,
        scaled_c_xy=seg_sum(w * dx * dy) - sum_dx * sum_dy * inv_n,
        scale_x=scale_x,
        scale_y=scale_y,
    )
