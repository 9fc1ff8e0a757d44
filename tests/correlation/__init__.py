"""Tests of entropy_gpu/correlation/: Pearson, Spearman, token_stats_with_correlation."""
