"""Tests of entropy_gpu/bench/: the benchmark harness and its reports."""
