"""The README and the documentation site (docs/, built by mkdocs) run as written: every
```python block executes as it stands (each in a fresh namespace, in a temporary folder,
offline), and every ``entropy-gpu`` command in their shell blocks parses with the current CLI.

A block that appears in several pages (the README's examples open the site's guide pages)
runs once. A block that cannot run in CI (it needs a GPU, a long run, or it is a fragment) is
preceded by ``<!-- docs-test: skip (reason) -->``; use it sparingly, and always with a reason.
Blocks that load the bundled SmolLM2 share one loaded copy (loading it takes about 20 s of
CPU); everything else in a block runs as written.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The site: every page under docs/ (the guide, the design notes, the API reference and the
# experiment records), as mkdocs.yml builds it.
PAGES = [README] + sorted((ROOT / "docs").rglob("*.md"))
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELLS = ("bash", "sh", "shell", "console")


def fenced_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(first line number, language, code, skip reason) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = [line for line in lines[max(0, start - 3):start] if line.strip()]
        skip = next((SKIP.search(line).group("reason") for line in before[-1:] if SKIP.search(line)), None)
        blocks.append((start + 1, m.group(1), "\n".join(body) + "\n", skip))
        i += 1
    return blocks


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def _python_blocks() -> list[tuple[str, str, str | None, list[str]]]:
    """(first place, code, skip reason, every place) of each distinct python block."""
    seen: dict[str, list] = {}
    for path in PAGES:
        for line, lang, code, skip in fenced_blocks(path.read_text(encoding="utf-8")):
            if lang != "python":
                continue
            entry = seen.setdefault(code, [_where(path, line), code, skip, []])
            entry[2] = entry[2] or skip
            entry[3].append(_where(path, line))
    return [tuple(entry) for entry in seen.values()]


PYTHON = _python_blocks()
SHELL = [(path, *block) for path in PAGES for block in fenced_blocks(path.read_text(encoding="utf-8"))
         if block[1] in SHELLS]


def test_the_readme_and_the_site_have_python_and_shell_blocks():
    readme = fenced_blocks(README.read_text(encoding="utf-8"))
    assert sum(b[1] == "python" for b in readme) >= 5 and sum(b[1] in SHELLS for b in readme) >= 3
    assert len(PYTHON) >= 12, "the guide pages hold the longer examples"
    assert sum(1 for b in PYTHON if b[2]) <= 3, "skip markers are for the rare block that cannot run in CI"


def test_block_parser_sees_skip_markers_and_languages():
    text = ("intro\n<!-- docs-test: skip (a fragment: f(...) is yours) -->\n```python\nx = 1\n```\n\n"
            "```bash\nls\n```\n")
    assert fenced_blocks(text) == [(3, "python", "x = 1\n", "a fragment: f(...) is yours"),
                                   (7, "bash", "ls\n", None)]


def test_the_readme_is_a_front_door():
    """At most 300 lines, the two set-up commands first, every relative link resolves (mkdocs
    checks the site's links; the README is not part of the site), and a complete Contents line."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    first_shell = next(code for _, lang, code, _ in fenced_blocks(text) if lang in SHELLS)
    assert "bash scripts/demo.sh" in first_shell and "bash scripts/test.sh" in first_shell
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert len(links) >= 20 and not broken, broken
    # The Contents line names every section (GitHub's heading anchors).
    contents = next(para for para in text.split("\n\n") if para.startswith("Contents:"))
    headings = re.findall(r"^## (.+)$", text, re.M)
    sections = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    assert set(re.findall(r"\]\(#([\w-]+)\)", contents)) == sections


@pytest.fixture
def offline(monkeypatch):
    """Fail any connection to a non-loopback address (the docs promise offline runs)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a docs block made a network connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


_LOADED: dict = {}


def _shared_load_model(real):
    def load_model(name="smollm2", **kwargs):
        key = (name, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key not in _LOADED:
            _LOADED[key] = real(name, **kwargs)
        model, tokenizer = _LOADED[key]
        return model.eval(), tokenizer
    return load_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_block(code: str, where: str, tmp_path: Path, monkeypatch) -> dict:
    """Run one block as a reader would, in ``tmp_path`` (also the temporary directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    import entropy_gpu.analysis.models as models

    monkeypatch.setattr(models, "load_model", _shared_load_model(models.load_model))
    if "init_process_group" in code:  # a block written for torchrun runs here as a one-process group
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(key, "1")
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    namespace = {"__name__": "__docs__"}
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:  # leave no process group of the block's behind for the tests that follow
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return namespace


@pytest.mark.parametrize("code,skip,places", [pytest.param(b[1], b[2], b[3], id=b[0]) for b in PYTHON])
def test_python_block_runs(code, skip, places, tmp_path, monkeypatch, offline):
    if skip:
        pytest.skip(skip)
    _run_block(code, places[0], tmp_path, monkeypatch)
    # Examples leave no checkpoint behind (a reader runs them as they are).
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    assert not written, f"{places[0]} wrote {written}"


def test_blocks_use_no_fixed_temporary_paths():
    fixed = [b[0] for b in PYTHON if re.search(r"[\"']/tmp/", b[1])]
    assert not fixed, f"use tempfile, not a fixed /tmp path: {fixed}"


def test_the_correlation_example_gives_the_fused_calls_numbers(tmp_path, monkeypatch):
    """The README's "any two tensors" line correlates the tokens the fused call uses (a
    mask), not every token: ignored prompt tokens have nll_grad_norm = 0."""
    import torch

    import entropy_gpu

    code, places = next((b[1], b[3]) for b in PYTHON if "segment_pearson(" in b[1] and "README.md" in b[3][0])
    ns = _run_block(code, places[0], tmp_path, monkeypatch)
    seg, rho = ns["seg"], ns["rho"]
    assert rho.valid.sum() >= 2
    assert torch.equal(seg.valid, rho.valid) and torch.equal(seg.n, rho.n)
    assert torch.allclose(seg.corr, rho.corr, atol=1e-6, equal_nan=True)
    # The example's data make the mask matter: without it the numbers differ.
    unmasked = entropy_gpu.segment_pearson(ns["stats"].entropy, ns["stats"].nll_grad_norm, ns["cu_seqlens"])
    assert not torch.equal(unmasked.n, rho.n)
    assert (unmasked.corr[rho.valid] - rho.corr[rho.valid]).abs().max() > 1e-3


def test_every_corrpo_metric_is_explained():
    """docs/usage/corrpo-metrics.md names every ``corrpo/*`` key the package can log: those
    ``corrpo_from_stats`` returns for each measure, and any other literal in the code."""
    import torch

    from entropy_gpu.corrpo import GRADIENT_MEASURES, PARAM_GRAD_MEASURE, CorrPOConfig, corrpo_from_stats

    keys = set()
    for measure in (*GRADIENT_MEASURES, PARAM_GRAD_MEASURE):
        entropy, grad = torch.rand(4, 6), torch.rand(4, 6)
        out = corrpo_from_stats(entropy, grad, rewards=torch.rand(4), group_size=2,
                                config=CorrPOConfig(measure=measure))
        keys |= set(out.metrics)
    for path in (ROOT / "entropy_gpu").rglob("*.py"):
        keys |= set(re.findall(r"[\"'](corrpo/[a-z_]+)[\"']", path.read_text(encoding="utf-8")))
    page = (ROOT / "docs" / "usage" / "corrpo-metrics.md").read_text(encoding="utf-8")
    explained = set(re.findall(r"^\| `(corrpo/[a-z_]+)` \|", page, re.M))
    assert len(keys) >= 9 and keys <= explained, sorted(keys - explained)


def test_the_api_reference_covers_the_public_api():
    """Every function and class ``entropy_gpu`` exports has its entry in docs/reference/."""
    import inspect

    import entropy_gpu

    reference = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: entropy_gpu\.(\w+)\s*$", reference, re.M))
    public = {name for name in entropy_gpu.__all__
              if inspect.isclass(getattr(entropy_gpu, name)) or callable(getattr(entropy_gpu, name))}
    assert len(public) >= 20 and public <= documented, sorted(public - documented)


def _cli_commands() -> list[tuple[str, list[str]]]:
    """``entropy-gpu ...`` commands of the shell blocks (continuations joined)."""
    commands = []
    for path, line, _, code, _ in SHELL:
        text = re.sub(r"\\\n\s*", " ", code)
        for k, row in enumerate(text.splitlines()):
            row = row.split(" #")[0].strip()
            m = re.search(r"(?:^|\s|/)entropy-gpu(\s.*)?$", row)
            if m and not row.startswith("#"):
                commands.append((_where(path, line + 1 + k), shlex.split(m.group(1) or "")))
    return commands


def test_documented_cli_commands_parse(capsys):
    from entropy_gpu.cli import build_parser

    commands = _cli_commands()
    assert len(commands) >= 10
    parser = build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version exit 0
            if exc.code == 0:
                continue
            pytest.fail(f"{where}: `entropy-gpu {' '.join(argv)}` does not parse (exit {exc.code})")


def test_key_shell_commands_run():
    """The installed console script, as the documented commands call it."""
    script = Path(sys.executable).with_name("entropy-gpu")
    if not script.exists():
        pytest.skip("entropy-gpu console script not installed next to this python")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and re.fullmatch(r"entropy-gpu \d+\.\d+\.\d+\S*\n", version.stdout)
    floors = subprocess.run([str(script), "bench", "--case", "forward", "--shape", "8192x151936", "--dtype",
                             "bf16", "--floors", "3000"], capture_output=True, text=True, timeout=120)
    assert floors.returncode == 0, floors.stderr
    assert "8192x151936" in floors.stdout and floors.stderr == ""
