"""The torch backend's row blocks on CPU: one parallel region of single-threaded workers
(issue 20, item 3), never thousands of small OpenMP regions that stall on a busy core.
Timings are in benchmarks/busy_cpu.py, not here."""

from __future__ import annotations

import threading

import pytest
import torch

from entropy_gpu import _row_blocks, _torch_backend, token_stats
from entropy_gpu.kernels.stat_layout import ROWS_WITH_SAVED_STATE
from entropy_gpu.moments import STAT_NAMES, TARGET_STATS, accumulators_needed

WANT = (True,) * len(STAT_NAMES)
NO_TARGET_WANT = tuple(name not in TARGET_STATS for name in STAT_NAMES)  # no logprob, nll_grad_norm, ...


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _record_blocks(monkeypatch):
    seen = []
    real = _row_blocks.for_each_block

    def recording(device, n_blocks, run_block):
        def run(block, worker):
            in_main = threading.current_thread() is threading.main_thread()
            seen.append((block, in_main, torch.get_num_threads()))
            run_block(block, worker)
        real(device, n_blocks, run)

    monkeypatch.setattr(_torch_backend, "for_each_block", recording)
    return seen


def _stats(rows, targets, block_bytes):
    out = torch.empty(ROWS_WITH_SAVED_STATE, rows.shape[0] * rows.shape[1])
    _torch_backend.token_stats_torch(rows, targets, out, inv_temperature=1 / 0.7, ignore_index=-100,
                                     want=WANT if targets is not None else NO_TARGET_WANT, save_state=True,
                                     block_bytes=block_bytes)
    return out


def test_blocks_run_on_single_threaded_workers_and_caller_threads_unchanged(two_threads, monkeypatch):
    seen = _record_blocks(monkeypatch)
    rows = torch.randn(2, 40, 1000) * 4
    targets = torch.randint(0, 1000, (80,))
    _stats(rows, targets, block_bytes=4 * 1000 * 3)  # 3 rows a block: 28 blocks
    assert sorted(b for b, _, _ in seen) == list(range(28))
    assert not any(in_main for _, in_main, _ in seen), "blocks ran in the calling thread"
    assert {threads for _, _, threads in seen} == {1}, "a worker's own ops ran multithreaded"
    assert torch.get_num_threads() == 2
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [2], "the workers' setting leaked into torch's default for new threads"


def test_one_thread_or_one_block_runs_in_the_caller(monkeypatch):
    seen = _record_blocks(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _stats(torch.randn(1, 8, 100), None, block_bytes=400)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 8 and all(in_main for _, in_main, _ in seen)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_row_parallel_equals_in_order_loop(two_threads, monkeypatch, temperature):
    rows = torch.randn(3, 37, 517) * 6
    rows[0, 5, :] = float("-inf")
    targets = torch.randint(0, 517, (111,))
    targets[7] = -100
    block_bytes = 4 * 517 * 4
    excluded = torch.where(targets >= 0, targets, -1)
    grad_params = torch.randn(5, 111)
    cols = torch.where(targets >= 0, targets, -1)

    def run():
        stats = _stats(rows, targets, block_bytes)
        mom = _torch_backend.token_moments_torch(rows, excluded, inv_temperature=1 / temperature, want=WANT,
                                                 block_bytes=block_bytes)
        grad = torch.empty_like(rows)
        _torch_backend.token_stats_backward_torch(rows, grad, grad_params, cols,
                                                  inv_temperature=1 / temperature, block_bytes=block_bytes)
        return stats, torch.stack(list(mom)), grad

    parallel = run()
    monkeypatch.setattr(_row_blocks, "ROW_PARALLEL", False)
    in_order = run()
    for a, b in zip(parallel, in_order):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert accumulators_needed(WANT)  # the moments above computed every accumulator


def test_worker_error_reaches_the_caller_after_all_blocks_stop(two_threads):
    done = []

    def run_block(block, worker):
        if block == 3:
            raise RuntimeError("block 3 failed")
        done.append(block)

    with pytest.raises(RuntimeError, match="block 3 failed"):
        _row_blocks.for_each_block(torch.device("cpu"), 10, run_block)
    assert sorted(done) == [b for b in range(10) if b != 3]


def test_grad_mode_and_autograd_through_token_stats(two_threads):
    logits = (torch.randn(64, 3000) * 3).requires_grad_()
    targets = torch.randint(0, 3000, (64,))
    out = token_stats(logits, targets, stats=("entropy", "logprob"), backend="torch")
    (out.entropy.sum() + out.logprob.sum()).backward()
    ref = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref, -1)
    ((-(logp.exp() * logp).sum(-1)).sum() + logp.gather(1, targets[:, None]).sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad.float(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        seen = []
        _row_blocks.for_each_block(torch.device("cpu"), 4, lambda b, w: seen.append(torch.is_grad_enabled()))
    assert seen == [False] * 4


def test_inference_mode_is_carried_to_the_workers(two_threads):
    # Outputs allocated under inference_mode are inference tensors: written outside it, they raise.
    logits = torch.randn(64, 3000) * 3
    targets = torch.randint(0, 3000, (64,))
    with torch.inference_mode():
        out = token_stats(logits, targets, stats=("entropy", "logprob"), backend="torch")
    ref = token_stats(logits, targets, stats=("entropy", "logprob"), backend="torch")
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=0)
