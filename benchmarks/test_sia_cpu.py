"""SIA: one forward pass per trace (packed probes) vs naive re-encoding of every
prefix, on GSM8K gold traces cut every 16 tokens (K >= 8 steps), next_token
estimator. SmolLM2-135M-Instruct; BENCH_SMOKE=1 uses a tiny random Llama instead.
``entropy-gpu sia-bench`` prints the same comparison as a table."""

from dataclasses import replace

import pytest
import torch
from conftest import SMOKE

from entropy_gpu.analysis.models import load_model, load_tokenizer, tiny_llama
from entropy_gpu.analysis.sia import SIAConfig, analyze_traces, gold_traces, load_gsm8k
from entropy_gpu.analysis.sia.bench import traces_with_steps
from entropy_gpu.analysis.sia.run import DEFAULT_INSTRUCTIONS

CONFIG = SIAConfig(estimator="next_token", segmentation="tokens", every=8 if SMOKE else 16,
                   instruction=DEFAULT_INSTRUCTIONS["number"])
RESULTS = {}


@pytest.fixture(scope="module")
def setup():
    if SMOKE:
        model, tokenizer = tiny_llama(), load_tokenizer()
    else:
        model, tokenizer = load_model()
    traces = traces_with_steps(gold_traces(load_gsm8k(40)), tokenizer, CONFIG,
                               min_steps=8)[:2 if SMOKE else 3]
    return model, tokenizer, traces


@pytest.mark.benchmark(group="sia one pass vs naive, K >= 8")
@pytest.mark.parametrize("method", ["packed", "naive"])
def test_sia_curves(benchmark, setup, method):
    model, tokenizer, traces = setup
    cfg = replace(CONFIG, method=method)
    curves = benchmark.pedantic(analyze_traces, args=(model, tokenizer, traces, cfg),
                                kwargs={"progress": False}, rounds=1 if SMOKE else 2, warmup_rounds=0)
    RESULTS[method] = curves
    benchmark.extra_info.update(
        traces=len(curves), steps=[c.num_steps for c in curves], threads=torch.get_num_threads(),
        tokens_processed=sum(c.tokens_processed for c in curves),
        forward_passes=sum(c.forward_passes for c in curves))


def test_methods_agree():
    """A fast wrong implementation must not pass: both methods give the same curves."""
    if len(RESULTS) < 2:
        pytest.skip("run together with test_sia_curves")
    for a, b in zip(RESULTS["packed"], RESULTS["naive"]):
        assert max(abs(x - y)
                   for x, y in zip(a.entropy + a.answer_logprob, b.entropy + b.answer_logprob)) < 1e-4
