"""Backend selection: Triton kernels on GPU, plain PyTorch elsewhere.

``backend="auto"`` picks ``"triton"`` for CUDA tensors when Triton imports, else
``"torch"``. The environment variable ``ENTROPY_GPU_BACKEND`` (``triton`` or
``torch``) overrides ``"auto"``; an explicit ``backend=`` argument always wins.
On CPU tensors the Triton kernels run only under ``TRITON_INTERPRET=1`` (slow;
meant for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "ENTROPY_GPU_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on()


def resolve_backend(device: torch.device | torch.Tensor | str = "cpu", backend: str = "auto") -> str:
    """Return the backend (``"triton"`` or ``"torch"``) a call would use for ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when ``"triton"``
    is asked for where it cannot run.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env:
            if env not in ("triton", "torch"):
                raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {env!r}")
            backend = env
        else:
            backend = "triton" if device.type == "cuda" and triton_supports(device) else "torch"
    if backend == "triton" and not triton_supports(device):
        why = ("Triton is not installed" if not triton_importable() else
               f"tensors on {device.type!r} need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors")
        raise RuntimeError(f"the Triton backend cannot run here: {why}; use backend='torch'")
    return backend
