"""pearson and segment_pearson against numpy (float64) on both backends: dtypes, masks,
weights, large means, short and constant rows, empty segments, NaN semantics, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from entropy_gpu import Correlation, pearson, segment_pearson
from entropy_gpu.correlation.comoments import (
    comoments_from_kernel_state,
    correlation,
    segment_comoments_torch,
)
from entropy_gpu.kernels.segment_comoments import STATE_WIDTH, launch_segment_comoments
from tests.helpers import TEST_DEVICE, assert_correlation, reference_rows
from tests.reference import reference_pearson

BACKENDS = ["torch", "triton"]
# The torch backend accumulates in float64, so only the float32 output rounds; the
# Triton kernel accumulates in float32 (float64 for float64 inputs).
ATOL = {("torch", torch.float32): 1e-6, ("triton", torch.float32): 1e-5,
        ("torch", torch.float64): 1e-12, ("triton", torch.float64): 1e-12}


def correlated(rows: int, length: int, dtype=torch.float32, mean: float = 0.0, scale: float = 1.0):
    """Rows with correlations spread over [-1, 1], rounded to ``dtype``, on the test device."""
    rho = torch.linspace(-0.95, 0.95, rows, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(rows, length, dtype=torch.float64)
    y = rho * x + torch.sqrt(1 - rho * rho) * torch.randn(rows, length, dtype=torch.float64)
    return (mean + scale * x).to(TEST_DEVICE, dtype), (-mean + scale * y).to(TEST_DEVICE, dtype)


def atol_for(backend, dtype):
    return ATOL[(backend, torch.float64 if dtype == torch.float64 else torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,length", [(5, 37), (3, 2500)])
def test_matches_numpy(backend, dtype, rows, length):
    x, y = correlated(rows, length, dtype, scale=3.0)
    mask = torch.rand(rows, length, device=TEST_DEVICE) < 0.8
    for m in (None, mask):
        got = pearson(x, y, m, backend=backend)
        assert got.corr.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.n.dtype == torch.float64 and got.valid.dtype == torch.bool
        assert_correlation(got, *reference_rows(x, y, m), atol=atol_for(backend, dtype),
                           context=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_1e6_unit_variance(backend, dtype):
    """Sum-of-products formulas lose everything here; co-moments must not."""
    x, y = correlated(4, 3000, dtype, mean=1e6)
    got = pearson(x, y, backend=backend)
    want, n = reference_rows(x, y)
    assert_correlation(got, want, n, atol=atol_for(backend, dtype), context=f"{backend} {dtype}")
    if dtype == torch.float32:
        # The data really are hard: the textbook one-pass formula in float32 is far off.
        k = x.shape[1]
        sxy, sx, sy = (x * y).sum(1), x.sum(1), y.sum(1)
        var_x, var_y = k * (x * x).sum(1) - sx * sx, k * (y * y).sum(1) - sy * sy
        naive = (k * sxy - sx * sy) / torch.sqrt(var_x * var_y)
        assert not torch.allclose(naive.double().cpu(), want, atol=0.1, equal_nan=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_matches_numpy(backend):
    x, y = correlated(4, 300, torch.float32)
    weight = torch.rand(4, 300, device=TEST_DEVICE) * 3
    weight[weight < 0.6] = 0.0  # zero weight = left out
    weight[1] = torch.randint(0, 4, (300,), device=TEST_DEVICE).float()  # integer weights = repeated pairs
    x[weight == 0] = float("nan")  # pairs of weight 0 are left out whatever their values
    got = pearson(x, y, weight=weight, backend=backend)
    assert_correlation(got, *reference_rows(x, y, weight=weight), atol=atol_for(backend, torch.float32))
    # Integer weights equal repeating each pair that many times.
    reps = weight[1].long()
    repeated = pearson(x[1].repeat_interleave(reps), y[1].repeat_interleave(reps), backend=backend)
    torch.testing.assert_close(repeated.corr, got.corr[1], atol=2e-6, rtol=0)
    assert repeated.n == got.n[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_weight_combine(backend):
    x, y = correlated(3, 100, torch.float64)
    mask = torch.rand(3, 100, device=TEST_DEVICE) < 0.5
    weight = torch.rand(3, 100, dtype=torch.float64, device=TEST_DEVICE)
    got = pearson(x, y, mask, weight=weight, backend=backend)
    want = pearson(x, y, weight=torch.where(mask, weight, 0.0), backend="torch")
    torch.testing.assert_close(got.corr, want.corr, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.n, (weight * mask).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_and_constant_rows_are_undefined(backend):
    rows = [
        ([], []),                                   # length 0
        ([1.0], [2.0]),                             # length 1
        ([1.0, 2.0], [5.0, 3.0]),                   # length 2: exactly -1
        ([1.0, 1.0], [5.0, 3.0]),                   # length 2, x constant
        ([0.1] * 7, [float(i) for i in range(7)]),  # constant whose mean does not round back to 0.1
        ([1e6 + 0.5] * 5, [3.0, 1.0, 4.0, 1.0, 5.0]),
        ([2.0, 4.0, 8.0], [-1.0, -1.0, -1.0]),      # y constant
        ([3.0, 1.0, 2.0], [6.0, 2.0, 4.0]),         # exactly +1
    ]
    for values_x, values_y in rows:
        x = torch.tensor([values_x], dtype=torch.float32, device=TEST_DEVICE).reshape(1, -1)
        y = torch.tensor([values_y], dtype=torch.float32, device=TEST_DEVICE).reshape(1, -1)
        got = pearson(x, y, backend=backend)
        assert_correlation(got, *reference_rows(x, y), atol=1e-6, context=f"{values_x} {values_y}")
        assert got.n.item() == len(values_x)
    # A row masked down to one pair, and a fully masked row.
    x, y = correlated(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool, device=TEST_DEVICE)
    mask[0, 3] = True
    got = pearson(x, y, mask, backend=backend)
    assert not got.valid.any() and torch.isnan(got.corr).all() and got.n.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_semantics(backend):
    x, y = correlated(5, 40)
    x[0, 3] = float("nan")    # used NaN: row undefined
    y[1, 7] = float("inf")    # used inf: row undefined
    x[2, 5] = float("nan")    # masked NaN: ignored
    y[3, 9] = -float("inf")   # masked inf: ignored
    mask = torch.ones(5, 40, dtype=torch.bool, device=TEST_DEVICE)
    mask[2, 5] = mask[3, 9] = False
    got = pearson(x, y, mask, backend=backend)
    want, n = reference_rows(x, y, mask)
    assert math.isnan(want[0]) and math.isnan(want[1]) and not want[2:].isnan().any()
    assert_correlation(got, want, n, atol=atol_for(backend, torch.float32))
    clean = pearson(x[2:4], y[2:4], mask[2:4], backend=backend)
    torch.testing.assert_close(got.corr[2:4], clean.corr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_extreme_scales_keep_accuracy(backend, scale):
    """Squares of such values under- or overflow float32; the kernel's running scale avoids it."""
    x, y = correlated(3, 1500, torch.float64)
    xs, ys = (x * scale).float(), (y * scale).float()
    assert_correlation(pearson(xs, ys, backend=backend), *reference_rows(xs, ys),
                       atol=atol_for(backend, torch.float32))
    x64, y64 = x * scale ** 5, y * scale ** 5  # 1e-150 .. 1e150: squares leave float64's range
    assert_correlation(pearson(x64, y64, backend=backend), *reference_rows(x64, y64), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dim_layout_and_empty_shapes(backend):
    x, y = correlated(6, 30, torch.float32)
    x3, y3 = x.reshape(2, 3, 30).transpose(1, 2), y.reshape(2, 3, 30).transpose(1, 2)  # [2, 30, 3], strided
    got = pearson(x3, y3, dim=1, backend=backend)
    assert got.corr.shape == (2, 3)
    want = pearson(x, y, backend="torch")
    torch.testing.assert_close(got.corr.reshape(-1), want.corr, atol=atol_for(backend, torch.float32), rtol=0)
    got0 = pearson(x.T, y.T, dim=0, backend=backend)
    torch.testing.assert_close(got0.corr, want.corr, atol=atol_for(backend, torch.float32), rtol=0)
    one = pearson(x[0], y[0], backend=backend)  # 1-D input: a 0-d result
    assert one.corr.shape == () and one.valid.shape == () and one.n.shape == ()
    no_rows = torch.empty(0, 5, device=TEST_DEVICE)
    empty_rows = pearson(no_rows, no_rows, backend=backend)
    assert empty_rows.corr.shape == (0,) and empty_rows.n.shape == (0,)
    zero_length = torch.empty(3, 0, device=TEST_DEVICE)
    no_pairs = pearson(zero_length, zero_length, backend=backend)
    assert no_pairs.n.tolist() == [0.0] * 3 and not no_pairs.valid.any() and no_pairs.corr.isnan().all()


def random_cu_seqlens(lengths):
    return torch.cumsum(torch.tensor([0] + lengths, device=TEST_DEVICE), 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_segment_pearson_matches_numpy(backend, index_dtype):
    lengths = [0, 5, 1, 2, 0, 1500, 17, 0, 3, 64]
    cu = random_cu_seqlens(lengths).to(index_dtype)
    n = int(cu[-1])
    x = torch.randn(n, dtype=torch.float64, device=TEST_DEVICE)
    y = (0.3 * x + torch.randn(n, dtype=torch.float64, device=TEST_DEVICE) + 50.0).float()
    x = x.float()
    mask = torch.rand(n, device=TEST_DEVICE) < 0.9
    for m in (None, mask):
        got = segment_pearson(x, y, cu, m, backend=backend)
        assert got.corr.shape == (len(lengths),)
        want, count = [], []
        for s in range(len(lengths)):
            sl = slice(int(cu[s]), int(cu[s + 1]))
            used = torch.ones(lengths[s], dtype=torch.bool, device=TEST_DEVICE) if m is None else m[sl]
            want.append(reference_pearson(x[sl][used].double().cpu(), y[sl][used].double().cpu()))
            count.append(float(used.sum()))
        assert_correlation(got, torch.tensor(want, dtype=torch.float64), torch.tensor(count),
                           atol=atol_for(backend, torch.float32), context=backend)


def test_segment_pearson_edge_streams():
    nothing = torch.empty(0, device=TEST_DEVICE)
    for backend in BACKENDS:
        zero_offsets = torch.zeros(1, dtype=torch.long, device=TEST_DEVICE)
        none = segment_pearson(nothing, nothing, zero_offsets, backend=backend)
        assert none.corr.shape == (0,)
        empty = segment_pearson(nothing, nothing, torch.zeros(4, dtype=torch.long, device=TEST_DEVICE),
                                backend=backend)
        assert empty.n.tolist() == [0.0] * 3 and not empty.valid.any()


@pytest.mark.parametrize("block", [16, 64, 1024])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_blocks_agree_with_torch_twin(block, weighted):
    """Segments that start mid-block and span many blocks; pivots found in later blocks."""
    lengths = [0, 1, 15, 16, 17, 100, 0, 333, 2]
    cu = random_cu_seqlens(lengths)
    n = int(cu[-1])
    x = torch.randn(n, device=TEST_DEVICE) * 2 + 1e5
    y = torch.randn(n, device=TEST_DEVICE) - 0.5 * x
    weight = None
    if weighted:
        weight = torch.rand(n, device=TEST_DEVICE)
        weight[:40] = 0.0  # the first used pair of segments 2-4 lies past their first block(s)
        weight[torch.rand(n, device=TEST_DEVICE) < 0.2] = 0.0
        x[weight == 0] = float("nan")
    state = torch.empty(len(lengths), STATE_WIDTH, device=TEST_DEVICE)
    launch_segment_comoments(x, y, weight, cu, state, block=block)
    got = correlation(comoments_from_kernel_state(state))
    want = correlation(segment_comoments_torch(x, y, weight, cu))
    assert torch.equal(got.valid, want.valid)
    torch.testing.assert_close(got.corr, want.corr, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(got.n, want.n, rtol=1e-6, atol=0)
    moments = comoments_from_kernel_state(state)
    reference = segment_comoments_torch(x, y, weight, cu)
    # Means: pivot + shifted mean keeps the 1e5 offset exact to float32 rounding of the shift.
    torch.testing.assert_close(moments.mean_x, reference.mean_x, atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: pearson([1.0, 2.0], torch.ones(2)), TypeError, "x must be a torch.Tensor"),
        (lambda: pearson(torch.ones(3), torch.ones(3, dtype=torch.int64)), TypeError, "y must be float16"),
        (lambda: pearson(torch.ones(3), torch.ones(4)), ValueError, "same shape"),
        (lambda: pearson(torch.ones(3), torch.ones(3), torch.ones(3)), TypeError, "torch.bool"),
        (lambda: pearson(torch.ones(3), torch.ones(3), torch.ones(2, dtype=torch.bool)), ValueError,
         "mask must have shape"),
        (lambda: pearson(torch.ones(3), torch.ones(3), weight=-torch.ones(3)), ValueError, "finite and >= 0"),
        (lambda: pearson(torch.ones(3), torch.ones(3), weight=torch.tensor([1.0, float("nan"), 1.0])),
         ValueError, "finite and >= 0"),
        (lambda: pearson(torch.ones(3), torch.ones(3), weight=torch.ones(3, dtype=torch.long)), TypeError,
         "float dtype"),
        (lambda: pearson(torch.ones(3), torch.ones(3), dim=1), ValueError, "out of range"),
        (lambda: pearson(torch.ones(3), torch.ones(3), dim=0.5), TypeError, "dim must be an int"),
        (lambda: pearson(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "at least one dimension"),
        (lambda: pearson(torch.ones(3), torch.ones(3), backend="cuda"), ValueError, "backend must be one of"),
        (lambda: segment_pearson(torch.ones(1, 3), torch.ones(1, 3), torch.tensor([0, 3])), ValueError,
         "1-D"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), [0, 3]), TypeError, "cu_seqlens must be"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), torch.tensor([0.0, 3.0])), TypeError,
         "int32 or int64"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), torch.tensor([[0, 3]])), ValueError,
         "1-D with S"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), torch.tensor([1, 3])), ValueError,
         "start at 0"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), torch.tensor([0, 2])), ValueError, "end at"),
        (lambda: segment_pearson(torch.ones(3), torch.ones(3), torch.tensor([0, 3, 1, 3])), ValueError,
         "non-decreasing"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_correlation_is_a_named_tuple():
    got = pearson(torch.randn(2, 9), torch.randn(2, 9))
    assert isinstance(got, Correlation) and got._fields == ("corr", "valid", "n")
    corr, valid, n = got
    assert corr is got.corr


# Property tests: arbitrary float32 data (up to 2^100 in magnitude, so that differences
# stay finite in float32), any length, both backends.
finite32 = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def pairs(draw, max_len=40):
    n = draw(st.integers(0, max_len))
    x = torch.from_numpy(draw(arrays(np.float32, n, elements=finite32)))
    y = torch.from_numpy(draw(arrays(np.float32, n, elements=finite32)))
    mask = torch.from_numpy(draw(arrays(np.bool_, n)))
    return x.to(TEST_DEVICE), y.to(TEST_DEVICE), mask.to(TEST_DEVICE)


@given(pairs(), st.sampled_from(BACKENDS))
def test_property_matches_reference(data, backend):
    x, y, mask = data
    for m in (None, mask):
        got = pearson(x, y, m, backend=backend)
        rows_mask = None if m is None else m.unsqueeze(0)
        assert_correlation(got, *reference_rows(x.unsqueeze(0), y.unsqueeze(0), rows_mask),
                           atol=atol_for(backend, torch.float32))


@given(pairs(), st.sampled_from(BACKENDS), st.integers(-20, 20), st.integers(-20, 20), st.booleans())
def test_property_symmetry_and_power_of_two_scaling(data, backend, kx, ky, flip):
    """corr(y, x) = corr(x, y) (to a few ulps: products associate in another order);
    scaling by +-2^k changes no rounding, so the result is bit-identical up to the sign."""
    x, y, mask = data
    x, y = x.double(), y.double()
    base = pearson(x, y, mask, backend=backend)
    swapped = pearson(y, x, mask, backend=backend)
    torch.testing.assert_close(swapped.corr, base.corr, rtol=0, atol=1e-14, equal_nan=True)
    assert torch.equal(swapped.valid, base.valid)
    sign = -1.0 if flip else 1.0
    scaled = pearson(sign * 2.0 ** kx * x, 2.0 ** ky * y, mask, backend=backend)
    torch.testing.assert_close(scaled.corr, sign * base.corr, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(scaled.valid, base.valid)


@given(pairs(), st.sampled_from(BACKENDS))
def test_property_mask_equals_dropping_pairs(data, backend):
    x, y, mask = data
    masked = pearson(x, y, mask, backend=backend)
    dropped = pearson(x[mask], y[mask], backend=backend)
    # Same pairs, same order; the kernel's tree sums see them in other lanes (ulp-level changes).
    atol = 0.0 if backend == "torch" else atol_for(backend, torch.float32)
    torch.testing.assert_close(masked.corr, dropped.corr, rtol=0, atol=atol, equal_nan=True)
    assert torch.equal(masked.valid, dropped.valid) and masked.n == dropped.n


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_cu_seqlens_are_memory_safe(backend):
    x, y = torch.randn(40, device=TEST_DEVICE), torch.randn(40, device=TEST_DEVICE)
    cu = torch.tensor([0, 7, 7, 40], device=TEST_DEVICE)
    checked = segment_pearson(x, y, cu, backend=backend)
    unchecked = segment_pearson(x, y, cu, backend=backend, check_cu_seqlens=False)
    torch.testing.assert_close(unchecked.corr, checked.corr, equal_nan=True, rtol=0, atol=0)
    # Wild offsets: meaningless segments, but no exception and no access outside x
    # (the interpreter raises on an out-of-bounds pointer).
    wild = torch.tensor([-(2**40), 5, -3, 2**40, 3], device=TEST_DEVICE)
    got = segment_pearson(x, y, wild, backend=backend, check_cu_seqlens=False)
    assert got.corr.shape == (4,)
    with pytest.raises(TypeError, match="int32 or int64"):
        segment_pearson(x, y, wild.float(), backend=backend, check_cu_seqlens=False)


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("entropy_gpu.correlation.pearson", "entropy_gpu.correlation.spearman"):
        module = importlib.import_module(name)
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
