"""Tests of entropy_gpu/analysis/: the gradient-measure report, offline models, long runs."""
