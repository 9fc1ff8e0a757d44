"""The CorR-PO training experiment (entropy_gpu.experiments.corrpo_training): a tiny random
Llama through real TRL GRPO steps in every arm, resume after a SIGKILL, the task and the
report's statistics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from entropy_gpu.corrpo import CorrPOConfig, corrpo_term
from entropy_gpu.experiments import corrpo_report
from entropy_gpu.experiments.corrpo_design import ARMS, addition_problems
from entropy_gpu.experiments.corrpo_training import (
    CRASH_AFTER_STEPS_ENV,
    INTERRUPT_AFTER_STEPS_ENV,
    NOT_STORED,
    ExperimentConfig,
    _reward_funcs,
    corrpo_config,
    degeneration,
    grpo_args,
    gsm8k_problems,
    is_correct,
    main,
    reward_weights,
    stored_config,
    task_problems,
)

TINY = {"model": "tiny", "seeds": [0], "steps": 2, "prompts_per_step": 2, "num_generations": 2,
        "max_completion_length": 5, "heldout": 3, "eval_every": 2, "eval_samples": 1, "probe_prompts": 2,
        "probe_samples": 1}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(config: dict, out: Path, tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "entropy_gpu.experiments.corrpo_training", "--config", str(path),
               "--out", str(out), "--no-progress", *args]
    # SIGINT as in a terminal: a shell without job control starts background jobs with SIGINT
    # ignored, and the child would inherit that (the Ctrl-C test hook would then do nothing).
    return subprocess.run(command, capture_output=True, text=True, env=_env(**env), timeout=900,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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


@pytest.mark.parametrize("name", ["cpu_smollm2_addition", "cpu_smoke", "gpu_qwen05b_gsm8k",
                                  "gpu_qwen05b_gsm8k_trainsplit", "gpu_smoke"])
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
    assert weights["null"] == ([1.0, 0.0, 0.1], 0.0)  # the null column, weight coef
    assert weights["grpo_group"] == weights["grpo"] and weights["corrpo_group"] == weights["corrpo"]
    assert configs["corrpo_group"] == configs["corrpo"]
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
    ({"task": "math500"}, "task"), ({"bf16": "yes"}, "bf16"), ({"save_every": 0}, "save_every"),
    ({"save_every": 2.5}, "save_every"), ({"scale_rewards": "std"}, "scale_rewards"),
    ({"addition_split": "random"}, "addition_split"), ({"gsm8k_train_file": "t.jsonl"}, "gsm8k_train_file"),
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
                         [["--out", str(tmp_path / "o"), "--shard", "0/2", "--overwrite"],
                          "--overwrite with --shard"],
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
    # Too few responses for a bootstrap interval (analysis/intervals.py): none, and the tables say so.
    assert corrpo_report.bootstrap_mean([-0.21, -0.25]) is None
    assert corrpo_report.bootstrap_mean([0.0, 1.0] * 5) is not None


# -- real GRPO steps

@pytest.mark.slow
def test_every_arm_trains_logs_and_reports(tmp_path):
    out = tmp_path / "exp"
    config = {**TINY, "arms": list(ARMS)}
    result = _run(config, out, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    stored = json.loads((out / "run.json").read_text())
    assert stored == {k: v for k, v in asdict(ExperimentConfig(**config)).items() if k not in NOT_STORED}
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["entropy_scale"] > 0 and math.isfinite(calibration["entropy_scale"])
    assert calibration["null_spread"] == calibration["std_rho"] > 0  # the null arm's spread: rho's
    for arm in ARMS:
        run = out / "runs" / f"{arm}-s0"
        steps, evals = _jsonl(run / "steps.jsonl"), _jsonl(run / "evals.jsonl")
        assert [s["step"] for s in steps] == [1, 2]
        assert [e["step"] for e in evals] == [0, 2]
        for s in steps:
            assert 0.0 <= s["task_reward"] <= 1.0 and s["length"] > 0 and 0 <= s["at_limit"] <= 1
            assert s["entropy"] > 0 and 0 < s["distinct2"] <= 1
        assert (steps[0]["mean_entropy_term"] is not None) == (arm == "entropy_bonus")
        assert (steps[0]["null_term"] is not None) == (arm == "null")
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
    assert changed.returncode == 2 and "coef" in changed.stderr and "--overwrite" in changed.stderr


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


# -- what a user sees: interrupt, resume, overwrite, where the report is

def test_tied_lm_head_is_the_only_missing_key_and_a_false_alarm():
    """A checkpoint of a tied model stores the embedding once; loading it leaves lm_head.weight
    "missing" but equal to the loaded embedding: that warning is dropped, any other is kept."""
    import logging

    from entropy_gpu.analysis.models import tiny_llama
    from entropy_gpu.experiments.corrpo_training import _TiedWeightsFalseAlarm, tied_parameter_names

    model = tiny_llama(vocab_size=64, hidden_size=16, layers=1, heads=2, seed=0)
    assert tied_parameter_names(model) == {"lm_head.weight"}
    assert tied_parameter_names(tiny_llama(vocab_size=64, hidden_size=16, layers=1, heads=2,
                                           tie_word_embeddings=False)) == set()
    state = {k: v + 1.0 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, message, None, None)

    alarm = _TiedWeightsFalseAlarm(model)
    prefix = "There were missing keys in the checkpoint model loaded: "
    assert not alarm.filter(record(prefix + "['lm_head.weight']."))
    assert alarm.filter(record(prefix + "['lm_head.weight', 'model.norm.weight']."))
    assert alarm.filter(record("something else"))


def test_save_every_defaults_to_two_steps_on_cpu():
    from entropy_gpu.experiments.corrpo_training import save_every

    assert save_every(ExperimentConfig(**TINY)) == (TINY["eval_every"] if torch.cuda.is_available() else 2)
    assert save_every(ExperimentConfig(**{**TINY, "save_every": 5})) == 5


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130_and_the_rerun_resumes(tmp_path, capsys):
    """Ctrl-C (SIGINT) before the first checkpoint, then after it: one line each, exit 130; the
    step-0 evaluation runs once; the resume names its checkpoint without transformers' tied
    lm_head false alarm; no model card; the end names the report; --report-only too;
    --overwrite starts over with a new config."""
    out = tmp_path / "exp"
    config = {**TINY, "arms": ["corrpo"], "steps": 3, "eval_every": 3}  # checkpoints (every 2) != evals
    early = _run(config, out, tmp_path, **{INTERRUPT_AFTER_STEPS_ENV: "1"})
    assert early.returncode == 130, early.stderr[-3000:]
    assert "Traceback" not in early.stderr
    assert early.stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "evaluating step 0 on 3 held-out problems..." in early.stderr
    run = out / "runs" / "corrpo-s0"
    assert not list(run.glob("checkpoint-*")) and [e["step"] for e in _jsonl(run / "evals.jsonl")] == [0]

    later = _run(config, out, tmp_path, **{INTERRUPT_AFTER_STEPS_ENV: "3"})
    assert later.returncode == 130, later.stderr[-3000:]
    assert "evaluating step 0" not in later.stderr  # kept from the first attempt
    assert (run / "checkpoint-2").is_dir() and not (run / "README.md").exists()
    assert "Writing model shards" not in later.stderr  # --no-progress: the checkpoint-writing bar too

    resumed = _run(config, out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming corrpo-s0 from checkpoint-2" in resumed.stderr
    assert "missing keys" not in resumed.stderr and "Writing model shards" not in resumed.stderr
    assert [s["step"] for s in _jsonl(run / "steps.jsonl")] == [1, 2, 3]
    assert [e["step"] for e in _jsonl(run / "evals.jsonl")] == [0, 3]
    assert not (run / "README.md").exists()
    paths = f"report: {out / 'summary.md'}, {out / 'summary.json'}, {out / 'curves.png'}"
    assert resumed.stdout.strip().splitlines()[-1] == paths

    assert main(["--out", str(out), "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == paths

    other = {**config, "steps": 1, "eval_every": 1}  # (refused without --overwrite: see above)
    fresh = _run(other, out, tmp_path, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["steps"] == 1
    assert [s["step"] for s in _jsonl(run / "steps.jsonl")] == [1]


@pytest.mark.slow
def test_the_cpu_smoke_config_runs_with_the_tiny_model(tmp_path):
    """examples/corrpo_experiment/cpu_smoke.json as shipped but with the tiny random model (the
    shipped one loads SmolLM2: docs/corrpo.md gives its time)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "corrpo_experiment" / "cpu_smoke.json"
    config = {**json.loads(path.read_text()), "model": "tiny"}
    out = tmp_path / "smoke"
    result = _run(config, out, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in config["arms"]:
        run = out / "runs" / f"{arm}-s0"
        assert (run / "done.json").is_file()
        assert [s["step"] for s in _jsonl(run / "steps.jsonl")] == list(range(1, config["steps"] + 1))
    assert "report: " in result.stdout and (out / "summary.md").is_file()


# -- the design shared with the reasoning testbed: placement, the null arm, the split ------------

def test_null_column_has_the_calibrated_spread_and_depends_on_seed_and_step_only():
    from transformers import TrainerState

    funcs, entropy_reward, callbacks = _reward_funcs("null", seed=3, null_spread=0.25)
    null = funcs[-1]
    assert [f.__name__ for f in funcs] == ["correct", "distinct2", "null"] and entropy_reward is None
    completions = ["x"] * 20_000
    before = torch.random.get_rng_state()
    draws = torch.tensor(null(None, completions), dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training RNG stream is untouched
    # std of 20,000 normal draws: relative standard error 1/sqrt(2 * 20,000) = 0.5 %
    assert float(draws.std()) == pytest.approx(0.25, rel=0.03) and abs(float(draws.mean())) < 0.01
    state = TrainerState()
    state.global_step = 7
    callbacks[0].on_step_begin(None, state, None)
    step7 = null(None, completions[:8])
    null.reseed_for_step(7, 3)
    assert null(None, completions[:8]) == step7  # a resumed run draws the same at step 7
    null.reseed_for_step(8, 3)
    assert null(None, completions[:8]) != step7
    other_seed = _reward_funcs("null", seed=4, null_spread=0.25)[0][-1]
    other_seed.reseed_for_step(7, 4)
    assert other_seed(None, completions[:8]) != step7
    with pytest.raises(ValueError, match="null_spread"):
        _reward_funcs("null", seed=0, null_spread=0.0)
    assert _reward_funcs("grpo", 0, 0.0)[2] == [] and _reward_funcs("entropy_bonus", 0, 0.0)[1] is not None


@pytest.mark.parametrize(("placement", "arm", "expected"), [
    ("none", "grpo", "none"), ("none", "corrpo", "none"), ("none", "null", "none"),
    ("none", "grpo_group", "group"), ("none", "corrpo_group", "group"), ("batch", "corrpo", "batch"),
])
def test_scale_rewards_reaches_trl_grpo_config(tmp_path, placement, arm, expected):
    config = ExperimentConfig(**{**TINY, "scale_rewards": placement})
    args = grpo_args(config, arm, 0, tmp_path, [1.0, 0.0])
    assert args.scale_rewards == expected and args.reward_weights == [1.0, 0.0]


def test_new_configs_default_to_the_design_and_old_run_json_means_the_old_one():
    config = ExperimentConfig()
    assert config.scale_rewards == "none" and config.addition_split == "pair"
    assert task_problems(ExperimentConfig(**{**TINY, "heldout": 16, "addition_split": "ordered"})) == \
        addition_problems(16, split="ordered")
    assert task_problems(ExperimentConfig(**{**TINY, "heldout": 16})) == addition_problems(16, split="pair")
    # The committed records' run.json predates these fields: the config that made them (which
    # names the old values) is the same experiment, so that folder resumes and reports as before.
    root = Path(__file__).resolve().parents[2]
    records = root / "docs" / "results" / "corrpo_training"
    old_text = (root / "examples" / "corrpo_experiment" / "cpu_smollm2_addition.json").read_text()
    old = ExperimentConfig.from_json(old_text)
    assert stored_config(old, records) == json.loads((records / "run.json").read_text())
    new = ExperimentConfig.from_json(old_text)
    new.scale_rewards = "none"
    assert stored_config(new, records)["scale_rewards"] == "none"  # differs: refused there
    assert "scale_rewards" in stored_config(config, root / "no_such_folder")


def test_gsm8k_train_file_trains_and_the_test_split_is_evaluated(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Q1?", "answer": "work\n#### 1,234"}) + "\n\n"
                    + json.dumps({"question": "Q2?", "answer": "7"}) + "\n")
    train, heldout = gsm8k_problems(1319, path)
    assert [p["answer"] for p in train] == ["1234", "7"] and train[0]["question"].startswith("Q1?\n")
    assert heldout == gsm8k_problems(1319)[1] and len(heldout) == 1319
    config = ExperimentConfig(**{**TINY, "task": "gsm8k", "heldout": 1319, "gsm8k_train_file": str(path)})
    assert task_problems(config) == (train, heldout)
    with pytest.raises(ValueError, match="heldout"):
        ExperimentConfig(**{**TINY, "task": "gsm8k", "heldout": 1319})  # no training problem left
    path.write_text(json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        gsm8k_problems(10, path)


def test_gpu_recipe_has_the_design():
    root = Path(__file__).resolve().parents[2] / "examples" / "corrpo_experiment"
    for name in ("gpu_qwen05b_gsm8k", "gpu_qwen05b_gsm8k_trainsplit"):
        config = ExperimentConfig.from_json((root / f"{name}.json").read_text())
        assert {"grpo", "corrpo", "corrpo_flipped", "entropy_bonus", "null", "grpo_group", "corrpo_group"} \
            <= set(config.arms)
        assert len(config.seeds) >= 8 and config.scale_rewards == "none"
    assert ExperimentConfig.from_json((root / "gpu_qwen05b_gsm8k.json").read_text()).heldout == 500
