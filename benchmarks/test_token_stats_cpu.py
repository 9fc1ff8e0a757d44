"""Torch backend vs plain eager PyTorch on CPU: entropy + logprob + nll_grad_norm.

The issue's reference point is 2048 x 32000 fp32 on 2 cores (goal: >= 3x eager,
extra memory bounded by one row block). Peak extra memory is measured in a fresh
subprocess per implementation and stored in the benchmark's extra_info.
"""

import pytest
import torch

from entropy_gpu.bench import cpu_peak_extra_mib, eager_torch, max_errors, ours
from conftest import SMOKE

SHAPE = (64, 1000) if SMOKE else (2048, 32000)
IMPLS = {"entropy_gpu[torch]": ours("torch"), "eager torch": eager_torch}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(SHAPE).normal_(0, 2, generator=gen)
    targets = torch.randint(0, SHAPE[1], (SHAPE[0],), generator=gen)
    return logits, targets


@pytest.mark.benchmark(group=f"token_stats cpu {SHAPE[0]}x{SHAPE[1]} fp32")
@pytest.mark.parametrize("name", list(IMPLS))
def test_cpu_forward(benchmark, inputs, name):
    logits, targets = inputs
    fn = IMPLS[name]
    outputs = benchmark.pedantic(fn, args=(logits, targets), rounds=3 if SMOKE else 7, warmup_rounds=1)
    errors = max_errors(outputs, logits, targets, 1.0)
    benchmark.extra_info["max_abs_err"] = errors
    benchmark.extra_info["peak_extra_mib"] = cpu_peak_extra_mib(name, *SHAPE, torch.float32)
    assert max(errors.values()) < 1e-3  # a fast wrong implementation must not pass
