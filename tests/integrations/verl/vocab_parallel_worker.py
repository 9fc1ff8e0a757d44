"""One rank of tests/integrations/verl/test_dropin.py::test_vocab_parallel_functions_on_real_gloo_ranks.

usage: python vocab_parallel_worker.py RANK WORLD   (MASTER_ADDR / MASTER_PORT set)

Initializes Megatron's tensor-parallel group on gloo, gives every rank its vocabulary
shard, and runs verl's own Megatron functions (verl.utils.megatron.tensor_parallel) and the
patched ones, forward and backward, against the float64 reference on the full logits.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
# The repository root, for tests.reference (and this checkout's entropy_gpu).
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(rank: int, world: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=world)
    import verl.utils.megatron.tensor_parallel as tp

    from entropy_gpu.integrations import verl as ev
    from entropy_gpu.integrations.verl import patching
    from tests.reference import reference_stats

    originals = {name: getattr(tp, name) for name in patching._MEGATRON}
    gen = torch.Generator().manual_seed(7)
    vocab, rows = 96, (3, 5)
    full = torch.randn(*rows, vocab, generator=gen, dtype=torch.float64) * 3
    full[0, 0, 70] = 45.0  # near-certain token in rank 1's shard
    labels = torch.randint(0, vocab, rows, generator=gen)
    labels[0, 0] = 70
    local = vocab // world
    shard = full[..., rank * local : (rank + 1) * local].contiguous()
    ref = reference_stats(full, labels)

    ev.patch_verl()
    assert tp.vocab_parallel_entropy is ev.vocab_parallel_entropy
    results = {}
    for which, fns in (("verl", originals), ("ours", {n: getattr(tp, n) for n in patching._MEGATRON})):
        x = shard.clone().requires_grad_(True)
        h = x * 1.0
        entropy = fns["vocab_parallel_entropy"](h)
        logprob = fns["vocab_parallel_log_probs_from_logits"](h * 1.0, labels)
        (0.3 * entropy.sum() - logprob.sum()).backward()
        sum_sq = fns["vocab_parallel_sum_pi_squared"](shard)
        chunked = fns["vocab_parallel_entropy_with_chunking"](shard, 2)  # [B, T, V]: verl chunks T
        results[which] = (entropy.detach(), logprob.detach(), sum_sq, chunked, x.grad)
        # Megatron's vocab_parallel_cross_entropy computes in fp32 even for fp64 logits.
        tol = 1e-9 if which == "ours" else 1e-5
        torch.testing.assert_close(entropy.detach().double(), ref["entropy"], atol=tol, rtol=tol)
        torch.testing.assert_close(logprob.detach().double(), ref["logprob"], atol=tol, rtol=tol)
        torch.testing.assert_close(sum_sq.double(), ref["sum_sq_probs"], atol=tol, rtol=tol)
        torch.testing.assert_close(chunked.double(), ref["entropy"], atol=tol, rtol=tol)
    for a, b in zip(results["ours"], results["verl"]):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    assert (results["ours"][1] <= 0).all()
    # fp32 shards: fp32 statistics, equal to verl's up to rounding.
    ours32 = ev.vocab_parallel_log_probs_from_logits(shard.float(), labels)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), ref["logprob"], atol=2e-5, rtol=2e-5)
    ev.unpatch_verl()
    assert tp.vocab_parallel_entropy is originals["vocab_parallel_entropy"]
    dist.barrier()
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
