"""Exact Pearson references (``fractions.Fraction``: no rounding, no over- or underflow)
and helpers for tests of the co-moment state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch


def exact_pearson(x: Sequence[float], y: Sequence[float], weight: Sequence[float] | None = None) -> float:
    """Weighted Pearson correlation of float64 pairs in exact rational arithmetic, rounded
    once to float64 (the square root adds at most one more rounding); NaN where undefined."""
    xs = [Fraction(float(v)) for v in x]
    ys = [Fraction(float(v)) for v in y]
    ws = [Fraction(1)] * len(xs) if weight is None else [Fraction(float(v)) for v in weight]
    n = sum(ws, Fraction(0))
    if n == 0:
        return math.nan
    mean_x = sum((w * v for w, v in zip(ws, xs)), Fraction(0)) / n
    mean_y = sum((w * v for w, v in zip(ws, ys)), Fraction(0)) / n
    dx = [v - mean_x for v in xs]
    dy = [v - mean_y for v in ys]
    m2_x = sum((w * d * d for w, d in zip(ws, dx)), Fraction(0))
    m2_y = sum((w * d * d for w, d in zip(ws, dy)), Fraction(0))
    c_xy = sum((w * a * b for w, a, b in zip(ws, dx, dy)), Fraction(0))
    if m2_x == 0 or m2_y == 0:
        return math.nan
    sign = -1.0 if c_xy < 0 else 1.0  # not float(c_xy): raw sums may lie beyond float64's range
    return sign * math.sqrt(float(c_xy * c_xy / (m2_x * m2_y)))


def raw_sums(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unscaled co-moments M2x, M2y, Cxy of a ``PearsonState.state_dict()`` (moderate
    data only: beyond about 1e+-154 they leave float64's range, which is why the state
    keeps scales)."""
    sx, sy = state["scale_x"], state["scale_y"]
    return {"m2_x": state["scaled_m2_x"] * sx * sx, "m2_y": state["scaled_m2_y"] * sy * sy,
            "c_xy": state["scaled_c_xy"] * sx * sy}
