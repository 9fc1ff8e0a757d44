"""RL arms on the testbed: TRL's GRPO through ``CorrPOTrainer``, arms that differ only in the
reward term, each (arm, seed) a resumable run with ``steps.jsonl`` and ``evals.jsonl``.

Arms (all: the task reward ``correct``, same prompts, sampling, optimizer and seeds):

- ``grpo``: the task reward alone;
- ``corrpo``: + ``coef * (-rho)`` with the configured measure; ``corrpo_exact``: with the exact
  measure; ``corrpo_flipped``: + ``coef * (+rho)``;
- ``entropy_bonus``: + ``scale * mean token entropy`` (``scale`` matches the spread of
  ``coef * rho`` on the starting policy: ``calibration.json``);
- ``null``: + ``coef * N(0, s^2)`` per completion, ``s`` the spread of ``-rho`` on the
  starting policy: a term of the same size that carries no information;
- ``grpo_group`` / ``corrpo_group``: ``grpo`` / ``corrpo`` under TRL's default
  ``scale_rewards="group"``; every other arm uses ``"none"`` (advantage = reward minus the group
  mean, so ``coef`` stays the exchange rate between a correct answer and one unit of rho).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from entropy_gpu.analysis.runs import code_commit, read_records, write_json, write_jsonl

from ..null_reward import NullReward
from . import task
from .config import GROUP_ARMS, TestbedConfig
from .evaluate import heldout_accuracy, probe, summarize_probe
from .policy import generate, load_policy

CRASH_AFTER_STEPS_ENV = "ENTROPY_GPU_CRASH_AFTER_STEPS"  # test hook: SIGKILL after this many steps
CORRPO_ARMS = ("corrpo", "corrpo_flipped", "corrpo_exact", "corrpo_group")


def heldout_problems(config: TestbedConfig) -> list[task.Problem]:
    """The RL evaluation set: ``heldout_n`` distinct held-out problems (the same for every run);
    the probe problems are its first ``probe_problems``."""
    return task.generate(config.heldout_n, 1, tuple(config.difficulties), heldout=True, distinct=True)


def corrpo_config(arm: str, config: TestbedConfig):
    from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure

    if arm not in CORRPO_ARMS:  # logged only (weight 0); the cheap logit-space measure
        return CorrPOConfig(coef=config.coef, measure="nll_grad_norm")
    method = "exact" if arm == "corrpo_exact" else config.measure
    return CorrPOConfig(
        coef=config.coef,
        measure=ParamGradMeasure(method=method),
        phi="identity" if arm == "corrpo_flipped" else "negate",
    )


def correct(completions, answer, **kwargs) -> list[float]:
    """Task reward: 1.0 when the number after the final ``#`` is the answer."""
    return [float(task.is_correct(c, int(a))) for c, a in zip(completions, answer)]


def calibrate(config: TestbedConfig, start_dir: Path) -> dict:
    """Spread of the CorR-PO term on the starting policy (std of ``-rho`` over responses to
    training prompts, with the corrpo arm's measure), and the ``entropy_bonus`` scale that gives
    ``scale * mean entropy`` the spread of ``coef * rho``."""
    from entropy_gpu.corrpo import completion_correlations, completion_stats

    model, tokenizer = load_policy(start_dir)
    problems = task.generate(64, "calibration", tuple(config.difficulties), heldout=False)
    prompts = [tokenizer(p.prompt, add_special_tokens=False).input_ids for p in problems]
    completions = generate(
        model,
        tokenizer,
        [p.prompt for p in problems],
        sample=True,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=0,
    )
    rhos, entropies = [], []
    cfg = corrpo_config("corrpo", config)
    for prompt, completion in zip(prompts, completions):
        if len(completion) < 3:
            continue
        ids = torch.tensor([prompt + completion])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt) :] = True
        stats = completion_stats(model, ids, mask, config=cfg, temperature=config.temperature)
        rho, valid = completion_correlations(stats.entropy, stats.measure, stats.mask)
        if bool(valid[0]):
            rhos.append(float(rho[0]))
            entropies.append(float(stats.entropy[0, len(prompt) :].mean()))

    def std(xs):
        mean = sum(xs) / len(xs)
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))

    if len(rhos) < 8 or std(entropies) == 0:
        raise RuntimeError("calibration: fewer than 8 responses with a defined rho")
    return {
        "measure": config.measure,
        "n_responses": len(rhos),
        "std_rho": std(rhos),
        "mean_rho": sum(rhos) / len(rhos),
        "std_mean_entropy": std(entropies),
        "null_spread": std(rhos),
        "entropy_scale": config.coef * std(rhos) / std(entropies),
    }


def evaluate_policy(model, tokenizer, config: TestbedConfig, step: int, ref_model=None) -> dict:
    """Held-out accuracy (greedy, sampled), the exact-rho probe, KL to the start, degeneration.
    Sampling seeds depend on the step only (common random numbers across arms and seeds)."""
    start = time.perf_counter()
    problems = heldout_problems(config)
    record = {
        "step": step,
        **heldout_accuracy(
            model,
            tokenizer,
            problems,
            seed=10_000 + step,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
        ),
    }
    rows = probe(
        model,
        tokenizer,
        problems[: config.probe_problems],
        seed=20_000 + step,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        ref_model=ref_model,
        fast_measures=("same_position",),
    )
    record["probe"] = summarize_probe(rows)
    record["probe_responses"] = rows
    record["eval_seconds"] = time.perf_counter() - start
    return record


def start_evaluation(config: TestbedConfig, out: Path, start_dir: Path) -> dict:
    """Step 0 of every run is the starting policy: evaluated once, in ``OUT/start/evaluation.json``."""
    path = out / "start" / "evaluation.json"
    if not path.is_file():
        model, tokenizer = load_policy(start_dir)
        write_json(path, evaluate_policy(model, tokenizer, config, 0, ref_model=model))
    return json.loads(path.read_text())


STEP_KEYS = {
    "task_reward": "rewards/correct/mean",
    "reward_total": "reward",
    "corrpo_term": "rewards/corrpo/mean",
    "rho_measure": "corrpo/correlation",
    "entropy": "corrpo/entropy",
    "length": "completions/mean_length",
    "at_limit": "completions/clipped_ratio",
    "null_term": "rewards/null/mean",
    "mean_entropy_term": "rewards/mean_entropy/mean",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "frac_reward_zero_std": "frac_reward_zero_std",
}


def _last_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    ckpts = sorted(
        (p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return (ckpts[-1], int(ckpts[-1].name.split("-")[1])) if ckpts else (None, 0)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_trainer(
    config: TestbedConfig,
    arm: str,
    seed: int,
    run_dir: Path,
    model,
    tokenizer,
    calibration: dict,
    progress: bool,
):
    """The arm's ``CorrPOTrainer`` and its extra reward column (``null`` / ``entropy_bonus``, else None)."""
    from datasets import Dataset
    from trl import GRPOConfig

    from entropy_gpu.experiments.corrpo_training import MeanEntropyReward
    from entropy_gpu.integrations.trl import CorrPOTrainer

    problems = task.generate(
        config.rl_steps * config.prompts_per_step, f"rl:{seed}", tuple(config.difficulties), heldout=False
    )
    dataset = Dataset.from_dict(
        {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
    )
    reward_funcs: list = [correct]
    weights = [1.0]
    extra = None
    if arm == "entropy_bonus":
        extra = MeanEntropyReward()
        reward_funcs.append(extra)
        weights.append(calibration["entropy_scale"])
    elif arm == "null":
        extra = NullReward(calibration["null_spread"], seed)
        reward_funcs.append(extra)
        weights.append(config.coef)
    args = GRPOConfig(
        output_dir=str(run_dir),
        max_steps=config.rl_steps,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        learning_rate=config.learning_rate,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        reward_weights=weights,
        scale_rewards="group" if arm in GROUP_ARMS else "none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        shuffle_dataset=False,
        disable_tqdm=not progress,
        beta=0.0,
        # TRL turns it on by default; on a model this small it only costs time, and it makes
        # generate() run without its KV cache (quadratic in the completion length).
        gradient_checkpointing=False,
        bf16=False,  # TRL's default is bf16 autocast: slow on a CPU, and the testbed is an fp32 experiment
    )
    trainer = CorrPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        corrpo=corrpo_config(arm, config),
    )
    trainer.reward_weights[-1] = config.coef if arm in CORRPO_ARMS else 0.0
    trainer.create_model_card = lambda *a, **k: None  # no auto-written README in each run folder
    if isinstance(extra, MeanEntropyReward):
        extra.trainer = trainer
    return trainer, extra


def run_arm(
    config: TestbedConfig,
    arm: str,
    seed: int,
    out: Path,
    start_dir: Path,
    calibration: dict,
    start_eval: dict,
    progress: bool = True,
) -> Path:
    """Train one (arm, seed) run into ``out/runs/ARM-sSEED``, resuming it if unfinished."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    run_dir = out / "runs" / f"{arm}-s{seed}"
    done_file = run_dir / "done.json"
    if done_file.is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, resumed = _last_checkpoint(run_dir)
    steps_file, evals_file = run_dir / "steps.jsonl", run_dir / "evals.jsonl"
    for f in (steps_file, evals_file):
        kept = [r for r in read_records(f) if r["step"] <= resumed] if (checkpoint and f.is_file()) else []
        write_jsonl(f, kept)
    if checkpoint and progress:
        print(f"  resuming {run_dir.name} from {checkpoint.name}", flush=True)
    if not any(r["step"] == 0 for r in read_records(evals_file)):
        _append(evals_file, {**start_eval, "arm": arm, "seed": seed})

    torch.manual_seed(seed)
    model, tokenizer = load_policy(start_dir)
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer, extra = build_trainer(config, arm, seed, run_dir, model, tokenizer, calibration, progress)
    crash_after = int(os.environ.get(CRASH_AFTER_STEPS_ENV, "0"))

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if isinstance(extra, NullReward):
                extra.reseed_for_step(state.global_step, seed)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "rewards/correct/mean" in logs:
                _append(
                    steps_file,
                    {
                        "step": state.global_step,
                        "arm": arm,
                        "seed": seed,
                        **{k: logs.get(v) for k, v in STEP_KEYS.items()},
                    },
                )
                if crash_after and state.global_step >= resumed + crash_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % config.eval_every == 0 or state.global_step == config.rl_steps:
                _append(
                    evals_file,
                    {
                        **evaluate_policy(model, tokenizer, config, state.global_step, ref_model),
                        "arm": arm,
                        "seed": seed,
                    },
                )

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass  # every step's logs are in steps.jsonl; the bar alone shows progress

    trainer.add_callback(Record())
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())
    code = code_commit()  # the code that runs, read before the minutes of training
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    for ckpt in run_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    write_json(
        done_file,
        {
            "arm": arm,
            "seed": seed,
            "resumed_from_step": resumed,
            "wall_seconds_last_attempt": time.perf_counter() - t0,
            "cpu_seconds_last_attempt": time.process_time() - cpu0,
            **code,
            "command": shlex.join(["python", "-m", __package__, *sys.argv[1:]]),
        },
    )
    return run_dir
