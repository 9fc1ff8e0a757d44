"""entropy_change_metrics against numpy: per-sequence and per-token advantages, masks,
non-finite entries, empty batches and bad shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entropy_gpu import entropy_change_metrics


def numpy_metrics(change: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    predicted = (adv * change)[mask]
    return {"adv_weighted_mean": predicted.mean(), "frac_pushing_down": (predicted < 0).mean(),
            "mean": change[mask].mean(), "q10": np.quantile(predicted, 0.1),
            "q50": np.quantile(predicted, 0.5), "q90": np.quantile(predicted, 0.9),
            "tokens": float(predicted.size)}


@pytest.mark.parametrize("per_token", [False, True])
def test_matches_numpy(per_token):
    g = torch.Generator().manual_seed(0)
    change = torch.randn(6, 9, generator=g)
    adv = torch.randn(6, 9, generator=g) if per_token else torch.randn(6, generator=g)
    mask = torch.rand(6, 9, generator=g) < 0.7
    got = entropy_change_metrics(change, adv, mask)
    adv_full = adv.numpy() if per_token else np.broadcast_to(adv.numpy()[:, None], (6, 9))
    want = numpy_metrics(change.double().numpy(), adv_full.astype(np.float64), mask.numpy())
    assert got == pytest.approx({f"entropy_change/{k}": v for k, v in want.items()}, rel=1e-6)


def test_masked_and_non_finite_tokens_are_left_out_and_empty_is_nan():
    change = torch.tensor([[1.0, float("nan"), -2.0], [0.5, 3.0, float("inf")]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    got = entropy_change_metrics(change, adv, mask, quantiles=(0.5,), prefix="")
    # kept: 2 * 1, 2 * -2, -1 * 0.5
    assert got == pytest.approx({"adv_weighted_mean": (2 - 4 - 0.5) / 3, "frac_pushing_down": 2 / 3,
                                 "mean": (1 - 2 + 0.5) / 3, "q50": -0.5, "tokens": 3.0})
    empty = entropy_change_metrics(change, adv, torch.zeros(2, 3, dtype=torch.bool), prefix="")
    assert empty["tokens"] == 0 and all(math.isnan(v) for k, v in empty.items() if k != "tokens")


def test_bad_shapes_raise():
    change = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        entropy_change_metrics(change, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        entropy_change_metrics(change, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        entropy_change_metrics(change, torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="entropy_change"):
        entropy_change_metrics(torch.zeros(6), torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="quantiles"):
        entropy_change_metrics(change, torch.zeros(2), torch.ones(2, 3), quantiles=(1.5,))
