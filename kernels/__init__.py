"""Triton kernels of entropy-gpu, one operation per module.

Installed as ``entropy_gpu.kernels``. Import the modules you need
(``from entropy_gpu.kernels import token_stats``); nothing is imported eagerly so
that merely importing this package needs no Triton. The kernels trust their
inputs: validation lives in the public API (``entropy_gpu``).
"""
