"""PearsonState.all_reduce over a real torch.distributed process group: 2 processes,
gloo, spawned here. Each rank feeds its own shard; after all_reduce every rank must
hold the single-process state."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropy_gpu import PearsonState
from tests.correlation.pearson_reference import exact_pearson, raw_sums

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
SPLIT = 300  # rank 0 gets pairs [0, 300), rank 1 [300, 700): unequal shards


def make_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 700, dtype=torch.float64, generator=gen)
    y = x * torch.tensor([0.9, -0.3, 0.0, 0.5], dtype=torch.float64).view(4, 1)
    y = y + torch.randn(4, 700, dtype=torch.float64, generator=gen)
    mask = torch.rand(4, 700, generator=gen) < 0.8
    return (x + 1e6).float(), (y - 1e6).float(), mask, x, y


def extreme_data():
    """Two clusters of float64 pairs at +-1e200 (spread 1e190): raw co-moments overflow
    float64 and the between-cluster term dominates; each rank holds one cluster."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 50, dtype=torch.float64, generator=gen)
    b = 0.5 * a + torch.randn(2, 50, dtype=torch.float64, generator=gen)
    centre = torch.tensor([[1e200], [-1e200]], dtype=torch.float64)
    return centre + 1e190 * a, -centre + 1e190 * b


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[..., :SPLIT] if rank == 0 else t[..., SPLIT:]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        x, y, mask, x64, y64 = make_data()
        grouped = PearsonState((4,)).update(shard(x, rank), shard(y, rank), shard(mask, rank))
        grouped.all_reduce()
        # One correlation over everything; only rank 0 feeds float64, so both ranks return float64.
        scalar = PearsonState()
        if rank == 0:
            scalar.update(shard(x64, rank), shard(y64, rank))
        else:
            scalar.update(shard(x, rank), shard(y, rank))
        scalar.all_reduce()
        # A rank with nothing to contribute.
        lonely = PearsonState()
        if rank == 1:
            lonely.update(x[0], y[0])
        lonely.all_reduce()
        extreme_x, extreme_y = extreme_data()
        extreme = PearsonState().update(extreme_x[rank], extreme_y[rank])
        extreme.all_reduce()
        mismatch = PearsonState((rank + 1,))
        try:
            mismatch.all_reduce()
            error = ""
        except ValueError as exc:
            error = str(exc)
        torch.save({"grouped": grouped.state_dict(), "scalar": scalar.state_dict(),
                    "lonely": lonely.state_dict(),
                    "extreme": extreme.state_dict(), "error": error}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, timeout: float = 120.0) -> list[dict]:
    context = mp.start_processes(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_all_reduce_equals_single_process(tmp_path):
    results = run_ranks(tmp_path)
    x, y, mask, x64, y64 = make_data()
    single = {
        "grouped": PearsonState((4,)).update(x, y, mask),
        "scalar": PearsonState().update(shard(x64, 0), shard(y64, 0)).update(shard(x, 1), shard(y, 1)),
        "lonely": PearsonState().update(x[0], y[0]),
    }
    extreme_x, extreme_y = extreme_data()
    exact = exact_pearson(extreme_x.reshape(-1).tolist(), extreme_y.reshape(-1).tolist())
    for rank, result in enumerate(results):
        restored = PearsonState()
        restored.load_state_dict(result["extreme"])
        got = restored.compute()
        assert got.corr.dtype == torch.float64 and bool(got.valid), rank
        assert abs(float(got.corr) / exact - 1.0) < 1e-13, (rank, float(got.corr), exact)
    for name, state in single.items():
        want = state.state_dict()
        for rank, result in enumerate(results):
            got = result[name]
            # Every rank merged the same gathered states in the same order: identical bits.
            for key in want:
                assert torch.equal(got[key], results[0][name][key]), (name, key, rank)
            assert torch.equal(got["n"], want["n"])
            assert bool(got["float64_output"]) == bool(want["float64_output"])
            for key in ("mean_x", "mean_y"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-15, atol=1e-9)
            got_raw, want_raw = raw_sums(got), raw_sums(want)
            for key in ("m2_x", "m2_y", "c_xy"):
                torch.testing.assert_close(got_raw[key], want_raw[key], rtol=1e-9,
                                           atol=1e-9 * float(want_raw["m2_x"].max()))
            restored = PearsonState(state.shape)
            restored.load_state_dict(got)
            torch.testing.assert_close(restored.compute().corr, state.compute().corr, rtol=0, atol=1e-7)
    assert bool(results[0]["scalar"]["float64_output"])
    for result in results:
        assert "different shapes" in result["error"], result["error"]
