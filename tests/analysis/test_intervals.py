"""The minimum sample sizes for intervals (entropy_gpu.analysis.intervals) and how a report
shows a missing one."""

from __future__ import annotations

import math

from entropy_gpu.analysis.intervals import (
    MIN_AUROC_CLASS_N,
    MIN_BOOTSTRAP_N,
    auroc_interval_allowed,
    bootstrap_allowed,
    interval_text,
)


def test_minimum_sizes():
    assert not bootstrap_allowed(MIN_BOOTSTRAP_N - 1) and bootstrap_allowed(MIN_BOOTSTRAP_N)
    assert not bootstrap_allowed(2)
    assert auroc_interval_allowed(MIN_AUROC_CLASS_N, MIN_AUROC_CLASS_N + 7)
    assert not auroc_interval_allowed(MIN_AUROC_CLASS_N - 1, 100) and not auroc_interval_allowed(100, 2)


def test_interval_text():
    assert interval_text(-0.25, -0.21) == "[-0.25, -0.21]"
    assert interval_text(0.1234, 0.5, ".3f") == "[0.123, 0.500]"
    assert interval_text(None, None) == interval_text(math.nan, math.nan) == "[n too small]"
