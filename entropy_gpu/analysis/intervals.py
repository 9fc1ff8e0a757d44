"""When a sample is large enough for an interval: the minimum sizes of the package's reports.

A percentile bootstrap on a handful of values reports a confident-looking but meaningless
interval: with ``n`` values there are at most ``C(2n - 1, n)`` distinct resamples (35 for
``n = 4``), the bootstrap spread is too narrow by ``sqrt((n - 1) / n)`` before any skew, and
an AUROC from two traces per class resamples to the same value every time ("1.000 [1.000,
1.000]"). So the reports show a bootstrap interval only from these sizes up and say
``n too small`` (or leave the interval out) below them. The t interval across seeds in the
CorR-PO experiment's report is exact for normal per-seed values at any ``n >= 2`` (it is wide:
``t = 12.7`` at ``n = 2``) and keeps its own rule.
"""

from __future__ import annotations

MIN_BOOTSTRAP_N = 10  #: resampled units (responses, traces) for a percentile bootstrap interval
MIN_AUROC_CLASS_N = 5  #: traces in each class (correct, incorrect) for an AUROC's bootstrap interval
TOO_SMALL = "n too small"  #: what a report prints in place of an interval below these sizes


def bootstrap_allowed(n: int) -> bool:
    """Whether ``n`` resampled units allow a percentile bootstrap interval."""
    return n >= MIN_BOOTSTRAP_N


def auroc_interval_allowed(n_positive: int, n_negative: int) -> bool:
    """Whether the class sizes allow a (stratified) bootstrap interval of an AUROC."""
    return min(n_positive, n_negative) >= MIN_AUROC_CLASS_N


def interval_text(lo: float | None, hi: float | None, fmt: str = ".2f") -> str:
    """``"[lo, hi]"``, or ``"[n too small]"`` when the interval was not computed (None or NaN)."""
    if lo is None or hi is None or lo != lo or hi != hi:
        return f"[{TOO_SMALL}]"
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


__all__ = ["MIN_AUROC_CLASS_N", "MIN_BOOTSTRAP_N", "TOO_SMALL", "auroc_interval_allowed", "bootstrap_allowed",
           "interval_text"]
