"""The CorR-PO training experiment (entropy_gpu.experiments.corrpo_training): a tiny random
Llama through real TRL GRPO steps in every arm, resume after a SIGKILL, the task and the
report's statistics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from entropy_gpu.corrpo import CorrPOConfig, corrpo_term
from entropy_gpu.experiments import corrpo_report
from entropy_gpu.experiments.corrpo_training import (
    ARMS,
    CRASH_AFTER_STEPS_ENV,
    ExperimentConfig,
    addition_problems,
    corrpo_config,
    degeneration,
    is_correct,
    main,
    reward_weights,
)

TINY = {"model": "tiny", "seeds": [0], "steps": 2, "prompts_per_step": 2, "num_generations": 2,
        "max_completion_length": 5, "heldout": 3, "eval_every": 2, "eval_samples": 1, "probe_prompts": 2,
        "probe_samples": 1}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(config: dict, out: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "entropy_gpu.experiments.corrpo_training", "--config", str(path),
               "--out", str(out), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, env=_env(**env), timeout=900)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the task and its measurements

def test_addition_split_is_disjoint_fixed_and_complete():
    train, heldout = addition_problems(16)
    assert len(train) == 65 and len(heldout) == 16
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    assert addition_problems(16) == (train, heldout)
    for p in train + heldout:
        a, b = (int(x) for x in p["question"].removeprefix("What is ").split("?")[0].split(" + "))
        assert p["answer"] == str(a + b)


@pytest.mark.parametrize(("text", "answer", "right"), [
    ("The answer is 12.", "12", True), ("7 + 5 = 12", "12", True), ("12, or maybe 13", "12", False),
    ("twelve", "12", False), ("", "12", False), ("-3", "-3", True), ("112", "12", False),
    ("The answer is 1,234.", "1234", True), ("so $18.00", "18", True), ("7.5 then 12", "12", True),
    ("12 then 7.5", "12", False),
])
def test_is_correct_reads_the_last_number(text, answer, right):
    assert is_correct(text, answer) is right


def test_gsm8k_split_holds_out_the_first_problems():
    from entropy_gpu.experiments.corrpo_training import gsm8k_problems

    train, heldout = gsm8k_problems(50)
    assert len(heldout) == 50 and len(train) == 1319 - 50
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}


@pytest.mark.parametrize("name", ["cpu_smollm2_addition", "gpu_qwen05b_gsm8k", "gpu_smoke"])
def test_shipped_configs_are_valid(name):
    path = Path(__file__).resolve().parents[2] / "examples" / "corrpo_experiment" / f"{name}.json"
    ExperimentConfig.from_json(path.read_text())


def test_batched_generation_equals_one_question_at_a_time():
    """eval_batch_size changes only how many questions share a generate call (left padding)."""
    from entropy_gpu.experiments.corrpo_training import _generate, build_policy

    model, tokenizer = build_policy(ExperimentConfig(**TINY))
    model.eval()
    questions = ["What is 1 + 2? Answer with the number.", "What is 9 + 9?", "Hi"]
    one = _generate(model, tokenizer, questions, n=1, sample=False, temperature=1.0, max_new_tokens=4, seed=0)
    three = _generate(model, tokenizer, questions, n=1, sample=False, temperature=1.0, max_new_tokens=4,
                      seed=0, batch_size=3)
    assert one == three and len(one) == 3 and all(len(c) == 4 for _, c in one)
    sampled = _generate(model, tokenizer, questions, n=2, sample=True, temperature=1.0, max_new_tokens=4,
                        seed=0, batch_size=2)
    assert [p for p, _ in sampled] == [p for p, _ in one for _ in range(2)]
    state = torch.random.get_rng_state()
    _generate(model, tokenizer, questions, n=2, sample=True, temperature=1.0, max_new_tokens=4, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the training RNG stream is untouched


def test_degeneration_counts_bigrams_and_repeated_trigrams():
    assert degeneration([1, 2, 3, 4]) == (1.0, 0.0)
    d2, rep = degeneration([5, 5, 5, 5, 5])  # bigrams (5,5) x4: 1 distinct; trigrams 3, 2 repeats
    assert d2 == pytest.approx(0.25) and rep == pytest.approx(2 / 3)
    assert degeneration([7]) == (1.0, 0.0)


def test_arms_differ_only_in_the_reward_term():
    configs = {arm: corrpo_config(arm, 0.1) for arm in ARMS}
    weights = {arm: reward_weights(arm, 0.1, 0.5) for arm in ARMS}
    assert weights["grpo"] == ([1.0, 0.0], 0.0)
    assert weights["corrpo"] == weights["corrpo_flipped"] == weights["corrpo_logit"] == ([1.0, 0.0], 0.1)
    assert weights["entropy_bonus"] == ([1.0, 0.0, 0.5], 0.0)
    assert configs["corrpo"] == configs["grpo"] == configs["entropy_bonus"] == CorrPOConfig(coef=0.1)
    assert configs["corrpo_flipped"].phi == "identity"
    assert configs["corrpo_logit"].measure == "nll_grad_norm"
    rho, valid = torch.tensor([-0.5, 0.25, float("nan")]), torch.tensor([True, True, False])
    assert corrpo_term(rho, valid, configs["corrpo_flipped"]).tolist() == [-0.5, 0.25, 0.0]
    assert corrpo_term(rho, valid, configs["corrpo"]).tolist() == [0.5, -0.25, 0.0]


@pytest.mark.parametrize(("change", "message"), [
    ({"arms": ["grpo", "nosuch"]}, "arms"), ({"seeds": []}, "seeds"), ({"steps": 0}, "steps"),
    ({"num_generations": 1}, "num_generations"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"probe_prompts": 9, "heldout": 8}, "probe_prompts"), ({"heldout": 70}, "heldout"),
    ({"task": "math500"}, "task"), ({"bf16": "yes"}, "bf16"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**{**TINY, **change})


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nosuch_key": 1}))
    for argv, needle in ([["--config", str(bad), "--out", str(tmp_path / "o")], "unknown config keys"],
                         [["--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")],
                          "no such file"],
                         [["--out", str(tmp_path / "o"), "--shard", "2/2"], "--shard"],
                         [["--config", str(bad)], "--out is required"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interval_and_bootstrap():
    iv = corrpo_report.interval([1.0, 3.0])
    assert iv["mean"] == 2.0
    half = 12.706 * math.sqrt(2.0) / math.sqrt(2)
    assert iv["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert corrpo_report.interval([1.0, None])["ci95"] is None
    lo, hi = corrpo_report.bootstrap_mean([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3


# -- real GRPO steps

@pytest.mark.slow
def test_every_arm_trains_logs_and_reports(tmp_path):
    out = tmp_path / "exp"
    config = {**TINY, "arms": list(ARMS)}
    result = _run(config, out, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    stored = json.loads((out / "run.json").read_text())
    assert stored == asdict(ExperimentConfig(**config))
    scale = json.loads((out / "calibration.json").read_text())["entropy_scale"]
    assert scale > 0 and math.isfinite(scale)
    for arm in ARMS:
        run = out / "runs" / f"{arm}-s0"
        steps, evals = _jsonl(run / "steps.jsonl"), _jsonl(run / "evals.jsonl")
        assert [s["step"] for s in steps] == [1, 2]
        assert [e["step"] for e in evals] == [0, 2]
        for s in steps:
            assert 0.0 <= s["task_reward"] <= 1.0 and s["length"] > 0 and 0 <= s["at_limit"] <= 1
            assert s["entropy"] > 0 and 0 < s["distinct2"] <= 1
        assert (steps[0]["mean_entropy_term"] is not None) == (arm == "entropy_bonus")
        for e in evals:
            assert 0 <= e["heldout_acc_greedy"] <= 1 and 0 <= e["heldout_acc_sampled"] <= 1
            assert e["n_defined"] >= 1 and -1 <= e["rho_exact"] <= 1
            assert len(e["probe_responses"]) == TINY["probe_prompts"] * TINY["probe_samples"]
        assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the starting policy is the reference
        assert not list(run.glob("checkpoint-*"))  # deleted once the run is done
    # Same seed, same prompts, same starting policy: the first step's samples are the same in
    # every arm, so the task reward and the measure's rho of step 1 agree across arms.
    first = {arm: _jsonl(out / "runs" / f"{arm}-s0" / "steps.jsonl")[0] for arm in ARMS}
    assert len({round(f["task_reward"], 6) for f in first.values()}) == 1
    assert len({round(f["rho_measure"], 5) for f in first.values() if f["rho_measure"] is not None}) <= 2
    assert first["corrpo_flipped"]["corrpo_term"] == pytest.approx(-first["corrpo"]["corrpo_term"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == list(ARMS)
    assert all(run["status"] == "finished" for run in summary["runs"].values())
    assert "corrpo" in summary["at_step"]["2"]["minus_grpo_same_seed"]
    assert (out / "curves.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text().split("## At step 2", 1)[1].split("\n\n")[2]
    rows = [line.split(" | ")[0] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [f"| {arm}" for arm in ARMS]
    # A second run with the same config does nothing new; a different config is refused.
    again = _run(config, out, tmp_path)
    assert again.returncode == 0
    changed = _run({**config, "coef": 0.2}, out, tmp_path)
    assert changed.returncode == 2 and "coef" in changed.stderr


@pytest.mark.slow
def test_gsm8k_task_runs_a_step(tmp_path):
    out = tmp_path / "exp"
    result = _run({**TINY, "task": "gsm8k", "arms": ["corrpo"], "steps": 1, "eval_every": 1}, out, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [s["step"] for s in _jsonl(out / "runs" / "corrpo-s0" / "steps.jsonl")] == [1]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "exp"
    config = {**TINY, "arms": ["corrpo"], "steps": 3}
    killed = _run(config, out, tmp_path, **{CRASH_AFTER_STEPS_ENV: "3"})
    assert killed.returncode == -9
    run = out / "runs" / "corrpo-s0"
    assert [s["step"] for s in _jsonl(run / "steps.jsonl")] == [1, 2, 3]
    assert (run / "checkpoint-2").is_dir() and not (run / "done.json").exists()
    resumed = _run(config, out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [s["step"] for s in _jsonl(run / "steps.jsonl")] == [1, 2, 3]
    assert [e["step"] for e in _jsonl(run / "evals.jsonl")] == [0, 2, 3]
    assert json.loads((run / "done.json").read_text())["resumed_from_step"] == 2
