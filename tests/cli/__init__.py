"""Tests of the entropy-gpu command (entropy_gpu/cli/)."""
