"""Analyses built on the public API: the SIA answer-entropy curves (``sia``), the report
on the parameter-gradient measures of ``entropy_gpu.param_grad`` (``grad_report``), and
offline model loading (``models``). Nothing here imports ``entropy_gpu.kernels``."""
