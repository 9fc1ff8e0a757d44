"""float64 Pearson over the whole float64 range (1e-300 .. 1e300): pearson, segment_pearson
and PearsonState (update, merge, state_dict) on both backends against an exact
``fractions.Fraction`` reference, SciPy's own extreme-value cases included.

Raw co-moments of such data leave float64's range (squares of 1e200 overflow, of
1e-160 are subnormal); the state keeps them in units of per-group scales instead.
"""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from entropy_gpu import PearsonState, pearson, segment_pearson
from entropy_gpu.correlation.comoments import CoMoments
from tests.correlation.pearson_reference import exact_pearson, raw_sums
from tests.helpers import TEST_DEVICE

BACKENDS = ["torch", "triton"]
# A correlation from float64 co-moments is a few ulps from the exact one (1.1e-16 each).
RTOL = 1e-13

# scipy/stats/tests/test_stats.py (TestPearsonr): the data and the mpmath answers that
# SciPy asserts with assert_allclose (rtol 1e-7).
SCIPY_CASES = {
    "very small input values": (
        [0.004434375, 0.004756007, 0.003911996, 0.0038005, 0.003409971],
        [2.48e-188, 7.41e-181, 4.09e-208, 2.08e-223, 2.66e-245], 0.7272930540750450),
    "very large input values": (
        [0.0, 0.0, 0.0, 1e90, 1e90, 1e90, 1e90], [i * 1e90 for i in range(7)], 0.8660254037844386),
    "extremely large input values": (
        [2.3e200, 4.5e200, 6.7e200, 8e200], [1.2e199, 5.5e200, 3.3e201, 1.0e200], 0.351312332103289),
}


def f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=TEST_DEVICE)


def correlated_pairs(n: int, exponent_x: int, exponent_y: int, rho: float, seed: int):
    """``n`` pairs with correlation about ``rho``, spread 10**exponent, off-centre means."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dtype=torch.float64, generator=gen)
    b = rho * a + math.sqrt(1 - rho * rho) * torch.randn(n, dtype=torch.float64, generator=gen)
    return f64((a + 3.0) * 10.0 ** exponent_x), f64((b - 2.0) * 10.0 ** exponent_y)


def assert_exact(got: torch.Tensor, x, y, weight=None, context: str = "") -> None:
    want = exact_pearson(x.tolist(), y.tolist(), None if weight is None else weight.tolist())
    assert not math.isnan(want), context
    assert got.dtype == torch.float64, context
    assert math.isclose(float(got), want, rel_tol=RTOL, abs_tol=0.0), \
        f"{context}: {float(got)!r} vs exact {want!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SCIPY_CASES))
def test_scipy_extreme_value_cases(backend, case):
    x_list, y_list, scipy_answer = SCIPY_CASES[case]
    x, y = f64(x_list), f64(y_list)
    got = pearson(x, y, backend=backend)
    assert bool(got.valid), case
    assert math.isclose(float(got.corr), scipy_answer, rel_tol=1e-7), (case, float(got.corr))
    assert_exact(got.corr, x, y, context=case)
    cu = torch.tensor([0, x.numel()], device=TEST_DEVICE)
    assert_exact(segment_pearson(x, y, cu, backend=backend).corr[0], x, y, context=f"{case} segment_pearson")
    state = PearsonState(backend=backend)
    for first in range(x.numel()):  # one pair per update: every pair goes through a merge
        state.update(x[first:first + 1], y[first:first + 1])
    assert_exact(state.compute().corr, x, y, context=f"{case} PearsonState")
    # The same data moved to the edges of the range (max 1e-160 was silently 1e-3 off before).
    for top in (1e-300, 1e-160, 1e160, 1e300):
        xs, ys = x / x.abs().max() * top, y / y.abs().max() * top
        assert_exact(pearson(xs, ys, backend=backend).corr, xs, ys, context=f"{case} rescaled to {top:g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_scale_in_one_call(backend):
    """Rows (pearson) and packed segments (segment_pearson, one kernel launch) at scales
    from 1e-300 to 1e300, x and y at their own scales, weighted and not."""
    exponents = [(-300, -300), (-250, 120), (-200, -200), (-160, -160), (-100, 40), (0, 0),
                 (100, -290), (160, 160), (200, 200), (300, -300), (300, 300)]
    length = 40
    rows = [correlated_pairs(length, ex, ey, rho, seed)
            for seed, ((ex, ey), rho) in enumerate(zip(exponents, [0.9, -0.6, 0.3, 0.99, -0.2] * 3))]
    x = torch.stack([r[0] for r in rows])
    y = torch.stack([r[1] for r in rows])
    gen = torch.Generator().manual_seed(5)
    weight = f64(torch.rand(x.shape, dtype=torch.float64, generator=gen))
    weight[:, ::7] = 0.0
    by_row = pearson(x, y, backend=backend)
    weighted = pearson(x, y, weight=weight, backend=backend)
    cu = torch.arange(len(rows) + 1, device=TEST_DEVICE) * length
    packed = segment_pearson(x.reshape(-1), y.reshape(-1), cu, weight=weight.reshape(-1), backend=backend)
    assert by_row.valid.all() and weighted.valid.all() and packed.valid.all()
    for i, (ex, ey) in enumerate(exponents):
        context = f"{backend} x ~ 1e{ex}, y ~ 1e{ey}"
        assert_exact(by_row.corr[i], x[i], y[i], context=context)
        assert_exact(weighted.corr[i], x[i], y[i], weight[i], context=f"{context} weighted")
        assert_exact(packed.corr[i], x[i], y[i], weight[i], context=f"{context} segment")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merges_of_states_at_very_different_scales(backend):
    """The union's correlation whatever the scales of the merged states: one negligible
    next to the other, or clusters 1e10 spreads apart (the between-means term dominates)."""
    tiny = correlated_pairs(30, -300, -280, 0.8, 1)
    huge = correlated_pairs(30, 300, 290, -0.5, 2)
    left = correlated_pairs(30, 190, 190, 0.1, 3)
    right = correlated_pairs(30, 190, 190, -0.1, 4)
    clusters = ((left[0] + 1e200, left[1] - 1e200), (right[0] - 1e200, right[1] + 1e200))
    for label, parts in (("1e-300 with 1e300", (tiny, huge)), ("clusters at +-1e200", clusters),
                         ("1e300 with 1e-300", (huge, tiny))):
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        states = [PearsonState(backend=backend).update(px, py) for px, py in parts]
        merged = states[0].merge(states[1])
        assert_exact(merged.compute().corr, x, y, context=f"{backend} {label}: merge")
        assert_exact(PearsonState(backend=backend).update(x, y).compute().corr, x, y,
                     context=f"{backend} {label}: one update")
        assert_exact(pearson(x, y, backend=backend).corr, x, y, context=f"{backend} {label}: pearson")


def test_random_splits_at_1e_minus_250_merge_like_one_pass():
    rng = random.Random(11)
    x, y = correlated_pairs(300, -250, -240, 0.7, 6)
    one_pass = PearsonState().update(x, y).compute().corr
    for _ in range(3):
        cuts = [0, *sorted(rng.randint(0, 300) for _ in range(7)), 300]
        states = [PearsonState().update(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
        rng.shuffle(states)
        merged = states[0]
        for other in states[1:]:
            merged.merge(other)
        assert_exact(merged.compute().corr, x, y, context=f"cuts {cuts}")
        assert math.isclose(float(merged.compute().corr), float(one_pass), rel_tol=RTOL)


def test_state_dict_keeps_the_scales_and_old_state_dicts_load():
    x, y = correlated_pairs(50, 250, -250, 0.6, 7)
    state = PearsonState().update(x, y)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert set(saved) == {*CoMoments._fields, "float64_output"}
    restored = PearsonState()
    restored.load_state_dict(saved)
    assert torch.equal(restored.compute().corr, state.compute().corr)
    assert_exact(restored.compute().corr, x, y, context="restored")

    # A state_dict from before the scales: raw sums under m2_x, m2_y, c_xy (moderate data).
    a, b = correlated_pairs(60, 3, -2, -0.4, 8)
    modern = PearsonState().update(a[:40], b[:40]).state_dict()
    legacy = {k: modern[k] for k in ("n", "mean_x", "mean_y", "float64_output")} | raw_sums(modern)
    old = PearsonState()
    old.load_state_dict(legacy)
    assert_exact(old.compute().corr, a[:40], b[:40], context="legacy state")
    old.merge(PearsonState().update(a[40:], b[40:]))  # and it keeps merging correctly
    assert_exact(old.compute().corr, a, b, context="legacy state merged with a new one")

    partial = dict(modern)
    del partial["scale_y"]
    with pytest.raises(ValueError, match=r"lacks \['scale_y'\]"):
        PearsonState().load_state_dict(partial)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        PearsonState().load_state_dict([modern])


def test_constant_and_degenerate_groups_stay_undefined_at_the_extremes():
    constant = f64([1e-300] * 5)
    varying = f64([1e300, -1e300, 2e300, 0.0, 5e299])
    for backend in BACKENDS:
        for xs, ys in ((constant, varying), (varying, constant)):
            got = pearson(xs, ys, backend=backend)
            assert not bool(got.valid) and math.isnan(float(got.corr)), backend
        # Differences beyond float64's range (|x - pivot| > 1.8e308): inf, so undefined, not wrong.
        beyond = pearson(f64([1.7e308, -1.7e308, 0.0]), f64([1.0, 2.0, 4.0]), backend=backend)
        assert not bool(beyond.valid) and math.isnan(float(beyond.corr)), backend
    merged = PearsonState().update(constant, varying).merge(PearsonState().update(constant, -varying))
    assert not bool(merged.compute().valid)
