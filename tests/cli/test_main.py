"""What a new user sees from ``entropy-gpu``: offline unless asked, every user error one
line on stderr with exit code 2 and no traceback, reported before any model is loaded,
help texts with defaults, ``--version``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import entropy_gpu
import entropy_gpu.analysis.models as models
from entropy_gpu.cli import build_parser, main
from entropy_gpu.cli.support import OFFLINE_ENV, UsageError

ROOT = Path(__file__).resolve().parents[2]
GUARD = Path(__file__).resolve().parent / "cli_guard.py"


def user_env(**extra) -> dict:
    """The environment of a user who set nothing: no offline variables (the test
    session sets HF_HUB_OFFLINE, which would hide a CLI that forgets to)."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k != "ENTROPY_GPU_ALLOW_DOWNLOAD"}
    env.update(**extra)
    return env


def run_guarded(*argv: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GUARD), *argv], capture_output=True, text=True,
                          timeout=timeout, env=user_env(**env), cwd=ROOT)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("entropy-gpu ") and ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- in a fresh process


@pytest.mark.parametrize("argv,fragments", [
    (["sia", "--model", "mymodels/llama-7b", "--limit", "1"],
     ["--model mymodels/llama-7b", "--allow-download"]),
    (["grad-report", "--model", "/no/such/model", "--out", "OUT"],
     ["--model /no/such/model", "no such path"]),
    (["bench", "--shape", "0x10"], ["--shape", "'0x10'"]),
    (["bench", "--shape", "20000000x262144", "--case", "forward", "--dtype", "fp32", "--impl", "entropy_gpu",
      "--repeats", "1", "--no-memory"], ["--shape 20000000x262144", "inputs alone"]),
])
def test_user_error_in_a_fresh_process_is_one_line_offline_and_before_model_load(argv, fragments, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    if argv[0] == "sia":
        argv += ["--out", str(tmp_path / "sia")]
    done = run_guarded(*argv)
    assert "NETWORK" not in done.stderr and "MODEL LOAD" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, *fragments)


def test_a_real_run_makes_no_network_call(cli_model, tmp_path):
    """A whole (tiny) SIA run under the tripwire, with none of the offline variables set."""
    out = tmp_path / "run"
    done = run_guarded("sia", "--model", cli_model, "--limit", "1", "--bootstrap", "10", "--no-progress",
                       "--out", str(out), CLI_GUARD_ALLOW_LOAD="1")
    assert done.returncode == 0, done.stderr
    assert "NETWORK" not in done.stderr
    assert json.loads((out / "summary.json").read_text())["n_traces"] == 1


def test_example_refuses_an_unknown_model_offline(tmp_path):
    code = ("import runpy, sys; sys.path.insert(0, 'tests/cli'); import cli_guard; cli_guard.install(); "
            "sys.argv = ['corrpo_trl.py', '--model', 'mymodels/llama-7b']; "
            "runpy.run_path('examples/corrpo_trl.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=user_env(), cwd=ROOT)
    assert "NETWORK" not in done.stderr, done.stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--model mymodels/llama-7b" in done.stderr and "--allow-download" in done.stderr


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("/", "_").removesuffix(".py"),
                                                  ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,fragment", [
    (["--coef", "nan"], "--coef"),
    (["--coef", "inf"], "--coef"),
    (["--k", "0"], "--k"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--temperature", "-1"], "--temperature"),
    (["--output-dir", "UNDER_FILE"], "--output-dir"),
])
def test_corrpo_example_bad_flags_are_argparse_errors(argv, fragment, tmp_path, capsys, tripwires):
    example = _load_example("corrpo_trl.py")
    argv = [str(Path(_a_file(tmp_path)) / "sub") if a == "UNDER_FILE" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        example.main([*argv, "--output-dir", str(tmp_path / "out")] if "--output-dir" not in argv else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " + fragment in err, err


# --------------------------------------------------------------------------- in process


@pytest.fixture
def tripwires(monkeypatch):
    """No network, and no model load: a user error must come first."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network connection to {address}")
        return real_connect(self, address)

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the user error was reported")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(models, "load_model", load_model)


def _a_file(tmp_path) -> str:
    path = tmp_path / "a-file"
    path.write_text("x")
    return str(path)


CUDA = torch.cuda.is_available()
USER_ERRORS = [
    # (argv, fragments of the one line); FILE: a regular file, UNDER_FILE: a path below it
    (["sia", "--limit", "-3"], ["--limit must be >= 0, got -3"]),
    (["sia", "--out", "FILE"], ["--out", "not a folder"]),
    (["sia", "--out", "UNDER_FILE"], ["--out", "cannot write there"]),
    (["sia", "--device", "tpu"], ["--device tpu"]),
    (["sia", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["sia", "--num-samples", "1"], ["--num-samples must be >= 2"]),
    (["sia", "--grid-points", "1"], ["--grid-points must be >= 2"]),
    (["sia", "--bootstrap", "0"], ["--bootstrap must be >= 1"]),
    (["sia", "--gen-temperature", "0"], ["--gen-temperature"]),
    (["sia", "--segment", "regex"], ["--segment regex needs --pattern"]),
    (["sia", "--segment", "regex", "--pattern", "("], ["--pattern", "not a valid regex"]),
    (["sia", "--segment", "tokens"], ["--every"]),
    (["sia", "--dataset", "nope"], ["--dataset nope", "unknown dataset"]),
    (["sia", "--dataset", "my.jsonl"], ["--dataset my.jsonl: no such file"]),
    (["sia", "--dataset", "data/problems"], ["--dataset data/problems: no such file"]),
    (["sia", "--dataset", "DIR"], ["--dataset", "is a folder"]),
    (["sia", "--pattern", "x"], ["--pattern", "--segment regex", "--segment sentence"]),
    (["sia", "--every", "8"], ["--every", "--segment tokens"]),
    (["sia-bench", "--pattern", "x"], ["--pattern", "--segment regex", "--segment tokens"]),
    (["sia", "--engine", "vllm", "--traces", "gold"], ["--engine vllm", "--traces gold"]),
    (["sia", "--engine", "vllm"], ["--engine vllm", "--traces gold"]),  # auto: gsm8k has gold traces
    (["sia", "--dataset", "gsm8k", "--estimator", "choices"], ["--estimator choices", "next_token"]),
    (["sia", "--dataset", "arc_easy", "--traces", "gold"], ["--traces gold", "--traces greedy"]),
    (["sia", "--dataset", "arc_easy", "--split", "train"], ["--split"]),
    (["sia", "--model", "mymodels/llama-7b"], ["--model mymodels/llama-7b", "--allow-download"]),
    (["sia-bench", "--repeats", "0"], ["--repeats must be >= 1"]),
    (["sia-bench", "--traces", "greedy"], ["--traces must be gold"]),
    (["sia-bench", "--dataset", "arc_easy"], ["--traces gold", "arc_easy"]),
    (["bench", "--repeats", "0"], ["--repeats must be >= 1, got 0"]),
    (["bench", "--threads", "0"], ["--threads must be >= 1"]),
    (["bench", "--rep-ms", "0"], ["--rep-ms"]),
    (["bench", "--shape", "8192"], ["--shape takes NxV"]),
    (["bench", "--shape", "8x-1"], ["--shape takes NxV"]),
    (["bench", "--linear-shape", "8x16"], ["--linear-shape takes NxHxV"]),
    (["bench", "--out-dir", "UNDER_FILE"], ["--out-dir"]),
    (["bench", "--device", "cuda:7"], ["--device cuda:7"]),
    (["bench", "--impl", "nosuchimpl"], ["--impl nosuchimpl", "matches no implementation", "eager torch"]),
    (["bench", "--impl", "eager", "nosuch"], ["--impl nosuch", "matches no implementation"]),
    (["bench", "--shape", "20000000x262144", "--case", "forward", "--dtype", "fp32", "--impl", "entropy_gpu",
      "--repeats", "1", "--no-memory"], ["--shape 20000000x262144 (forward, fp32)", "inputs alone", "GB"]),
    (["bench", "--case", "linear", "--linear-shape", "4000000x100000x262144", "--dtype", "bf16"],
     ["--linear-shape 4000000x100000x262144 (linear, bf16)", "use a smaller shape"]),
    (["grad-report", "--out", "OUT", "--prompts", "0"], ["--prompts must be >= 1"]),
    (["grad-report", "--out", "OUT", "--temperature", "0"], ["--temperature"]),
    (["grad-report", "--out", "OUT", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["grad-report", "--out", "OUT", "--model", "./missing-model"], ["--model ./missing-model"]),
    (["grad-report", "--out", "UNDER_FILE"], ["--out"]),
    (["demo", "--repeats", "0"], ["--repeats must be >= 1"]),
    (["demo", "--device", "cuda" if not CUDA else "cuda:99"], ["--device"]),
]


@pytest.mark.parametrize("argv,fragments", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_exit_2_before_any_work(argv, fragments, tmp_path, capsys, tripwires):
    replace = {"FILE": _a_file(tmp_path), "UNDER_FILE": str(Path(_a_file(tmp_path)) / "sub"),
               "OUT": str(tmp_path / "out"), "DIR": str(tmp_path)}
    argv = [replace.get(a, a) for a in argv]
    if argv[0] in ("sia",) and "--out" not in argv:
        argv += ["--out", str(tmp_path / "sia")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *fragments)
    assert "loading" not in captured.out


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--dtype", "fp8"])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "--dtype", "fp8", "--help")


def test_debug_shows_the_traceback(tripwires):
    with pytest.raises(UsageError, match="--repeats"):
        main(["bench", "--repeats", "0", "--debug"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"entropy-gpu {entropy_gpu.__version__}"


def test_help_shows_defaults_and_no_markup():
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "--version" in top
    sub = {name: p for a in parser._subparsers._group_actions for name, p in a.choices.items()}
    assert set(sub) == {"demo", "bench", "grad-report", "sia", "sia-bench"}
    for name, p in sub.items():
        text = p.format_help()
        assert "(default:" in text and "--debug" in text and "--allow-download" in text, name
    assert "(default: 20)" in sub["sia"].format_help()  # --limit
    assert "seed of the random inputs (default: 0)" in " ".join(sub["bench"].format_help().split())
    assert "(default: '\\nThe answer is')" in " ".join(sub["sia"].format_help().split())
    case_help = " ".join(sub["bench"].format_help().split())
    assert "forward_backward: also the logits gradient" in case_help
    assert "once our API provides" not in case_help


def test_every_flag_has_help_that_names_only_flags_of_its_command():
    import re

    parser = build_parser()
    sub = {name: p for a in parser._subparsers._group_actions for name, p in a.choices.items()}
    for name, p in sub.items():
        flags = {s for a in p._actions for s in a.option_strings}
        for action in p._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", action.help))
            assert named <= flags, (name, action.option_strings, named - flags)


def test_probe_decodes_escapes_as_its_help_shows_them():
    parser = build_parser()
    for command in ("sia", "sia-bench"):
        args = parser.parse_args([command, "--probe", "\\nSo the answer is", "--answer-prefix", "\\t"])
        assert args.probe == "\nSo the answer is" and args.answer_prefix == "\t"
        assert parser.parse_args([command, "--probe", "a\\\\nb"]).probe == "a\\nb"  # \\ is one backslash
        assert parser.parse_args([command, "--probe", "\u00e9 \\q"]).probe == "\u00e9 \\q"  # others kept
        assert parser.parse_args([command]).probe == "\nThe answer is"
    sub = {name: p for a in parser._subparsers._group_actions for name, p in a.choices.items()}
    text = " ".join(sub["sia"].format_help().split())
    assert "--probe PROBE appended after each prefix (backslash escapes \\n" in text
    assert "(default: '\\nThe answer is')" in text


def test_offline_unless_asked(monkeypatch):
    for key in (*OFFLINE_ENV, "ENTROPY_GPU_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(key, raising=False)
    from entropy_gpu.cli.support import downloads_allowed, go_offline

    assert not downloads_allowed() and downloads_allowed(True)
    monkeypatch.setenv("ENTROPY_GPU_ALLOW_DOWNLOAD", "1")
    assert downloads_allowed()
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", False)
    go_offline()
    assert all(os.environ[k] == v for k, v in OFFLINE_ENV.items())
    assert hub.HF_HUB_OFFLINE and hub.HF_HUB_DISABLE_TELEMETRY
    for key in OFFLINE_ENV:  # go_offline set them; monkeypatch only restores what it touched
        monkeypatch.delenv(key, raising=False)


def test_resolve_model(tmp_path):
    assert models.resolve_model(str(tmp_path)) == "path"
    with pytest.raises(FileNotFoundError, match="no such path"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--allow-download"):
        models.resolve_model("someone/not-cached-model-xyz")
    assert models.resolve_model("someone/not-cached-model-xyz", allow_download=True) == "hub"
    with pytest.raises(ValueError, match="non-empty"):
        models.resolve_model("")


# --------------------------------------------------------------------------- SIA runs


def test_arc_default_traces_are_generated_and_correctness_is_reported(cli_model, tmp_path, capsys):
    out = tmp_path / "arc"
    assert main(["sia", "--model", cli_model, "--dataset", "arc_easy", "--limit", "2",
                 "--max-new-tokens", "4", "--bootstrap", "10", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["traces"] == "greedy"
    text = capsys.readouterr().out
    assert "--traces greedy" in text and "correct:" in text and "correctness: unknown" not in text


def test_empty_traces_are_skipped_and_counted(cli_model, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    rows = [{"id": "a", "question": "What is 2+3?", "answer": "5", "answer_kind": "number",
             "trace": "2 plus 3 is 5."},
            {"id": "b", "question": "What is 1+1?", "answer": "2", "answer_kind": "number", "trace": "  "},
            {"id": "c", "question": "What is 4+4?", "answer": "8", "answer_kind": "number",
             "trace": "4 and 4 make 8."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["sia", "--model", cli_model, "--dataset", str(data), "--bootstrap", "10", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_empty_traces"] == ["b"] and summary["n_traces"] == 2
    text = capsys.readouterr().out
    assert "skipped empty traces: 1" in text
    assert "correctness: unknown" in text and "correct: 0" not in text  # user traces without 'correct'
