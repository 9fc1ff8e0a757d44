"""Overhead of the per-sequence Pearson correlation over token_stats alone.

token_stats_with_correlation reads the logits once (token_stats) and then correlates
two of its N-float outputs. Timed side by side in one run: token_stats alone, the
fused call on padded sequences (mask) and on packed ones (cu_seqlens), and the
correlation step alone. Shapes: CPU 2048 x 32000 fp32 (8 sequences of 256 tokens);
GPU 8192 x 151936 bf16, the issue's shape (16 of 512). Statistics: entropy, logprob,
nll_grad_norm in every case.

On a shared CPU the load drifts between one benchmark and the next (wall times there
varied 5x between runs), so ``test_overhead_interleaved`` alternates token_stats and
the fused call round by round and, on CPU, measures the CPU time of one thread
(``torch.set_num_threads(1)``, ``time.thread_time``): the work done, whatever the
scheduler does. On GPU it measures wall time with synchronization. Medians, minima
and their ratios go to ``extra_info`` and are printed.
"""

import statistics
import time

import pytest
import torch
from conftest import DEVICE, SMOKE

from entropy_gpu import pearson, token_stats, token_stats_with_correlation

if SMOKE:
    SEQS, SEQ_LEN, VOCAB, DTYPE = 2, 32, 1000, torch.float32
elif DEVICE.type == "cuda":
    SEQS, SEQ_LEN, VOCAB, DTYPE = 16, 512, 151936, torch.bfloat16
else:
    SEQS, SEQ_LEN, VOCAB, DTYPE = 8, 256, 32000, torch.float32
STATS = ("entropy", "logprob", "nll_grad_norm")
GROUP = f"correlation overhead {DEVICE.type} {SEQS * SEQ_LEN}x{VOCAB} {str(DTYPE).split('.')[-1]}"


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(SEQS, SEQ_LEN, VOCAB).normal_(0, 2, generator=gen).to(DEVICE, DTYPE)
    targets = torch.randint(0, VOCAB, (SEQS, SEQ_LEN), generator=gen).to(DEVICE)
    targets[:, :16] = -100  # prompt tokens
    mask = torch.ones(SEQS, SEQ_LEN, dtype=torch.bool, device=DEVICE)
    cu_seqlens = torch.arange(SEQS + 1, device=DEVICE, dtype=torch.int32) * SEQ_LEN
    return logits, targets, mask, cu_seqlens


def stats_only(logits, targets, mask, cu_seqlens):
    return token_stats(logits, targets, stats=STATS)


def with_correlation_padded(logits, targets, mask, cu_seqlens):
    return token_stats_with_correlation(logits, targets, mask=mask, stats=STATS)


def with_correlation_packed(logits, targets, mask, cu_seqlens):
    return token_stats_with_correlation(logits.view(-1, VOCAB), targets.view(-1), cu_seqlens=cu_seqlens,
                                        stats=STATS)


IMPLS = {
    "token_stats": stats_only,
    "token_stats_with_correlation (mask)": with_correlation_padded,
    "token_stats_with_correlation (cu_seqlens)": with_correlation_packed,
}


def timed(benchmark, fn, *args):
    if DEVICE.type == "cuda":
        def run():
            out = fn(*args)
            torch.cuda.synchronize()
            return out
    else:
        run = fn
    return benchmark.pedantic(run, args=args, rounds=3 if SMOKE else 9, warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("name", list(IMPLS))
def test_fused_correlation(benchmark, inputs, name):
    out = timed(benchmark, IMPLS[name], *inputs)
    if name != "token_stats":
        stats, corr = out
        logits, targets, mask, _ = inputs
        used = mask & (targets != -100)
        want = pearson(stats.entropy.view(SEQS, SEQ_LEN), stats.nll_grad_norm.view(SEQS, SEQ_LEN), used)
        torch.testing.assert_close(corr.corr, want.corr, atol=1e-6, rtol=0)  # fast and wrong must not pass
        benchmark.extra_info["mean_corr"] = float(corr.corr.mean())


@pytest.mark.benchmark(group=GROUP)
def test_correlation_step_alone(benchmark, inputs):
    logits, targets, mask, _ = inputs
    stats = token_stats(logits, targets, stats=STATS)
    used = mask & (targets != -100)
    timed(benchmark, pearson, stats.entropy, stats.nll_grad_norm, used)


def test_overhead_interleaved(benchmark, inputs):
    """token_stats vs token_stats_with_correlation (mask), alternating each round, and
    the correlation step alone (what the fused call adds)."""
    rounds = 3 if SMOKE else 15
    on_gpu = DEVICE.type == "cuda"
    clock = time.perf_counter if on_gpu else time.thread_time
    times = {"token_stats": [], "with_correlation": [], "correlation_step": []}
    logits, targets, mask, _ = inputs
    stats = token_stats(logits, targets, stats=STATS)
    used = mask & (targets != -100)

    def correlation_step(*_):
        return pearson(stats.entropy, stats.nll_grad_norm, used)

    order = [("token_stats", stats_only), ("with_correlation", with_correlation_padded),
             ("correlation_step", correlation_step)]

    def one_round():
        order[:2] = order[1::-1]  # swap the first two every round: no order bias
        for key, fn in order:
            if on_gpu:
                torch.cuda.synchronize()
            start = clock()
            fn(*inputs)
            if on_gpu:
                torch.cuda.synchronize()
            times[key].append(clock() - start)

    threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(1)
    try:
        one_round()  # warm-up
        times = {k: [] for k in times}
        benchmark.pedantic(lambda: [one_round() for _ in range(rounds)], rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["clock"] = "wall, synchronized" if on_gpu else "CPU time of one thread"
    summary = {}
    for key, values in times.items():
        summary[f"{key}_median_ms"] = 1e3 * statistics.median(values)
        summary[f"{key}_min_ms"] = 1e3 * min(values)
    summary["ratio_median"] = summary["with_correlation_median_ms"] / summary["token_stats_median_ms"]
    summary["ratio_min"] = summary["with_correlation_min_ms"] / summary["token_stats_min_ms"]
    summary["step_share_median"] = summary["correlation_step_median_ms"] / summary["token_stats_median_ms"]
    benchmark.extra_info.update(summary)
    print(f"\n{GROUP}, {rounds} interleaved rounds, {benchmark.extra_info['clock']}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
