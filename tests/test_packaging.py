"""Packaging: the kernels install as entropy_gpu.kernels, and the repository's top-level
./kernels folder never passes for a top-level `kernels` package, even when the repository
root is on sys.path (``python -m ...``, ``torchrun -m ...`` or a script run from the root).
transformers probes for Hugging Face's `kernels` package by that name, and from 5.x
installs it as a dependency."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import entropy_gpu

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"


def _run(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_kernels_install_as_a_subpackage_from_the_top_level_folder():
    import entropy_gpu.kernels.token_stats as ts

    assert Path(ts.__file__).resolve().parent == KERNELS_DIR.resolve()
    # No __init__.py: a folder without one never wins over an installed `kernels` package.
    assert not (KERNELS_DIR / "__init__.py").exists()


_WHAT_KERNELS_IS = (
    "import importlib.util, importlib.metadata as md\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "try:\n    md.version('kernels'); installed = True\n"
    "except md.PackageNotFoundError:\n    installed = False\n"
    "origin = spec.origin if spec is not None else None\n"
    "from transformers.utils import is_kernels_available\n"
    "print(installed, origin, is_kernels_available())\n"
)


def test_the_repository_root_does_not_change_what_kernels_is(tmp_path):
    """From the root (on sys.path as ''), `kernels` is what it is from anywhere else:
    Hugging Face's package when installed, else nothing transformers would use."""
    from_root = _run(f"import sys; assert sys.path[0] == ''\n{_WHAT_KERNELS_IS}", cwd=ROOT)
    elsewhere = _run(_WHAT_KERNELS_IS, cwd=tmp_path)
    assert from_root == elsewhere
    installed, origin, _ = from_root.split(" ")
    assert installed == "False" or not origin.startswith(str(KERNELS_DIR))


def test_a_transformers_model_runs_from_the_repository_root():
    """What users hit (issue: ImportError 'CUDAProperties' from kernels/__init__.py): a
    transformers model plus entropy_gpu, in a process whose sys.path starts with the root."""
    code = ("import torch, entropy_gpu\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
            "                  num_attention_heads=2, num_key_value_heads=2)\n"
            "logits = LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits\n"
            "print(entropy_gpu.token_stats(logits[0], stats=('entropy',)).entropy.shape)\n")
    assert _run(code, cwd=ROOT) == "torch.Size([3])"


def test_public_api_has_docstrings_and_version():
    assert entropy_gpu.__version__
    for name in entropy_gpu.__all__:
        obj = getattr(entropy_gpu, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name


def _moved_modules() -> list[tuple[str, str]]:
    """(old, new) module paths from CHANGELOG.md's "Moved in 0.2" list (``- `old` -> `new` ``)."""
    import re

    text = (ROOT / "CHANGELOG.md").read_text()
    section = text.split("Moved in 0.2", 1)[1].split("\n#", 1)[0]
    pairs = re.findall(r"^- `([\w.]+)` -> `([\w.]+)`", section, flags=re.M)
    assert len(pairs) >= 10, section
    return pairs


def test_moved_modules_live_only_at_their_new_paths():
    """No alias finder: an old module path is an ImportError, not a half-working alias (the finder
    lacked get_code, so ``python -m <old path>`` failed with an AttributeError)."""
    import importlib

    assert not [f for f in sys.meta_path if type(f).__module__.startswith("entropy_gpu")]
    for old, new in _moved_modules():
        importlib.import_module(new)
        try:
            importlib.import_module(old)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{old} still imports")


def test_no_file_names_a_moved_module_by_its_old_path():
    import re

    names = {old for old, _ in _moved_modules()}
    leaf = "|".join(sorted(re.escape(old.split(".", 1)[1]) for old in names))
    stale = re.compile(rf"(?<![\w.])entropy_gpu[./]({leaf})\b|from entropy_gpu import ({leaf})\b")
    hits = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if (rel.parts[0].startswith(".") or rel.parts[0] in ("build", "dist") or not path.is_file()
                or path.suffix not in (".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".yaml", ".yml")
                or rel.name == "CHANGELOG.md"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if stale.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_bench_train_help_names_its_module():
    out = subprocess.run([sys.executable, "-m", "entropy_gpu.bench.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: python -m entropy_gpu.bench.train ")
    assert "bench_train" not in out.stdout


def test_every_subpackage_is_listed_for_setuptools():
    """pyproject.toml lists the packages by hand: one left out installs editable but is missing
    from a wheel (``entropy-gpu`` fails there with ModuleNotFoundError)."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "entropy_gpu").rglob("__init__.py") if "kernels" not in init.parts}
    assert found | {"entropy_gpu.kernels"} == listed


def test_every_test_file_the_docs_and_code_name_exists():
    """Test files moved with the package folders (tests/ mirrors them); a path that names one
    must name where it is."""
    import re

    named = re.compile(r"(?<![\w/])tests/[\w/]+\.py")
    missing = []
    for folder in ("docs", "entropy_gpu", "benchmarks", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".sh"):
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    missing += [f"{path.relative_to(ROOT)}:{number}: {m}" for m in named.findall(line)
                                if not (ROOT / m).is_file()]
    for path in (ROOT / "README.md",):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            missing += [f"README.md:{number}: {m}" for m in named.findall(line) if not (ROOT / m).is_file()]
    assert not missing, "\n".join(missing)


def test_the_docs_extra_is_pinned_and_ci_builds_the_site_strictly():
    """scripts/test.sh (what CI runs) installs the ``docs`` extra through scripts/setup.sh,
    which pins every install to scripts/constraints.txt, and builds the site with --strict."""
    import re

    tomllib = pytest.importorskip("tomllib")
    docs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    normalize = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    constraints = (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
    pinned = {normalize(line.split("==")[0]) for line in constraints if "==" in line}
    wanted = {normalize(re.match(r"[\w.-]+", req).group(0)) for req in docs} | {"mkdocstrings-python"}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= wanted and wanted <= pinned, wanted - pinned
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    setup_line = next(line for line in test_sh.splitlines() if line.startswith("bash scripts/setup.sh"))
    assert "docs" in setup_line.split()[-1].split(",")
    assert re.search(r"^[^#\n]*mkdocs build --strict", test_sh, re.M)
