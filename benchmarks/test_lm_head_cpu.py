"""Fused LM head vs matmul + token_stats (and the matmul alone) on CPU: entropy + logprob
+ nll_grad_norm from hidden [N, H] and weight [V, H], fp32.

The issue's reference point is N=2048, H=512, V=32000 (goal: the fused head near the
matmul's time, with a small fraction of the materialized path's extra memory). Peak
extra memory is measured in a fresh subprocess per implementation and stored in the
benchmark's extra_info.
"""

import pytest
import torch
from conftest import SMOKE

from entropy_gpu.bench.train import (
    lm_head_cpu_peak_mib,
    lm_head_error,
    lm_head_implementations,
    lm_head_inputs,
)

SHAPE = (64, 32, 1000) if SMOKE else (2048, 512, 32000)
IMPLS = lm_head_implementations("torch")


@pytest.fixture(scope="module")
def inputs():
    return lm_head_inputs(*SHAPE, torch.float32, "cpu")


@pytest.mark.benchmark(group=f"lm head cpu {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} fp32")
@pytest.mark.parametrize("name", list(IMPLS))
def test_cpu_lm_head(benchmark, inputs, name):
    hidden, weight, targets = inputs
    outputs = benchmark.pedantic(IMPLS[name], args=(hidden, weight, targets), rounds=3 if SMOKE else 5,
                                 warmup_rounds=1)
    benchmark.extra_info["peak_extra_mib"] = lm_head_cpu_peak_mib(name, *SHAPE, torch.float32)
    if name != "matmul only":
        error = lm_head_error(outputs, hidden, weight, targets)
        benchmark.extra_info["max_abs_err"] = error
        assert error < 1e-3  # a fast wrong implementation must not pass
