"""Tests of entropy_gpu/analysis/sia/: SIA answer-entropy curves."""
