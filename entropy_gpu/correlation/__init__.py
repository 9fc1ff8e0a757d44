"""Correlation between per-token statistics: streaming, mergeable Pearson (``pearson``,
``segment_pearson``, ``PearsonState``), Spearman, and the one-pass
``token_stats_with_correlation``. Definitions: docs/correlation.md."""

from .comoments import Correlation
from .pearson import PearsonState, pearson, segment_pearson
from .spearman import segment_spearman, spearman
from .token_correlation import token_stats_with_correlation

__all__ = ["Correlation", "PearsonState", "pearson", "segment_pearson", "segment_spearman", "spearman",
           "token_stats_with_correlation"]
