"""Tests of the Triton kernels of kernels/ (entropy_gpu.kernels): under TRITON_INTERPRET=1, and
compiled ahead of time for GPU targets."""
