"""spearman and segment_spearman against scipy.stats.spearmanr: ties, masks, NaN,
infinities, constant and short rows, empty segments; invariance to monotone maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from entropy_gpu import segment_spearman, spearman
from tests.helpers import assert_correlation, reference_rows
from tests.reference import reference_spearman


def with_ties(rows: int, length: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, levels, (rows, length)).float()
    y = x * torch.linspace(-1, 1, rows).unsqueeze(1) + torch.randint(0, levels, (rows, length)).float()
    return x, y


@pytest.mark.parametrize("levels", [3, 20, 10**6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_scipy_with_ties_and_masks(levels, dtype):
    x, y = with_ties(5, 60, levels)
    x, y = x.to(dtype), y.to(dtype)
    mask = torch.rand(5, 60) < 0.7
    for m in (None, mask):
        got = spearman(x, y, m)
        assert got.corr.dtype == dtype
        assert_correlation(got, *reference_rows(x, y, m, fn=reference_spearman),
                           atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_special_rows():
    inf, nan = float("inf"), float("nan")
    rows = [
        ([], []),
        ([1.0], [1.0]),
        ([1.0, 2.0], [2.0, 1.0]),                       # -1
        ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]),             # constant: undefined
        ([1.0, nan, 3.0], [1.0, 2.0, 3.0]),             # NaN: undefined
        ([-inf, 0.0, inf, inf], [1.0, 2.0, 4.0, 3.0]),  # infinities are ranked
        ([-0.0, 0.0, 1.0], [3.0, 2.0, 1.0]),            # -0 and 0 tie
    ]
    for values_x, values_y in rows:
        x = torch.tensor(values_x, dtype=torch.float64).reshape(1, -1)
        y = torch.tensor(values_y, dtype=torch.float64).reshape(1, -1)
        assert_correlation(spearman(x, y), *reference_rows(x, y, fn=reference_spearman), atol=1e-12,
                           context=str(values_x))
    x = torch.tensor([[1.0, nan, 3.0, 2.0]])
    mask = torch.tensor([[True, False, True, True]])
    assert spearman(x, x * 2, mask).valid.item()  # a masked NaN is ignored


def test_segments_match_scipy():
    lengths = [0, 4, 1, 0, 37, 2, 120]
    cu = torch.cumsum(torch.tensor([0] + lengths), 0)
    n = int(cu[-1])
    x = torch.randint(0, 8, (n,)).double()
    y = torch.randint(0, 8, (n,)).double() + 0.5 * x
    mask = torch.rand(n) < 0.85
    for m in (None, mask):
        got = segment_spearman(x, y, cu, m)
        want = []
        for s in range(len(lengths)):
            sl = slice(int(cu[s]), int(cu[s + 1]))
            used = torch.ones(lengths[s], dtype=torch.bool) if m is None else m[sl]
            want.append(reference_spearman(x[sl][used].numpy(), y[sl][used].numpy()))
        assert_correlation(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_dim_and_shapes():
    x, y = with_ties(6, 25, 5)
    got = spearman(x.T.reshape(25, 2, 3), y.T.reshape(25, 2, 3), dim=0)
    assert got.corr.shape == (2, 3)
    torch.testing.assert_close(got.corr.reshape(-1), spearman(x, y).corr)
    assert spearman(x[0], y[0]).corr.shape == ()
    assert spearman(torch.empty(0, 4), torch.empty(0, 4)).corr.shape == (0,)
    with pytest.raises(ValueError, match="1-D packed"):
        segment_spearman(x, y, torch.tensor([0, 25]))
    with pytest.raises(TypeError, match="torch.bool"):
        spearman(x, y, torch.ones_like(x))


values = arrays(np.float64, st.integers(0, 40), elements=st.floats(-1e6, 1e6, allow_nan=False, width=32))


@given(values, st.integers(0, 2**31 - 1))
def test_rank_invariance_under_monotone_maps(data, seed):
    """Spearman sees only ranks: a strictly increasing map of x leaves it unchanged,
    a decreasing one flips its sign; and it equals scipy."""
    x = torch.from_numpy(data)
    y = torch.randn(x.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).round()
    base = spearman(x, y)
    want = torch.tensor([reference_spearman(data, y.numpy())], dtype=torch.float64)
    assert_correlation(base, want, atol=1e-12)
    up = spearman(x ** 3, y)  # strictly increasing; float32 values stay distinct in float64
    down = spearman(-x, y)
    torch.testing.assert_close(up.corr, base.corr, atol=1e-12, rtol=0, equal_nan=True)
    torch.testing.assert_close(down.corr, -base.corr, atol=1e-12, rtol=0, equal_nan=True)
