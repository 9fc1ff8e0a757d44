"""The Triton kernel under TRITON_INTERPRET=1: vocabulary splits, block sizes,
bounds, and agreement with the torch backend. Small shapes (the interpreter is slow)."""

from __future__ import annotations

import pytest
import torch

from entropy_gpu import STAT_NAMES, token_stats
from entropy_gpu._rows import as_rows
from entropy_gpu._torch_backend import token_stats_torch
from entropy_gpu.kernels.token_stats import launch_token_stats
from tests.helpers import TEST_DEVICE, randint, random_logits

ALL = (True,) * len(STAT_NAMES)


def run_kernel(logits, targets, *, block_v, num_splits, want=ALL, inv_t=1.0, ignore_index=-100):
    rows = as_rows(logits)
    out = torch.full((len(STAT_NAMES), rows.shape[0] * rows.shape[1]), float("nan"), device=logits.device,
                     dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    flat = targets.reshape(-1).contiguous() if targets is not None else None
    launch_token_stats(rows, flat, out, inv_temperature=inv_t, ignore_index=ignore_index, want=want,
                       block_v=block_v, num_splits=num_splits)
    return out


def run_torch(logits, targets, *, want=ALL, inv_t=1.0, ignore_index=-100):
    rows = as_rows(logits)
    out = torch.full((len(STAT_NAMES), rows.shape[0] * rows.shape[1]), float("nan"), device=logits.device)
    flat = targets.reshape(-1).contiguous() if targets is not None else None
    token_stats_torch(rows, flat, out, inv_temperature=inv_t, ignore_index=ignore_index, want=want)
    return out


@pytest.mark.parametrize("vocab", [1, 16, 1000, 2053])
@pytest.mark.parametrize("block_v,num_splits", [(16, 1), (64, 3), (128, 7), (1024, 2), (4096, 1)])
def test_splits_and_blocks_agree_with_torch(vocab, block_v, num_splits):
    logits = random_logits((5, vocab), torch.bfloat16, 20.0)
    # Masked stretches make some splits see only -inf.
    logits[0, : vocab // 2] = float("-inf")
    if vocab > 1:
        logits[1, vocab // 3:] = float("-inf")
    targets = randint(vocab, (5,))
    targets[2] = -100
    got = run_kernel(logits, targets, block_v=block_v, num_splits=num_splits, inv_t=1 / 0.7)
    want = run_torch(logits, targets, inv_t=1 / 0.7)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_only_requested_rows_are_written(num_splits):
    logits = random_logits((3, 300))
    targets = randint(300, (3,))
    want = tuple(name in ("entropy", "nll_grad_norm") for name in STAT_NAMES)
    out = run_kernel(logits, targets, block_v=64, num_splits=num_splits, want=want)
    for k in range(len(STAT_NAMES)):
        assert torch.isnan(out[k]).all() != want[k], k


@pytest.mark.parametrize("num_splits", [1, 5])
def test_special_rows_across_splits(num_splits):
    logits = random_logits((4, 640), torch.float32, 3.0)
    logits[0] = float("-inf")
    logits[1, 600] = float("inf")
    logits[2, 17] = float("nan")
    targets = torch.tensor([1, 2, 3, 4], device=TEST_DEVICE)
    got = run_kernel(logits, targets, block_v=64, num_splits=num_splits)
    want = run_torch(logits, targets)
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(got[0, 0]) and torch.isnan(got[1:, 0]).all()
    assert torch.isnan(got[:, 1:3]).all()


def test_out_of_range_targets_are_not_dereferenced():
    """Targets far outside the row must not be read (the interpreter raises on a wild
    pointer); their target-dependent outputs are NaN."""
    logits = random_logits((3, 40))
    targets = torch.tensor([-(2**40), 2**40, 39], device=TEST_DEVICE)
    out = run_kernel(logits, targets, block_v=16, num_splits=2)
    assert torch.isnan(out[2, :2]).all() and torch.isnan(out[4, :2]).all()
    assert torch.isfinite(out[2, 2]) and torch.isfinite(out[:2]).all()


def test_many_rows_and_3d_layout():
    logits = random_logits((4, 33, 50), torch.float16, 4.0)[:, 1:]
    targets = randint(50, (4, 32))
    a = token_stats(logits, targets, stats="all", backend="triton")
    b = token_stats(logits, targets, stats="all", backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


def test_default_launch_config_is_sane():
    from entropy_gpu.kernels.token_stats import _default_block_v, _default_num_splits

    assert _default_block_v(151936, torch.bfloat16, 3) == 4096
    assert _default_block_v(7, torch.bfloat16, 3) == 16
    assert _default_block_v(151936, torch.float32, 7) == 2048
    assert _default_num_splits(8192, 151936, 4096, torch.device("cpu")) == 1


def test_launch_plan_puts_rows_on_the_unbounded_grid_axis():
    """2^20 rows (too many programs for the interpreter to run here) go on grid axis 0,
    whose CUDA limit is 2^31 - 1; splits on axis 1 always cover the row exactly once."""
    from entropy_gpu.kernels.token_stats import MAX_GRID_X, launch_plan

    cpu = torch.device("cpu")
    want = ALL
    plan = launch_plan(2**20, 151936, torch.bfloat16, cpu, want)
    assert plan["grid"] == (2**20, 1)
    with pytest.raises(ValueError, match="exceed"):
        launch_plan(MAX_GRID_X + 1, 10, torch.float32, cpu, want)
    for vocab in (1, 17, 4096, 151936, 262144):
        for splits in (1, 2, 7, 64):
            plan = launch_plan(3, vocab, torch.float32, cpu, want, block_v=256, num_splits=splits)
            n, size = plan["grid"][1], plan["split_size"]
            assert size % 256 == 0 and n <= 65535
            assert n * size >= vocab and (n - 1) * size < vocab
