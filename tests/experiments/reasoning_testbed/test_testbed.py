"""The testbed end to end on a micro config: SFT resumes bit for bit, the CLI's one-line errors,
the whole pipeline with every arm, a killed RL run that resumes, and the report."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entropy_gpu.analysis.runs import code_commit
from entropy_gpu.experiments.reasoning_testbed.__main__ import main
from entropy_gpu.experiments.reasoning_testbed.config import TestbedConfig as Config
from entropy_gpu.experiments.reasoning_testbed.policy import ModelShape, load_policy
from entropy_gpu.experiments.reasoning_testbed.rl import CRASH_AFTER_STEPS_ENV, NullReward
from entropy_gpu.experiments.reasoning_testbed.sft import SFTConfig, train_sft

ROOT = Path(__file__).resolve().parents[3]
MICRO = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "difficulties": [2],
    "max_new_tokens": 24,
    "sft_steps": 4,
    "sft_batch_size": 4,
    "sft_save_every": 2,
    "observe_heldout": 8,
    "observe_probe_problems": 4,
    "observe_sia_problems": 2,
    "arms": [
        "grpo",
        "corrpo",
        "corrpo_flipped",
        "entropy_bonus",
        "null",
        "corrpo_exact",
        "grpo_group",
        "corrpo_group",
    ],
    "seeds": [0],
    "rl_steps": 2,
    "prompts_per_step": 2,
    "num_generations": 2,
    "save_every": 1,
    "eval_every": 2,
    "heldout_n": 8,
    "probe_problems": 4,
}


def test_sft_resume_is_bit_for_bit(tmp_path):
    shape = ModelShape(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = SFTConfig(steps=4, batch_size=4, save_every=2, quick_eval_problems=2)
    train_sft(config, shape, (2,), tmp_path / "straight", max_new_tokens=8, progress=False)
    train_sft(
        SFTConfig(steps=2, batch_size=4, save_every=2, quick_eval_problems=2),
        shape,
        (2,),
        tmp_path / "resumed",
        max_new_tokens=8,
        progress=False,
    )
    train_sft(config, shape, (2,), tmp_path / "resumed", max_new_tokens=8, progress=False)
    a, _ = load_policy(tmp_path / "straight" / "checkpoint-4")
    b, _ = load_policy(tmp_path / "resumed" / "checkpoint-4")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "straight" / "checkpoint-0").is_dir()  # the random initialisation is observed too


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "missing.json", "--out", "X"], "no such file"),
        (["--out", "X", "--shard", "2/2"], "expected I/N"),
        (["--config", "{bad}", "--out", "X"], "no such file"),
        (["--report-only", "--out", "nowhere"], "no testbed records"),
        ([], "--out is required"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,message",
    [
        ({"arms": ["grpo", "grpo"]}, "arms"),
        ({"seeds": []}, "seeds"),
        ({"num_generations": 1}, "num_generations"),
        ({"start_step": 3}, "start_step"),
        ({"measure": "x"}, "measure"),
        ({"typo": 1}, "unknown config keys"),
    ],
)
def test_bad_config_values(change, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**MICRO, **change}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "sft").exists()  # refused before any work


def test_null_reward_depends_on_seed_and_step_only():
    a, b = NullReward(0.3, seed=1), NullReward(0.3, seed=1)
    a.reseed_for_step(5, 1)
    first = a(None, [0] * 64)
    b.reseed_for_step(5, 1)
    assert b(None, [0] * 64) == first
    assert abs(torch.tensor(first).std().item() - 0.3) < 0.1


def test_every_stage_every_arm_a_killed_run_resumes_and_the_report(tmp_path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_AFTER_STEPS_ENV: "1"}
    command = [
        sys.executable,
        "-m",
        "entropy_gpu.experiments.reasoning_testbed",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
    ]
    killed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after the first RL step
    first = out / "runs" / "grpo-s0"
    assert [json.loads(x)["step"] for x in (first / "steps.jsonl").read_text().splitlines()] == [1]
    env.pop(CRASH_AFTER_STEPS_ENV)
    command.remove("--no-progress")  # the resumed run shows its progress: lines and bars, not log dicts
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "arm corrpo, seed 0" in done.stdout and "2/2 [" in done.stderr
    assert "grad_norm" not in done.stdout + done.stderr
    for arm in MICRO["arms"]:
        run = out / "runs" / f"{arm}-s0"
        assert (run / "done.json").is_file() and not list(run.glob("checkpoint-*"))
        done_record = json.loads((run / "done.json").read_text())
        assert done_record["commit"] == code_commit()["commit"] and len(done_record["commit"]) == 40
        assert done_record["command"] == shlex.join(["python", *command[1:]])
        assert [json.loads(x)["step"] for x in (run / "steps.jsonl").read_text().splitlines()] == [1, 2]
        evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 2] and evals[-1]["heldout_n"] == 8
        assert not (run / "README.md").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["sft_step"] for r in summary["observe"]] == [0, 2, 4]
    assert set(summary["rl"]["arms"]) == set(MICRO["arms"])
    assert "corrpo - grpo" in summary["rl"]["paired"]
    for name in ("summary.md", "observe.png", "rl_curves.png", "rl_paired.png"):
        assert (out / name).is_file()
    # The step-0 evaluation is the starting policy's, shared by every run.
    start = json.loads((out / "start" / "evaluation.json").read_text())
    assert (
        start["acc_sampled"] == json.loads((first / "evals.jsonl").read_text().splitlines()[0])["acc_sampled"]
    )
    # A different config in the same folder is refused in one line.
    (tmp_path / "other.json").write_text(json.dumps({**MICRO, "coef": 0.2}))
    other = subprocess.run(
        command[:4] + [str(tmp_path / "other.json"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 2 and "coef" in other.stderr and "Traceback" not in other.stderr


def test_config_defaults_are_the_documented_experiment():
    shipped = json.loads((ROOT / "examples" / "reasoning_testbed" / "cpu.json").read_text())
    config = Config(**shipped)
    assert len(config.seeds) >= 8 and config.rl_steps >= 200 and config.heldout_n >= 1000
    assert config.probe_problems >= 64
