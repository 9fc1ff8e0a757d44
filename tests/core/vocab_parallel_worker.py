"""One rank of the vocabulary-parallel test (run by tests/core/test_vocab_parallel.py).

usage: python vocab_parallel_worker.py RANK WORLD INIT_FILE

Every rank builds the same full logits from one seed, keeps its shard, and checks
vocab_parallel_token_stats (forward and backward, both backends) against token_stats
on the unsharded logits and against the float64 reference. Exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
# The repository root, for tests.helpers and tests.reference (and this checkout's entropy_gpu).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import entropy_gpu  # noqa: E402
from entropy_gpu import STAT_NAMES, token_stats, vocab_parallel_token_stats  # noqa: E402
from tests.helpers import assert_matches  # noqa: E402
from tests.reference import reference_grad, reference_stats  # noqa: E402


def full_problem(shape, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape + (vocab,), dtype=torch.float64, generator=gen) * 6).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    return logits, targets


def check_forward_and_backward(rank, backend, dtype, shape, bounds, temperature, inplace=False):
    """bounds: per-rank [start, stop) columns (an uneven split is allowed)."""
    vocab = bounds[-1][1]
    logits, targets = full_problem(shape, vocab, dtype, seed=len(shape) * 1000 + vocab)
    flat = logits.view(-1, vocab)
    # Masked vocabulary, and a row whose shard on rank 1 is entirely masked.
    flat[0, ::3] = float("-inf")
    flat[1, bounds[1][0]:bounds[1][1]] = float("-inf")
    targets.view(-1)[1] = bounds[0][0]  # owned by rank 0
    targets.view(-1)[2] = bounds[1][1] - 1  # owned by rank 1 (last column)
    targets.view(-1)[3] = -100
    start, stop = bounds[rank]
    context = f"rank {rank} {backend} {dtype} {shape} bounds={bounds} t={temperature} inplace={inplace}"

    # Forward against the unsharded statistics.
    shard = logits[..., start:stop].clone()
    out = vocab_parallel_token_stats(shard, targets, vocab_start=start, temperature=temperature, stats="all",
                                     backend=backend)
    full = token_stats(logits, targets, temperature=temperature, stats="all", backend=backend)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(out, name), getattr(full, name), atol=2e-5, rtol=2e-6,
                                   equal_nan=True,
                                   msg=lambda m, name=name: f"{name} vs unsharded, {context}: {m}")
    assert_matches(out, reference_stats(logits, targets, temperature), context=context)

    # Backward: this rank's columns of the unsharded gradient.
    g_ent = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    g_lp = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    source = logits[..., start:stop].clone().requires_grad_(True)
    shard = source * 1 if inplace else source  # in place needs a non-leaf
    out = vocab_parallel_token_stats(shard, targets, vocab_start=start, temperature=temperature,
                                     stats=("entropy", "logprob", "nll_grad_norm"), backend=backend,
                                     inplace_backward=inplace)
    # Scaled in place (users mask and scale these outputs): the backward must still be right.
    out.entropy.mul_(g_ent)
    out.logprob.mul_(g_lp)
    (out.entropy.sum() + out.logprob.sum()).backward()
    want = reference_grad(logits, targets, g_ent, g_lp, temperature)[..., start:stop]
    tol = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-6, 8e-3)}[dtype]
    torch.testing.assert_close(source.grad.double(), want, atol=tol[0], rtol=tol[1],
                               msg=lambda m: f"gradient, {context}: {m}")


def check_errors_and_special_rows(rank):
    logits, targets = full_problem((4,), 20, torch.float32, seed=3)
    start, stop = (0, 10) if rank == 0 else (10, 20)
    shard = logits[:, start:stop]
    bad = targets.clone()
    bad[0] = 20  # in no shard
    try:
        vocab_parallel_token_stats(shard, bad, vocab_start=start)
    except ValueError as e:
        assert "no rank's shard" in str(e), e
    else:
        raise AssertionError("out-of-range target not reported")
    try:  # both ranks claim columns [0, 10)
        vocab_parallel_token_stats(shard, targets.clamp(max=9), vocab_start=0)
    except ValueError as e:
        assert "overlap" in str(e), e
    else:
        raise AssertionError("overlapping shards not reported")
    out = vocab_parallel_token_stats(shard, bad, vocab_start=start, check_targets_range=False, stats="all")
    assert torch.isnan(out.logprob[0]) and torch.isfinite(out.logprob[1:]).all()
    # NaN on one rank's shard, +inf on the other's, all -inf everywhere: as unsharded.
    special = logits.clone()
    special[1, 15] = float("nan")
    special[2, 3] = float("inf")
    special[3] = float("-inf")
    out = vocab_parallel_token_stats(special[:, start:stop], targets, vocab_start=start, stats="all")
    full = token_stats(special, targets, stats="all")
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(out, name), getattr(full, name), equal_nan=True, atol=1e-5,
                                   rtol=1e-6)
    # Defaults: equal shards, vocab_start = rank * V_local; the default group; no targets.
    h = vocab_parallel_token_stats(shard).entropy
    torch.testing.assert_close(h, token_stats(logits).entropy, atol=1e-5, rtol=0)
    assert entropy_gpu.resolve_backend(shard) == "torch"
    # Autocast leaves the statistics alone (docs/numerics.md): bitwise the same numbers.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = vocab_parallel_token_stats(shard, targets, vocab_start=start, stats="all")
    outside = vocab_parallel_token_stats(shard, targets, vocab_start=start, stats="all")
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(inside, name), getattr(outside, name), rtol=0, atol=0,
                                   equal_nan=True)


def main():
    rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(rank)  # anything random that must agree across ranks is seeded explicitly
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    try:
        for backend in ("torch", "triton"):
            check_forward_and_backward(rank, backend, torch.float32, (2, 3), [(0, 150), (150, 301)], 0.7)
        # In place: the Function's logic is backend-independent (the kernel's in-place
        # write is tested in test_autograd.py).
        check_forward_and_backward(rank, "torch", torch.bfloat16, (2, 4), [(0, 64), (64, 128)], 1.0,
                                   inplace=True)
        check_forward_and_backward(rank, "torch", torch.float32, (3, 5), [(0, 16000), (16000, 32000)], 1.3)
        check_errors_and_special_rows(rank)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip the barrier: the other rank may be stuck in a collective
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    main()
