"""Scaling and fault tolerance of the long analyses (entropy_gpu.analysis.runs):

- the record log: durable appends, a torn last line cut off on reopen, no duplicates,
  a stored run config that refuses to mix results;
- ``entropy-gpu sia`` and ``grad-report`` under ``torchrun`` with 2 real gloo processes
  write exactly the files of a one-process run on the same traces;
- a real ``entropy-gpu sia`` process SIGKILLed in the middle of writing a record, then
  rerun: nothing lost but the record in flight, nothing duplicated, the same outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from entropy_gpu.analysis.runs import (
    CRASH_AFTER_ENV,
    CRASH_TORN_ENV,
    RecordLog,
    check_run_config,
    config_differences,
    read_records,
)
from entropy_gpu.cli import main

# ---------------------------------------------------------------- the record log

def test_record_log_appends_resumes_and_refuses_duplicates(tmp_path):
    log = RecordLog(tmp_path)
    log.append({"index": 2, "x": 1.5})
    log.append({"index": 0, "x": [1, 2]})
    with pytest.raises(ValueError, match="already"):
        log.append({"index": 2, "x": 0})
    log.close()
    again = RecordLog(tmp_path)
    assert again.done == {0, 2} and 0 in again and 1 not in again
    assert [r["index"] for r in again.gathered()] == [0, 2]  # by index, not by file order


def test_torn_last_line_is_dropped_and_cut_off(tmp_path):
    log = RecordLog(tmp_path)
    for i in range(3):
        log.append({"index": i, "text": "é" * 10})
    log.close()
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + b'{"index": 3, "text": "\xc3')  # a kill in the middle of a record
    assert [r["index"] for r in read_records(log.path)] == [0, 1, 2]
    again = RecordLog(tmp_path)
    assert again.done == {0, 1, 2} and log.path.read_bytes() == whole  # the fragment is gone
    again.append({"index": 3, "text": "x"})
    again.close()
    assert [r["index"] for r in read_records(log.path)] == [0, 1, 2, 3]


def test_corrupt_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"part.jsonl:2: corrupt"):
        list(read_records(path))


def test_run_config_mismatch_refuses_unless_overwrite(tmp_path):
    check_run_config(tmp_path, {"model": "a", "limit": 3})
    RecordLog(tmp_path).append({"index": 0})
    check_run_config(tmp_path, {"model": "a", "limit": 3})  # same config: resume, records kept
    assert RecordLog(tmp_path).done == {0}
    with pytest.raises(ValueError, match=r"differs in: limit: 3 -> 4\).*--overwrite"):
        check_run_config(tmp_path, {"model": "a", "limit": 4})
    check_run_config(tmp_path, {"model": "a", "limit": 4}, overwrite=True)
    assert RecordLog(tmp_path).done == set()
    assert json.loads((tmp_path / "run.json").read_text()) == {"model": "a", "limit": 4}


def test_run_config_differences_name_the_flags():
    stored = {"model": "m", "traces": "gold", "generation": None,
              "config": {"estimator": "next_token", "probe": "\nThe answer is", "every": 4, "pattern": None}}
    config = {"model": "m", "traces": "greedy", "generation": {"engine": "hf", "batch_size": 8},
              "config": {"estimator": "sampled", "probe": "\nSo", "every": 4, "pattern": "x"}, "new": 1}
    flags = {"traces": "--traces", "generation.engine": "--engine", "generation.batch_size": "--batch-size",
             "config.estimator": "--estimator", "config.probe": "--probe", "config.pattern": "--pattern"}
    assert config_differences(stored, config, flags) == [
        "--estimator: next_token -> sampled", "--pattern: null -> x",
        '--probe: "\\nThe answer is" -> "\\nSo"',
        "--batch-size: (not set) -> 8", "--engine: (not set) -> hf", "--traces: gold -> greedy",
        "new: (not set) -> 1"]
    assert config_differences(stored, stored, flags) == []


# ---------------------------------------------------------------- real runs

def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _cli(args: list[str], *, nproc: int = 1, env: dict | None = None, timeout: float = 300):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    launcher = torchrun if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + ["-m", "entropy_gpu.cli", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _in_process(args: list[str]) -> None:
    """One-process reference run here, with the thread count the subprocesses use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def _sia_outputs(out) -> tuple[str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("run")  # wall time, world size, records resumed: how this invocation ran
    return (out / "curves.jsonl").read_text(), summary


SIA_SAMPLED = ["sia", "--dataset", "gsm8k", "--limit", "5", "--traces", "sampled", "--max-new-tokens", "8",
               "--batch-size", "2", "--segment", "tokens", "--every", "3", "--bootstrap", "30",
               "--no-progress"]


@pytest.mark.distributed
def test_sia_two_ranks_equal_one_process(cli_model, tmp_path):
    """Sampled traces (generation batches of 2: rank 0 gets problems 0, 1, 4, rank 1 gets 2, 3)."""
    args = SIA_SAMPLED + ["--model", cli_model]
    proc = _cli(args + ["--out", str(tmp_path / "two")], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("traces:") == 1  # rank 0 alone reports
    _in_process(args + ["--out", str(tmp_path / "one")])
    two, one = _sia_outputs(tmp_path / "two"), _sia_outputs(tmp_path / "one")
    records = [json.loads(line) for line in one[0].splitlines()]
    assert one[1]["n_traces"] + len(one[1]["skipped_empty_traces"]) == 5 and len(records) >= 2
    assert two[0] == one[0]  # the same records, byte for byte, in problem order
    assert two[1] == one[1]
    parts = sorted(p.name for p in (tmp_path / "two" / "records").iterdir())
    assert parts == ["records.rank0.jsonl", "records.rank1.jsonl"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["run"]["world_size"] == 2


@pytest.mark.distributed
def test_grad_report_two_ranks_equal_one_process(tmp_path):
    from entropy_gpu.analysis.models import load_tokenizer, tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=49152, hidden_size=32, layers=2, heads=2).save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)
    args = ["grad-report", "--model", str(model_dir), "--prompt", "What is 2+3?",
            "--prompt", "Name a colour.", "--prompt", "Count to three.", "--max-new-tokens", "5",
            "--norms", "fro", "--quiet"]
    proc = _cli(args + ["--out", str(tmp_path / "two")], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _in_process(args + ["--out", str(tmp_path / "one")])

    def outputs(out):
        summary = json.loads((out / "summary.json").read_text())
        for key in ("seconds_sampling", "seconds_measuring", "seconds_per_token", "threads"):
            summary["config"].pop(key)
        return (out / "tokens.jsonl").read_text(), summary

    two, one = outputs(tmp_path / "two"), outputs(tmp_path / "one")
    assert two[0] == one[0] and two[1] == one[1]
    assert one[1]["config"]["n_responses"] == 3
    # Resume: a lost record is made again, the others are kept; the report does not change.
    part = tmp_path / "one" / "records" / "records.rank0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]))
    _in_process(args + ["--out", str(tmp_path / "one")])
    assert [r["index"] for r in read_records(part)] == [0, 1, 2]
    assert outputs(tmp_path / "one") == one


SIA_GOLD = ["sia", "--dataset", "gsm8k", "--limit", "4", "--segment", "tokens", "--every", "4",
            "--bootstrap", "30", "--random-twin", "--no-progress"]


def test_sia_killed_mid_write_resumes_to_the_same_outputs(cli_model, tmp_path):
    args = SIA_GOLD + ["--model", cli_model]
    out = tmp_path / "run"
    # SIGKILL while the 3rd record is half written.
    proc = _cli(args + ["--out", str(out)], env=_env(**{CRASH_AFTER_ENV: "2", CRASH_TORN_ENV: "1"}))
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    part = out / "records" / "records.rank0.jsonl"
    raw = part.read_bytes()
    assert raw.count(b"\n") == 2 and not raw.endswith(b"\n")  # 2 records, then a torn one
    assert not (out / "curves.jsonl").exists()

    _in_process(args + ["--out", str(out)])  # the same arguments: resume
    records = list(read_records(part))
    assert [r["index"] for r in records] == [0, 1, 2, 3]  # the torn record was made again, once
    _in_process(args + ["--out", str(tmp_path / "clean")])
    assert _sia_outputs(out) == _sia_outputs(tmp_path / "clean")
    assert _sia_outputs(out / "random_twin") == _sia_outputs(tmp_path / "clean" / "random_twin")
    assert json.loads((out / "summary.json").read_text())["run"]["records_resumed"] == 2

    # Other arguments: refused, one line, exit 2; --overwrite starts over.
    proc = _cli(args + ["--out", str(out), "--every", "5"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "differs in: --every: 4 -> 5)" in proc.stderr and "--overwrite" in proc.stderr
    _in_process(args + ["--out", str(out), "--every", "5", "--overwrite"])
    assert json.loads((out / "run.json").read_text())["config"]["every"] == 5
    assert json.loads((out / "summary.json").read_text())["run"]["records_resumed"] == 0
