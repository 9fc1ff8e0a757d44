"""Old import paths of modules that moved into subpackages keep working.

``import entropy_gpu.sia`` (or ``from entropy_gpu.models import load_model``) resolves to
the module's new home; the module object is the same, not a copy."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "entropy_gpu.comoments": "entropy_gpu.correlation.comoments",
    "entropy_gpu.rank_correlation": "entropy_gpu.correlation.spearman",
    "entropy_gpu.token_correlation": "entropy_gpu.correlation.token_correlation",
    "entropy_gpu.grad_report": "entropy_gpu.analysis.grad_report",
    "entropy_gpu.models": "entropy_gpu.analysis.models",
    "entropy_gpu.sia": "entropy_gpu.analysis.sia",
    "entropy_gpu.bench_impls": "entropy_gpu.bench.impls",
    "entropy_gpu.bench_report": "entropy_gpu.bench.report",
    "entropy_gpu.bench_train": "entropy_gpu.bench.train",
}


def new_name(name: str) -> str | None:
    """The module's current name if ``name`` (or a package above it) moved, else None."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        target_name = new_name(name)
        if target_name is None or importlib.util.find_spec(target_name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after
        # exec_module, so the old name becomes an alias of the real module.
        sys.modules[module.__name__] = importlib.import_module(new_name(module.__name__))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before PathFinder: moved packages keep their __path__
