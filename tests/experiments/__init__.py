"""Tests of entropy_gpu/experiments/: the CorR-PO training experiment."""
