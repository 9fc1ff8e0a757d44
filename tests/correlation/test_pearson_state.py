"""PearsonState: random splits merged in random orders equal one pass; groups, weights,
state_dict round trips, empty states and bad input."""

from __future__ import annotations

import io
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from entropy_gpu import PearsonState, pearson
from tests.correlation.pearson_reference import raw_sums
from tests.helpers import TEST_DEVICE, assert_correlation, reference_rows


def split_points(n: int, pieces: int, rng: random.Random) -> list[int]:
    return [0, *sorted(rng.randint(0, n) for _ in range(pieces - 1)), n]


def merge_randomly(states: list[PearsonState], rng: random.Random) -> PearsonState:
    """Merge in a random tree: pick two states, fold one into the other, repeat."""
    pool = list(states)
    while len(pool) > 1:
        a, b = rng.sample(range(len(pool)), 2)
        merged = pool[a].merge(pool[b])
        pool = [s for i, s in enumerate(pool) if i not in (a, b)] + [merged]
    return pool[0]


def assert_same_state(got: PearsonState, want: PearsonState, rtol: float) -> None:
    """Same counts; means and co-moments equal to ``rtol`` of their natural scale."""
    g, w = got.state_dict(), want.state_dict()
    assert torch.equal(g["n"], w["n"])
    g, w = {**g, **raw_sums(g)}, {**w, **raw_sums(w)}
    torch.testing.assert_close(g["mean_x"], w["mean_x"], rtol=1e-15, atol=1e-9)
    torch.testing.assert_close(g["mean_y"], w["mean_y"], rtol=1e-15, atol=1e-9)
    for k in ("m2_x", "m2_y", "c_xy"):
        scale = float(torch.sqrt(w["m2_x"] * w["m2_y"]).max()) + 1e-300
        torch.testing.assert_close(g[k], w[k], rtol=0, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}")


@given(
    n=st.integers(0, 400),
    pieces=st.integers(1, 12),
    mean=st.sampled_from([0.0, 1e6, -3e4]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_splits_in_random_order_equal_one_pass(n, pieces, mean, seed, dtype):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    y = -0.4 * x + torch.randn(n, dtype=torch.float64, generator=gen)
    x, y = (x + mean).to(dtype), (y + mean).to(dtype)
    cuts = split_points(n, pieces, rng)
    states = [PearsonState().update(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = merge_randomly(states, rng)
    one_pass = PearsonState().update(x, y)
    # Merges subtract float64 means: relative error ~ eps64 * |mean| / std (1e-10 at mean 1e6).
    conditioning = 1e-13 * (1.0 + abs(mean))
    assert_same_state(merged, one_pass, rtol=conditioning)
    got = merged.compute()
    assert got.corr.dtype == dtype
    assert_correlation(got, *reference_rows(x.unsqueeze(0), y.unsqueeze(0)),
                       atol=conditioning if dtype == torch.float64 else 1e-6)


def test_triton_updates_merge_like_one_pass():
    rng = random.Random(7)
    x = torch.randn(3000, device=TEST_DEVICE) * 2 + 1e6
    y = 0.7 * (x - 1e6) + torch.randn(3000, device=TEST_DEVICE)
    for _ in range(3):
        cuts = split_points(3000, 6, rng)
        states = [PearsonState(backend="triton").update(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
        merged = merge_randomly(states, rng).compute()
        assert_correlation(merged, *reference_rows(x.unsqueeze(0), y.unsqueeze(0)), atol=1e-5,
                           context=f"cuts {cuts}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_groups_masks_and_weights(backend):
    x = torch.randn(3, 4, 50, device=TEST_DEVICE)
    slopes = torch.tensor([1.0, -0.5, 0.0], device=TEST_DEVICE).view(3, 1, 1)
    y = x * slopes + torch.randn(3, 4, 50, device=TEST_DEVICE)
    mask = torch.rand(3, 4, 50, device=TEST_DEVICE) < 0.7
    weight = torch.rand(3, 4, 50, device=TEST_DEVICE)
    state = PearsonState((3,), backend=backend)
    state.update(x[:, :1], y[:, :1], mask[:, :1], weight=weight[:, :1])  # [3, 1, 50]
    state.update(x[:, 1:], y[:, 1:], mask[:, 1:], weight=weight[:, 1:])  # [3, 3, 50]
    got = state.compute()
    assert got.corr.shape == (3,)
    w = (weight * mask).reshape(3, -1)
    want = pearson(x.reshape(3, -1), y.reshape(3, -1), weight=w, backend="torch")
    torch.testing.assert_close(got.corr, want.corr, atol=1e-5 if backend == "triton" else 1e-6, rtol=0)
    torch.testing.assert_close(got.n, w.double().sum(1), rtol=1e-6, atol=0)


def test_empty_states():
    empty = PearsonState()
    got = empty.compute()
    assert got.corr.isnan() and not got.valid and got.n == 0 and got.corr.dtype == torch.float32
    x, y = torch.randn(20), torch.randn(20)
    filled = PearsonState().update(x, y)
    want = filled.compute()
    for merged in (PearsonState().merge(filled), PearsonState().update(x, y).merge(PearsonState()),
                   PearsonState().update(x[:0], y[:0]).merge(filled)):
        torch.testing.assert_close(merged.compute().corr, want.corr, rtol=0, atol=0)
    both = PearsonState().merge(PearsonState()).compute()
    assert both.corr.isnan() and both.n == 0


def test_state_dict_round_trip_and_dtype_flag():
    state = PearsonState((2,))
    state.update(torch.randn(2, 30, dtype=torch.float64), torch.randn(2, 30, dtype=torch.float64))
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = PearsonState((2,))
    restored.load_state_dict(torch.load(buffer))
    assert restored.compute().corr.dtype == torch.float64
    torch.testing.assert_close(restored.compute().corr, state.compute().corr, rtol=0, atol=0)
    # The float64 flag survives merging into a float32-fed state.
    other = PearsonState((2,)).update(torch.randn(2, 5), torch.randn(2, 5))
    assert other.compute().corr.dtype == torch.float32
    assert other.merge(restored).compute().corr.dtype == torch.float64


def test_bad_input_raises():
    state = PearsonState((2,))
    with pytest.raises(ValueError, match=r"x must have shape \[2, \.\.\.\]"):
        state.update(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="can only merge a PearsonState"):
        state.merge({"n": 1})
    with pytest.raises(ValueError, match="cannot merge a state of shape"):
        state.merge(PearsonState())
    with pytest.raises(ValueError, match="lacks"):
        state.load_state_dict({"n": torch.zeros(2)})
    bad = PearsonState().state_dict()
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        state.load_state_dict(bad)
    with pytest.raises(ValueError, match="lives on meta"):
        PearsonState(device="meta").update(torch.randn(4), torch.randn(4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        PearsonState().all_reduce()
