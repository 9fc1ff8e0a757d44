"""The README runs as written: every ```python block executes as it stands (each in a
fresh namespace, in a temporary folder, offline), and every ``entropy-gpu`` command in
its shell blocks parses with the current CLI.

A block that cannot run in CI (it needs a GPU or a long run) is preceded by
``<!-- readme-test: skip (reason) -->``; use it sparingly, and always with a reason.
Blocks that load the bundled SmolLM2 share one loaded copy (loading it takes about
20 s of CPU); everything else in a block runs as written.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
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


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b[1] == "python"]
SHELL = [b for b in BLOCKS if b[1] in ("bash", "sh", "shell", "console")]


def test_the_readme_has_python_and_shell_blocks():
    assert len(PYTHON) >= 5 and len(SHELL) >= 3
    assert sum(1 for b in PYTHON if b[3]) <= 2, "skip markers are for the rare block that cannot run in CI"


def test_block_parser_sees_skip_markers_and_languages():
    text = "intro\n<!-- readme-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
    assert readme_blocks(text) == [(3, "python", "x = 1\n", "needs a GPU"), (7, "bash", "ls\n", None)]


@pytest.fixture
def offline(monkeypatch):
    """Fail any connection to a non-loopback address (the README promises offline runs)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"README block made a network connection to {address}")
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


@pytest.mark.parametrize("line,code,skip",
                         [pytest.param(b[0], b[2], b[3], id=f"README.md:{b[0]}") for b in PYTHON])
def test_python_block_runs(line, code, skip, tmp_path, monkeypatch, offline):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
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
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:  # leave no process group of the block's behind for the tests that follow
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _cli_commands() -> list[tuple[int, list[str]]]:
    """``entropy-gpu ...`` commands of the shell blocks (continuations joined)."""
    commands = []
    for line, _, code, _ in SHELL:
        text = re.sub(r"\\\n\s*", " ", code)
        for k, row in enumerate(text.splitlines()):
            row = row.split(" #")[0].strip()
            m = re.search(r"(?:^|\s|/)entropy-gpu(\s.*)?$", row)
            if m and not row.startswith("#"):
                commands.append((line + 1 + k, shlex.split(m.group(1) or "")))
    return commands


def test_readme_cli_commands_parse(capsys):
    from entropy_gpu.cli import build_parser

    commands = _cli_commands()
    assert len(commands) >= 4
    parser = build_parser()
    for line, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version exit 0
            if exc.code == 0:
                continue
            pytest.fail(f"README.md:{line}: `entropy-gpu {' '.join(argv)}` does not parse (exit {exc.code})")


def test_key_shell_commands_run():
    """The installed console script, as the README's commands call it."""
    script = Path(sys.executable).with_name("entropy-gpu")
    if not script.exists():
        pytest.skip("entropy-gpu console script not installed next to this python")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and re.fullmatch(r"entropy-gpu \d+\.\d+\.\d+\S*\n", version.stdout)
    floors = subprocess.run([str(script), "bench", "--case", "forward", "--shape", "8192x151936", "--dtype",
                             "bf16", "--floors", "3000"], capture_output=True, text=True, timeout=120)
    assert floors.returncode == 0, floors.stderr
    assert "8192x151936" in floors.stdout and floors.stderr == ""
