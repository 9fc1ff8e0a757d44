"""Bad input gets a clear TypeError/ValueError/RuntimeError, never a crash or a wrong number."""

from __future__ import annotations

import math

import pytest
import torch

import entropy_gpu
from entropy_gpu import resolve_backend, token_stats


@pytest.mark.parametrize("logits,error,match", [
    (torch.randint(0, 5, (2, 5)), TypeError, "float16, bfloat16"),
    (torch.zeros(2, 5, dtype=torch.bool), TypeError, "float16, bfloat16"),
    (torch.zeros(2, 5, dtype=torch.complex64), TypeError, "float16, bfloat16"),
    ([[0.1, 0.2]], TypeError, "torch.Tensor"),
    (torch.tensor(1.0), ValueError, "0-d"),
    (torch.zeros(3, 0), ValueError, "V = 0"),
])
def test_bad_logits(logits, error, match):
    with pytest.raises(error, match=match):
        token_stats(logits)


@pytest.mark.parametrize("targets,error,match", [
    (torch.zeros(3, dtype=torch.float32), TypeError, "int64 or int32"),
    (torch.zeros(3, dtype=torch.bool), TypeError, "int64 or int32"),
    (torch.zeros(4, dtype=torch.long), ValueError, "leading shape"),
    (torch.zeros(3, 1, dtype=torch.long), ValueError, "leading shape"),
    (torch.tensor([0, 1, 10]), ValueError, r"targets\[2\] = 10 is outside \[0, 10\)"),
    (torch.tensor([0, -1, 2]), ValueError, "outside"),
    ([0, 1, 2], TypeError, "torch.Tensor"),
])
def test_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        token_stats(torch.randn(3, 10), targets)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrow_integer_targets_are_rejected_as_the_message_says(dtype):
    # uint8 cannot hold ignore_index = -100 and int8/int16 cannot hold a large vocabulary's
    # ids: rejected with the dtypes the message names, for every entry point.
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    targets = torch.tensor([0, 1, 2], dtype=dtype)
    calls = [lambda: token_stats(torch.randn(3, 10), targets),
             lambda: entropy_gpu.linear_token_stats(hidden, weight, targets),
             lambda: entropy_gpu.token_stats_with_correlation(torch.randn(1, 3, 10), targets[None])]
    for call in calls:
        with pytest.raises(TypeError, match=rf"int64 or int32 .*got {dtype}; convert with targets.long\(\)"):
            call()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int32_and_int64_targets_give_the_same_result(dtype, backend):
    logits = torch.randn(5, 12, dtype=torch.float64)
    targets = torch.tensor([0, 11, -100, 3, 7])
    out = token_stats(logits, targets.to(dtype), stats="all", backend=backend)
    want = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    want = torch.where(targets == -100, 0.0, want)
    torch.testing.assert_close(out.logprob, want)


def test_target_on_other_device():
    meta_targets = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="is on meta but logits are on cpu"):
        token_stats(torch.randn(3, 10), meta_targets)


@pytest.mark.parametrize("temperature,error", [
    (0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError),
    ("1.0", TypeError), (True, TypeError), (None, TypeError), (torch.tensor([1.0, 2.0]), ValueError),
])
def test_bad_temperature(temperature, error):
    with pytest.raises(error, match="temperature"):
        token_stats(torch.randn(2, 10), temperature=temperature)


def test_tensor_temperature_is_accepted():
    logits = torch.randn(2, 10)
    torch.testing.assert_close(token_stats(logits, temperature=torch.tensor(0.5)).entropy,
                               token_stats(logits, temperature=0.5).entropy)


def test_bad_stats_and_backend():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="unknown statistic"):
        token_stats(logits, stats=("entropy", "perplexity"))
    with pytest.raises(ValueError, match="need targets"):
        token_stats(logits, stats=("logprob",))
    with pytest.raises(ValueError, match="empty"):
        token_stats(logits, stats=())
    with pytest.raises(ValueError, match="backend must be one of"):
        token_stats(logits, backend="cuda")
    with pytest.raises(TypeError, match="ignore_index"):
        token_stats(logits, torch.zeros(2, dtype=torch.long), ignore_index=1.5)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(entropy_gpu.BACKEND_ENV, raising=False)
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend(torch.randn(2), "torch") == "torch"
    assert resolve_backend("cpu", "triton") == "triton"  # interpreter is on in tests
    monkeypatch.setenv(entropy_gpu.BACKEND_ENV, "triton")
    assert resolve_backend("cpu") == "triton"
    assert resolve_backend("cpu", "torch") == "torch"  # an explicit argument wins
    monkeypatch.setenv(entropy_gpu.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=entropy_gpu.BACKEND_ENV):
        resolve_backend("cpu")
    monkeypatch.delenv(entropy_gpu.BACKEND_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_stats(torch.randn(2, 10), backend="triton")


def test_env_override_changes_the_backend_used(monkeypatch):
    import entropy_gpu.backend as dispatch

    calls = []
    monkeypatch.setattr(dispatch, "token_stats_torch", lambda *a, **k: calls.append("torch"))
    monkeypatch.setenv(entropy_gpu.BACKEND_ENV, "torch")
    token_stats(torch.randn(2, 10))
    assert calls == ["torch"]
    monkeypatch.setenv(entropy_gpu.BACKEND_ENV, "triton")
    token_stats(torch.randn(2, 10))
    assert calls == ["torch"]  # went to Triton this time


def test_inputs_are_not_modified():
    logits = torch.randn(4, 100)
    before = logits.clone()
    for backend in ("torch", "triton"):
        token_stats(logits, torch.randint(0, 100, (4,)), stats="all", backend=backend)
    assert torch.equal(logits, before)
