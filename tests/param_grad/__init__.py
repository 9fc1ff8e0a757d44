"""Tests of entropy_gpu/param_grad/: the exact parameter-gradient measure and its estimates."""
