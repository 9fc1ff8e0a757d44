"""Cost of each CorR-PO gradient measure on one generation batch, against one policy
forward+backward on the same batch and against the batch's generation (the rest of a GRPO
step), side by side in one run. CPU or CUDA.

Per model (a tiny random Llama with SmolLM2's vocabulary, and SmolLM2-135M-Instruct when its
wheel is installed), one batch of GRPO completions (random ids: the cost does not depend on
them), and per variant:

- ``generate``: sampling the completions with ``model.generate`` (the step's rollout);
- ``fwd_bwd``: one policy forward + backward of the summed completion log-probs (the loss pass);
- ``nll_grad_norm``: ``completion_stats`` with the logit-space measure (one no-grad forward);
- ``same_position``, ``forward_mode_k<k>``: ``completion_stats`` with ``ParamGradMeasure``.

CorR-PO's cost per generation batch is its variant's time; the ratios against ``fwd_bwd`` and
against ``generate + fwd_bwd`` (a GRPO step without CorR-PO, TRL's default
``num_iterations=1``) are in docs/corrpo.md::

    pytest benchmarks/test_corrpo_measure_overhead.py --benchmark-only \\
        --benchmark-timer=time.process_time --benchmark-json=benchmarks/results/corrpo_measure_overhead.json

``BENCH_ROUNDS`` sets the rounds per variant (default 2); ``-k tiny`` / ``-k smollm2`` one model.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SMOKE

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama
from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats

VARIANTS = ["generate", "fwd_bwd", "nll_grad_norm", "same_position", "forward_mode_k4", "forward_mode_k8",
            "forward_mode_k16"]
# (completions, prompt tokens, completion tokens)
BATCH = {"tiny": (2, 8, 4) if SMOKE else (8, 96, 64), "smollm2": (4, 96, 32)}
_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        if name == "tiny":
            hidden, layers, heads = (32, 1, 2) if SMOKE else (256, 4, 4)
            _MODELS[name] = tiny_llama(vocab_size=len(load_tokenizer()), hidden_size=hidden, layers=layers,
                                       heads=heads)
        else:
            from entropy_gpu.analysis.models import load_model

            try:
                _MODELS[name] = load_model()[0]
            except (FileNotFoundError, ImportError) as err:
                pytest.skip(f"SmolLM2 not installed: {err}")
    return _MODELS[name]


def _batch(model, n: int, prompt: int, completion: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (n, prompt + completion), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt:] = True
    return ids, mask


def _run(model, variant: str, ids: torch.Tensor, mask: torch.Tensor, completion: int):
    if variant == "generate":
        with torch.no_grad():
            return model.generate(ids[:, :-completion], do_sample=True, max_new_tokens=completion,
                                  min_new_tokens=completion, top_k=0, pad_token_id=0)
    if variant == "fwd_bwd":
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, -completion - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -completion:, None])
        logp.sum().backward()
        return logp
    if variant == "nll_grad_norm":
        measure = "nll_grad_norm"
    elif variant == "same_position":
        measure = ParamGradMeasure(method="same_position")
    else:
        k = int(variant.rsplit("k", 1)[1])
        measure = ParamGradMeasure(method="forward_mode", k=k, directions_per_pass=4)
    return completion_stats(model, ids, mask, config=CorrPOConfig(measure=measure), temperature=0.7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["tiny", "smollm2"])
def test_measure_cost(benchmark, model_name, variant):
    if SMOKE and model_name == "smollm2":
        pytest.skip("BENCH_SMOKE: tiny model only")
    model = _model(model_name)
    n, prompt, completion = BATCH[model_name]
    ids, mask = _batch(model, n, prompt, completion)
    benchmark.group = f"CorR-PO measure cost, {model_name}, {n} x ({prompt} + {completion}) tokens"
    benchmark.extra_info.update(model=model_name, completions=n, prompt_tokens=prompt,
                                completion_tokens=completion, threads=torch.get_num_threads())
    rounds = int(os.environ.get("BENCH_ROUNDS", "1" if SMOKE else "2"))
    benchmark.pedantic(_run, args=(model, variant, ids, mask, completion), rounds=rounds, iterations=1,
                       warmup_rounds=0)
