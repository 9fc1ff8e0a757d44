"""Step-time overhead of CorR-PO in TRL's GRPOTrainer, side by side in one run.

Variants (same random model, data, seed and batch): plain ``GRPOTrainer``, and
``CorrPOTrainer``, each with ``num_iterations=1`` (TRL's default: CorR-PO adds one no-grad
forward per generation batch) and ``num_iterations=2`` (TRL scores the old policy before
the rewards and CorR-PO serves that pass: no added forward). Each round is ``trainer.train()``
for STEPS optimizer steps; extra_info holds TRL's mean ``step_time`` and, for CorR-PO, the
seconds spent in its scoring (forward pass + statistics + correlation) per generation batch.

    pytest benchmarks/test_corrpo_overhead.py --benchmark-only --benchmark-columns=min,median,max \\
        --benchmark-timer=time.process_time

On a shared machine, ``--benchmark-timer=time.process_time`` (CPU seconds of this process,
all its threads) is far less noisy than wall-clock time.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import SMOKE
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama
from entropy_gpu.corrpo.reward import CorrPOConfig
from entropy_gpu.integrations.trl import CorrPOTrainer

# Model: Llama, SmolLM2 vocabulary (49152), hidden 256, 4 layers (~16M parameters, 12.6M in the
# tied embedding). Batch: 2 prompts x 4 generations, 48 new tokens.
HIDDEN, LAYERS, HEADS = (32, 1, 2) if SMOKE else (256, 4, 4)
COMPLETION_TOKENS = 4 if SMOKE else 48
STEPS = 1 if SMOKE else 2
# this file times the logit-space path; test_corrpo_measure_overhead.py all measures
MEASURE = "nll_grad_norm"
ROUNDS = 1 if SMOKE else 3


class TimedCorrPOTrainer(CorrPOTrainer):
    """Times CorR-PO's work per generation batch: its statistics and its scoring (the two
    steps of ``CorrPOReward.__call__``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.corrpo_seconds, self.corrpo_cpu_seconds = [], []
        reward = self.corrpo_reward
        token_stats, score = reward._token_stats, reward._score

        def timed_token_stats():
            self._started = (time.perf_counter(), time.process_time())
            return token_stats()

        def timed_score(*args):
            out = score(*args)
            self.corrpo_seconds.append(time.perf_counter() - self._started[0])
            self.corrpo_cpu_seconds.append(time.process_time() - self._started[1])
            return out

        reward._token_stats, reward._score = timed_token_stats, timed_score


def _reward(completion_ids, **kwargs):
    return [len(set(ids)) / len(ids) for ids in completion_ids]


def _trainer(kind: str, num_iterations: int, tmp_path):
    tokenizer = load_tokenizer()
    # Default init: near-uniform next-token distributions, so no EOS: every completion has
    # COMPLETION_TOKENS tokens in every variant (same work), and sampling never collapses.
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=HIDDEN, layers=LAYERS, heads=HEADS)
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=COMPLETION_TOKENS, max_steps=STEPS, num_iterations=num_iterations,
        bf16=False, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"prompt": ["Once upon a time", "The answer is"] * 8})
    if kind == "grpo":
        return GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                           processing_class=tokenizer)
    return TimedCorrPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, corrpo=CorrPOConfig(measure=MEASURE))


@pytest.mark.benchmark(
    group=f"GRPO step, Llama h{HIDDEN} x{LAYERS} V49152, 8 x {COMPLETION_TOKENS} tokens, CPU")
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("kind", ["grpo", "corrpo"])
def test_step_time(benchmark, tmp_path, kind, num_iterations):
    torch.manual_seed(0)
    trainer = _trainer(kind, num_iterations, tmp_path)
    benchmark.pedantic(trainer.train, rounds=ROUNDS, iterations=1, warmup_rounds=0 if SMOKE else 1)
    step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    benchmark.extra_info["mean_step_time_s"] = sum(step_times) / len(step_times)
    if kind == "corrpo":
        seconds = trainer.corrpo_seconds
        benchmark.extra_info["corrpo_scoring_s_per_generation"] = sum(seconds) / len(seconds)
        cpu = trainer.corrpo_cpu_seconds
        benchmark.extra_info["corrpo_scoring_cpu_s_per_generation"] = sum(cpu) / len(cpu)
        extra = [h["corrpo/extra_forward"] for h in trainer.state.log_history if "corrpo/extra_forward" in h]
        assert extra and all(e == (1.0 if num_iterations == 1 else 0.0) for e in extra)
