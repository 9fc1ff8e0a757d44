"""The import rules of docs/architecture.md, checked on every module's imports (parsed with
``ast``, lazy imports inside functions included).

The tables below mirror the document, which is the source: change both together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "entropy_gpu"
CORE = "(core)"  # the top-level modules of entropy_gpu/

# Top to bottom: a module imports its own folder and the folders below it, never those above.
LAYERS = ("experiments", "integrations", "analysis", "bench", "corrpo", "param_grad", "correlation", CORE,
          "kernels")

# ``import entropy_gpu`` (the public API) re-exports names of param_grad/, correlation/ and the
# core, so only the folders above param_grad/ may import it.
PUBLIC_API_USERS = frozenset(LAYERS[:LAYERS.index("param_grad")])

# Documented exceptions to the layering: module -> (folders it may import whatever their place, why).
LAYER_EXCEPTIONS = {
    "entropy_gpu.cli": (frozenset(LAYERS), "the entropy-gpu command drives every folder, lazily per command"),
    "entropy_gpu.cli_support": (frozenset(LAYERS), "the command's checks before slow work (analysis.models)"),
    "entropy_gpu": (frozenset({"param_grad", "correlation"}), "__init__.py re-exports their public names"),
}

# Documented private modules a folder may import from another: (importing folder, module) -> why.
PRIVATE_EXCEPTIONS = {
    ("correlation", "entropy_gpu._validation"): "its entry points validate as every entry point (plan_call)",
    ("analysis", "entropy_gpu._wheels"): "locating the data wheels",
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for the package and its kernels (``entropy_gpu/kernels`` is a link)."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1] == "kernels":
            continue
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[f"{PACKAGE}.kernels.{path.stem}"] = path
    return files


MODULES = module_files()


def folder_of(module: str) -> str | None:
    """The layer of a module of the package: its folder, CORE for a top-level module, None for the
    package root (the public API)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if (ROOT / PACKAGE / parts[1]).is_dir() else CORE


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py" if module in MODULES else module == f"{PACKAGE}.kernels"


def imports_of(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of the package."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return [(t, n, line) for t, n, line in found if t == PACKAGE or t.startswith(PACKAGE + ".")]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def violations(module: str, imports: list[tuple[str, str | None, int]]) -> list[str]:
    """The rules of docs/architecture.md broken by ``imports`` of ``module``."""
    mine = folder_of(module)
    if mine is None:
        mine = CORE  # the package root is a core module with a documented exception
    allowed_anyway, _ = LAYER_EXCEPTIONS.get(module, (frozenset(), ""))
    broken = []
    for target, name, line in imports:
        where = f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}" + (f".{name}" if name else "")
        theirs = folder_of(target)
        if mine == "kernels" and theirs != "kernels":
            broken.append(f"{where}: the kernels import nothing of entropy_gpu")
            continue
        if theirs == "kernels" and mine not in (CORE, "kernels"):
            broken.append(f"{where}: only core modules import entropy_gpu.kernels")
            continue
        if theirs is None:
            if mine not in PUBLIC_API_USERS and module not in LAYER_EXCEPTIONS:
                broken.append(f"{where}: only the folders above param_grad/ import the public API")
            continue
        if theirs != mine and theirs not in allowed_anyway and LAYERS.index(theirs) < LAYERS.index(mine):
            broken.append(f"{where}: {mine} imports {theirs}, a layer above it")
        if theirs != mine and (mine, target) not in PRIVATE_EXCEPTIONS:
            private_parts = [p for p in target.split(".")[1:] if is_private(p)]
            if private_parts or (name and is_private(name)):
                broken.append(f"{where}: a private module or name of another folder ({theirs})")
    return broken


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    assert violations(module, imports_of(module)) == []


def test_a_broken_import_is_caught():
    """Each rule fails on a deliberately broken import (so the test above can fail)."""
    cases = {
        "entropy_gpu.corrpo.model": ("entropy_gpu.analysis.grad_report", None),   # upward
        "entropy_gpu.param_grad.exact": ("entropy_gpu", "token_stats"),           # public API from below
        "entropy_gpu.bench.train": ("entropy_gpu._autograd", None),               # private module
        "entropy_gpu.analysis.grad_report": ("entropy_gpu.kernels.token_stats", None),  # kernels
        "entropy_gpu.kernels.token_stats": ("entropy_gpu.moments", None),         # kernels importing up
        "entropy_gpu.corrpo.reward": ("entropy_gpu.param_grad.estimate", "_direction"),  # private name
    }
    for module, (target, name) in cases.items():
        assert len(violations(module, [(target, name, 1)])) == 1, (module, target, name)


def test_the_tables_mirror_the_document():
    """The layer order, the exceptions and the private-module exceptions are the document's."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("```")[1]
    order = []
    for line in block.splitlines():
        match = re.match(r"(entropy_gpu/(\w*)/?|kernels/)\s", line)
        if match:
            order.append("kernels" if match.group(1) == "kernels/" else (match.group(2) or CORE))
    assert tuple(order) == LAYERS
    for module in LAYER_EXCEPTIONS:
        path = "__init__.py" if module == PACKAGE else module.split(".")[-1] + ".py"
        assert f"`{path}`" in doc.split("## Exceptions")[1], module
    for _, private in PRIVATE_EXCEPTIONS:
        assert f"`{private.split('.')[-1]}`" in doc.split("## Exceptions")[1], private


# The core's path, top to bottom (docs/architecture.md, the numbered steps under "the core API"):
# each module imports only the ones after it, so a call goes down and never back up.
CORE_PATH = ("_validation", "_autograd", "backward", "backend", "_torch_backend", "_row_blocks", "moments",
             "_rows")


def test_the_core_path_goes_down():
    steps = (ROOT / "docs" / "architecture.md").read_text().split("One path")[1].split("\n\n")[1]
    assert sorted(CORE_PATH, key=lambda m: steps.index(f"`{m}.py`")) == list(CORE_PATH)
    for k, module in enumerate(CORE_PATH):
        below = {f"{PACKAGE}.{m}" for m in CORE_PATH[k + 1:]}
        core = {t for t, _, _ in imports_of(f"{PACKAGE}.{module}") if t.split(".")[-1] in CORE_PATH}
        assert core <= below, (module, core - below)
