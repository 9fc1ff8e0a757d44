"""Analyses built on the public API: the SIA answer-entropy curves (``sia``), the exact
per-token parameter-gradient measure (``param_grad``) and its report (``grad_report``),
and offline model loading (``models``). Nothing here imports ``entropy_gpu.kernels``."""
