"""``plugin()``: what verl's ``verl.plugins`` entry point (``entropy_gpu.integrations.verl_plugin``)
runs on every ``import verl``, switched by ``ENTROPY_GPU_VERL``, so that every Ray worker of a
run patches verl (and installs CorR-PO) as the driver does."""

from __future__ import annotations

import os

from .corrpo import install_corrpo
from .patching import patch_verl

ENV_VAR = "ENTROPY_GPU_VERL"


def plugin() -> None:
    """verl.plugins entry point (runs on every ``import verl``): does nothing unless
    ``ENTROPY_GPU_VERL`` is set: ``kernels`` (or ``1``) patches the functions, ``corrpo``
    also installs CorR-PO. Errors are raised, not swallowed: a run that asked for
    entropy_gpu must not silently run without it (verl logs plugin errors at debug level)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "0", "none", "off"):
        return
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = wanted - {"1", "kernels", "corrpo"}
    if unknown:
        raise ValueError(f"{ENV_VAR}={value!r}: expected 'kernels', 'corrpo' or 'kernels,corrpo'")
    if "corrpo" in wanted:
        install_corrpo()
    else:
        patch_verl()
