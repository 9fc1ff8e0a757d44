"""``plugin()``: what verl's ``verl.plugins`` entry point (``entropy_gpu.integrations.verl_plugin``)
runs on every ``import verl``, switched by ``ENTROPY_GPU_VERL``, so that every Ray worker of a
run patches verl (and installs CorR-PO) as the driver does."""

from __future__ import annotations

import os

from .corrpo import install_corrpo
from .patching import ENV_VAR, patch_verl

OFF_VALUES = ("", "0", "none", "off")
ON_VALUES = ("1", "kernels", "corrpo")


class PluginValueError(ValueError):
    """``ENTROPY_GPU_VERL`` holds a value that is none of the known ones (a typo)."""


def wanted_parts(value: str | None = None) -> set[str]:
    """The parts ``ENTROPY_GPU_VERL`` (or ``value``) asks for: empty when unset or off,
    else a subset of ``{"1", "kernels", "corrpo"}``. Raises ``PluginValueError`` (one line,
    naming the valid values) on anything else: a typo must not silently patch nothing."""
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    value = raw.strip().lower()
    if value in OFF_VALUES:
        return set()
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(wanted - set(ON_VALUES))
    if unknown or not wanted:
        raise PluginValueError(
            f"{ENV_VAR}={raw!r}: unknown value {', '.join(map(repr, unknown)) or repr(raw)}; expected "
            "'kernels' (or '1'), 'corrpo', 'kernels,corrpo', or unset/'0'/'off' for nothing")
    return wanted


def plugin() -> None:
    """verl.plugins entry point (runs on every ``import verl``): does nothing unless
    ``ENTROPY_GPU_VERL`` is set: ``kernels`` (or ``1``) patches the functions, ``corrpo``
    also installs CorR-PO. Errors are raised, not swallowed: a run that asked for
    entropy_gpu must not silently run without it (verl logs plugin errors at debug level)."""
    wanted = wanted_parts()
    if not wanted:
        return
    if "corrpo" in wanted:
        install_corrpo()
    else:
        patch_verl()
