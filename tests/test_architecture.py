"""The import rules of docs/architecture.md, checked on every module's imports (parsed with
``ast``, lazy imports inside functions included), and the mirror of the package in ``tests/``.

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

# The command line: entropy_gpu/cli/, every folder's own cli.py (its subcommands) and __main__.py.
CLI = "cli"

# Top to bottom: a module imports its own folder and the folders below it, never those above.
LAYERS = (CLI, "experiments", "integrations", "analysis", "bench", "corrpo", "param_grad", "correlation",
          CORE, "kernels")

# ``import entropy_gpu`` (the public API) re-exports names of param_grad/, correlation/ and the
# core, so only the folders above param_grad/ may import it.
PUBLIC_API_USERS = frozenset(LAYERS[:LAYERS.index("param_grad")])

# Documented exceptions to the layering: module -> (folders it may import whatever their place, why).
LAYER_EXCEPTIONS = {
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


def layer_of(module: str) -> str | None:
    """The layer of a module: its folder's, except that a folder's own ``cli.py`` (its
    subcommands) and ``entropy_gpu.__main__`` (``python -m entropy_gpu``) belong to the command line."""
    if module == f"{PACKAGE}.__main__" or (module.rpartition(".")[2] == CLI and folder_of(module) != CORE):
        return CLI
    return folder_of(module)


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
    my_layer = layer_of(module) or CORE
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
            if my_layer not in PUBLIC_API_USERS and module not in LAYER_EXCEPTIONS:
                broken.append(f"{where}: only the folders above param_grad/ import the public API")
            continue
        their_layer = layer_of(target)
        if (their_layer != my_layer and their_layer not in allowed_anyway
                and LAYERS.index(their_layer) < LAYERS.index(my_layer)):
            broken.append(f"{where}: {my_layer} imports {their_layer}, a layer above it")
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
        "entropy_gpu.analysis.sia.run": ("entropy_gpu.analysis.sia.cli", "cmd_sia"),  # command line
        "entropy_gpu.analysis.models": ("entropy_gpu.cli.support", "UsageError"),  # command line
    }
    for module, (target, name) in cases.items():
        assert len(violations(module, [(target, name, 1)])) == 1, (module, target, name)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports): its strongly connected
    components of more than one module, and modules importing themselves (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


# Documented import cycles (docs/architecture.md, "Exceptions"): the modules of the cycle -> why.
CYCLE_EXCEPTIONS: dict[frozenset[str], str] = {}


def test_no_module_imports_itself_back():
    """No import cycle between the package's modules (lazy imports inside functions included):
    a cycle makes import order matter and hides which module is the lower one. A documented
    exception must still be a cycle (else it is stale and goes)."""
    graph = {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    cycles = {frozenset(c) for c in import_cycles(graph)}
    assert sorted(sorted(c) for c in cycles - set(CYCLE_EXCEPTIONS)) == []
    assert set(CYCLE_EXCEPTIONS) <= cycles, "a listed import cycle no longer exists: remove it"


def test_an_import_cycle_is_caught():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(import_cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


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
    for cycle in CYCLE_EXCEPTIONS:
        for module in cycle:
            assert f"`{module.split('.')[-1]}.py`" in doc.split("## Exceptions")[1], module


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


def test_every_folders_commands_are_registered():
    """Each folder's ``cli.py`` has ``register(subparsers)`` and is in ``entropy_gpu.cli.COMMAND_MODULES``
    (its subcommands reach the parser); nothing else is listed there."""
    from entropy_gpu.cli import COMMAND_MODULES

    folder_commands = {m for m in MODULES if m.rpartition(".")[2] == CLI and folder_of(m) != CLI}
    assert folder_commands <= set(COMMAND_MODULES)
    assert set(COMMAND_MODULES) <= folder_commands | {m for m in MODULES if folder_of(m) == CLI}
    for module in COMMAND_MODULES:
        tree = ast.parse(MODULES[module].read_text())
        assert any(isinstance(f, ast.FunctionDef) and f.name == "register" for f in tree.body), module


# ----------------------------------------------------------------------- tests/ mirrors the package

TESTS = ROOT / "tests"
# The tests of the repository as a whole, at the top of tests/ (everything else has its folder).
WHOLE_REPOSITORY_TESTS = frozenset({"test_architecture.py", "test_packaging.py", "test_readme.py"})


def package_folders() -> set[str]:
    """The folders of the package, as their test folders are named: ``core`` (the top-level
    modules), ``kernels``, and each subpackage's path (``analysis/sia``)."""
    folders = {"core", "kernels"}
    for init in (ROOT / PACKAGE).rglob("__init__.py"):
        relative = init.parent.relative_to(ROOT / PACKAGE)
        if relative.parts and relative.parts[0] != "kernels":
            folders.add(relative.as_posix())
    return folders


def test_tests_mirror_the_package_folders():
    """Every folder of the package has its folder in tests/ (a package, with tests), and every
    folder in tests/ is one of the package's; only whole-repository tests sit at the top."""
    test_folders = {p.parent.relative_to(TESTS).as_posix() for p in TESTS.rglob("__init__.py")} - {"."}
    assert test_folders == package_folders()
    for folder in test_folders:
        assert list((TESTS / folder).glob("test_*.py")), f"tests/{folder}/ has no tests"
    stray = {p.relative_to(TESTS).as_posix() for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts
             and p.parent != TESTS and p.parent.relative_to(TESTS).as_posix() not in test_folders}
    assert not stray, f"test files outside the mirror (a folder without __init__.py?): {sorted(stray)}"
    assert {p.name for p in TESTS.glob("test_*.py")} == WHOLE_REPOSITORY_TESTS
