"""``--threads`` on every command that computes, defaulting to the cores the current load
leaves idle (issue 20, item 3): more OpenMP threads than idle cores stall each other."""

from __future__ import annotations

import json
import os

import pytest
import torch

from entropy_gpu import cpu_threads
from entropy_gpu.cli import build_parser, main

COMMANDS = {
    "demo": [], "bench": [], "sia": [], "sia-bench": [], "grad-report": ["--out", "x"],
}


@pytest.fixture
def keep_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))  # use_cpu_threads sets it; restored after
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_computing_command_takes_threads_defaulting_to_the_idle_choice(command):
    parser = build_parser()
    assert parser.parse_args([command, *COMMANDS[command]]).threads in (None, 0)
    assert parser.parse_args([command, *COMMANDS[command], "--threads", "3"]).threads == 3


def test_use_cpu_threads_follows_the_load_unless_asked(keep_threads, monkeypatch):
    monkeypatch.setattr(cpu_threads, "load_average", lambda: [1.0, 1.0, 1.0])
    monkeypatch.setattr(cpu_threads, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    line = cpu_threads.use_cpu_threads(None, "cpu")
    assert torch.get_num_threads() == 1 and "leaves 1 idle" in line
    assert os.environ["OMP_NUM_THREADS"] == "1"  # child processes too
    torch.set_num_threads(2)
    assert cpu_threads.use_cpu_threads(2, "cpu") == "torch threads: 2 (--threads)"
    assert torch.get_num_threads() == 2
    assert cpu_threads.use_cpu_threads(None, "cuda") is None  # another device: left alone


@pytest.mark.parametrize("command", ["sia", "sia-bench", "demo"])
def test_threads_below_one_is_a_user_error(command, capsys):
    assert main([command, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_sia_runs_with_the_threads_asked_for(cli_model, tmp_path, keep_threads, capsys):
    out = tmp_path / "run"
    assert main(["sia", "--model", cli_model, "--dataset", "gsm8k", "--limit", "1", "--out", str(out),
                 "--bootstrap", "10", "--threads", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["run"]["threads"] == 1
    assert "torch threads: 1 (--threads)" in capsys.readouterr().out
