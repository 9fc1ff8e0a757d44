"""CorR-PO regularizer math: hand-worked cases, undefined correlations, layouts, and a
float64 reference from full logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from entropy_gpu.corrpo.reward import (
    CorrPOConfig,
    corrpo_from_logits,
    corrpo_from_stats,
    corrpo_term,
    group_advantages,
)
from tests.reference import reference_stats


def _pearson64(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = (dx * dx).sum(), (dy * dy).sum()
    return float((dx * dy).sum() / math.sqrt(sxx * syy)) if sxx > 0 and syy > 0 else math.nan


LOGIT_SPACE = CorrPOConfig(measure="nll_grad_norm")


def test_hand_worked_rewards_and_advantages():
    # Completion 0: entropy 1,2,3 vs measure 3,2,1 -> rho = -1 (perfect inversion).
    # Completion 1: entropy 1,2,3 vs measure 1,2,4 -> rho = 3 / sqrt(2 * 42/9) = 9 / sqrt(84).
    entropy = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    measure = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 4.0]])
    out = corrpo_from_stats(entropy, measure, rewards=torch.tensor([1.0, 0.0]), group_size=2,
                            config=CorrPOConfig(coef=0.5))
    rho1 = 9 / math.sqrt(84)
    torch.testing.assert_close(out.correlation, torch.tensor([-1.0, rho1]))
    assert out.valid.tolist() == [True, True]
    torch.testing.assert_close(out.term, torch.tensor([1.0, -rho1]))
    torch.testing.assert_close(out.bonus, torch.tensor([0.5, -0.5 * rho1]))
    # r' = [1.5, -0.5 rho1]; two-element group: A = +-(d/2) / (|d| / sqrt 2 + eps), d = r'0 - r'1
    d = 1.5 + 0.5 * rho1
    torch.testing.assert_close(out.rewards, torch.tensor([1.5, -0.5 * rho1]))
    want = (d / 2) / (d / math.sqrt(2) + 1e-4)
    torch.testing.assert_close(out.advantages, torch.tensor([want, -want]))


def test_metrics_hand_worked():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 0.0]])
    measure = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]] * 3, dtype=torch.bool)
    m = corrpo_from_stats(entropy, measure, mask,
                          config=CorrPOConfig(coef=0.1, measure="nll_grad_norm")).metrics
    assert m["corrpo/correlation"] == pytest.approx(0.0)  # mean of -1 and +1; the constant row is undefined
    assert m["corrpo/inversion_rate"] == pytest.approx(0.5)
    assert m["corrpo/undefined"] == 1.0 and m["corrpo/undefined_fraction"] == pytest.approx(1 / 3)
    assert m["corrpo/entropy"] == pytest.approx((6 + 6 + 15) / 9)
    assert m["corrpo/nll_grad_norm"] == pytest.approx(2.0)
    assert m["corrpo/bonus"] == pytest.approx((0.1 - 0.1 + 0.0) / 3)


def test_undefined_correlations_contribute_zero_and_never_nan():
    entropy = torch.tensor([[0.7, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [1.0, 5.0, 0.0]])
    measure = torch.tensor([[0.3, 0.0, 0.0], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # one token | constant entropy | constant measure | no tokens
    out = corrpo_from_stats(entropy, measure, mask, rewards=torch.tensor([1.0, 1.0, 0.0, 0.0]), group_size=4)
    assert out.valid.tolist() == [False] * 4
    assert out.correlation.isnan().all()
    assert (out.term == 0).all() and (out.bonus == 0).all()
    assert torch.isfinite(out.rewards).all() and torch.isfinite(out.advantages).all()
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert out.metrics["corrpo/undefined"] == 4.0
    assert math.isnan(out.metrics["corrpo/correlation"])  # no defined rho: NaN, not a silent 0


def test_phi_variants_and_clipping():
    rho = torch.tensor([-0.8, 0.5, float("nan")])
    valid = torch.tensor([True, True, False])
    torch.testing.assert_close(corrpo_term(rho, valid, CorrPOConfig()), torch.tensor([0.8, -0.5, 0.0]))
    torch.testing.assert_close(corrpo_term(rho, valid, CorrPOConfig(phi="negative_part")),
                               torch.tensor([0.8, 0.0, 0.0]))
    torch.testing.assert_close(corrpo_term(rho, valid, CorrPOConfig(clip=0.6)),
                               torch.tensor([0.6, -0.5, 0.0]))
    cubic = CorrPOConfig(phi=lambda r: -(r ** 3))
    torch.testing.assert_close(corrpo_term(rho, valid, cubic), torch.tensor([0.512, -0.125, 0.0]))
    inf_phi = CorrPOConfig(phi=lambda r: 1 / (r - 0.5))  # a user phi that blows up still yields no NaN/inf
    assert torch.isfinite(corrpo_term(rho, valid, inf_phi)).all()


def test_group_pooling_hand_worked():
    # Group of two: c0 entropy [0,1], measure [0,1]; c1 entropy [2,3], measure [1,0].
    # Pooled entropy mean 1.5, var 1.25; measure mean 0.5, var 0.25. z-products:
    # c0: ((-1.5)(-1) + (-0.5)(1)) / sqrt(1.25) / 2 = 1/sqrt(5); c1: -1/sqrt(5). Pooled Pearson = 0.
    entropy = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    measure = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = corrpo_from_stats(entropy, measure, group_size=2, config=CorrPOConfig(pooling="group"))
    torch.testing.assert_close(out.correlation, torch.tensor([1 / math.sqrt(5), -1 / math.sqrt(5)]))
    # Per completion, both are perfect +-1 correlations:
    per_completion = corrpo_from_stats(entropy, measure, group_size=2)
    torch.testing.assert_close(per_completion.correlation, torch.tensor([1.0, -1.0]))


def test_group_pooling_one_token_completions_are_defined_and_groups_are_separate():
    entropy = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    measure = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    out = corrpo_from_stats(entropy, measure, mask, group_size=2, config=CorrPOConfig(pooling="group"))
    # Group 0: entropy [1,3] mean 2 var 1; measure [2,0] mean 1 var 1: z-products -1 and -1.
    torch.testing.assert_close(out.correlation[:2], torch.tensor([-1.0, -1.0]))
    assert out.valid.tolist() == [True, True, False, False]  # group 1 has constant entropy
    assert (out.term[2:] == 0).all()


def test_group_pooling_matches_numpy_and_averages_to_pooled_pearson():
    g = torch.Generator().manual_seed(3)
    entropy, measure = torch.rand(6, 9, generator=g), torch.rand(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.3
    out = corrpo_from_stats(entropy, measure, mask, group_size=3, config=CorrPOConfig(pooling="group"))
    for group in range(2):
        rows = range(3 * group, 3 * group + 3)
        x = np.concatenate([entropy[i][mask[i]].double().numpy() for i in rows])
        y = np.concatenate([measure[i][mask[i]].double().numpy() for i in rows])
        mx, my, sx, sy = x.mean(), y.mean(), x.std(), y.std()
        for i in rows:
            xi, yi = entropy[i][mask[i]].double().numpy(), measure[i][mask[i]].double().numpy()
            assert out.correlation[i].item() == pytest.approx(((xi - mx) * (yi - my)).mean() / (sx * sy),
                                                              abs=1e-6)
        weights = np.array([mask[i].sum().item() for i in rows], np.float64)
        pooled = float((out.correlation[list(rows)].double().numpy() * weights).sum() / weights.sum())
        assert pooled == pytest.approx(_pearson64(x, y), abs=1e-6)


def test_packed_layout_equals_padded():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 7, 3]
    entropy = [torch.rand(n, generator=g) for n in lengths]
    measure = [torch.rand(n, generator=g) for n in lengths]
    padded_h = torch.nn.utils.rnn.pad_sequence(entropy, batch_first=True)
    padded_g = torch.nn.utils.rnn.pad_sequence(measure, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths],
                                           batch_first=True)
    cu = torch.tensor([0] + list(np.cumsum(lengths)))
    for pooling in ("completion", "group"):
        config = CorrPOConfig(pooling=pooling)
        a = corrpo_from_stats(padded_h, padded_g, mask, group_size=2, config=config)
        b = corrpo_from_stats(torch.cat(entropy), torch.cat(measure), cu_seqlens=cu, group_size=2,
                              config=config)
        torch.testing.assert_close(a.correlation, b.correlation, equal_nan=True)
        assert a.valid.tolist() == b.valid.tolist()
    # A packed mask drops tokens inside segments (e.g. tool output).
    keep = torch.ones(int(cu[-1]), dtype=torch.bool)
    keep[1] = keep[7] = False
    c = corrpo_from_stats(torch.cat(entropy), torch.cat(measure), keep, cu_seqlens=cu)
    ref0 = _pearson64(np.delete(entropy[0].numpy(), 1), np.delete(measure[0].numpy(), 1))
    assert c.correlation[0].item() == pytest.approx(ref0, abs=1e-6)


@pytest.mark.parametrize("measure", ["nll_grad_norm", "entropy_grad_norm"])
@pytest.mark.parametrize("pooling", ["completion", "group"])
def test_from_logits_matches_float64_reference(measure, pooling):
    g = torch.Generator().manual_seed(7)
    n, t, v, temperature = 4, 6, 301, 0.7
    logits = torch.randn(n, t, v, generator=g) * 3
    targets = torch.randint(0, v, (n, t), generator=g)
    targets[0, 4:] = -100
    targets[2, 1:] = -100  # one-token completion: undefined per completion
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    config = CorrPOConfig(coef=0.3, measure=measure, pooling=pooling)
    out = corrpo_from_logits(logits, targets, rewards=rewards, group_size=2, config=config,
                             temperature=temperature)

    ref = reference_stats(logits, targets, temperature=temperature)
    if measure == "entropy_grad_norm":
        ref_measure = ref["entropy_grad_norm"]
    else:
        ref_measure = ref["nll_grad_norm"]
    mask = targets != -100
    if pooling == "completion":
        rho = np.array([_pearson64(ref["entropy"][i][mask[i]], ref_measure[i][mask[i]]) for i in range(n)])
    else:
        rho = np.empty(n)
        for group in range(2):
            rows = [2 * group, 2 * group + 1]
            x = np.concatenate([ref["entropy"][i][mask[i]].numpy() for i in rows])
            y = np.concatenate([ref_measure[i][mask[i]].numpy() for i in rows])
            for i in rows:
                xi, yi = ref["entropy"][i][mask[i]].numpy(), ref_measure[i][mask[i]].numpy()
                rho[i] = ((xi - x.mean()) * (yi - y.mean())).mean() / (x.std() * y.std())
    np.testing.assert_allclose(out.correlation.double().numpy(), rho, atol=1e-4, equal_nan=True)
    term = np.where(np.isnan(rho), 0.0, -rho)
    r = (rewards.double().numpy() + 0.3 * term).reshape(2, 2)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(out.advantages.double().numpy(), adv.reshape(-1), atol=1e-3)
    assert (pooling == "group") == bool(out.valid[2])  # one token: defined only with pooled moments


def test_group_advantages_scales():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    a = group_advantages(r, 3)
    torch.testing.assert_close(a, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, 3, scale="none"),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    batch_std = float(np.std(r.numpy(), ddof=1))
    torch.testing.assert_close(group_advantages(r, 3, scale="batch"),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"measure": "logprob"}, "measure"), ({"phi": "square"}, "phi"), ({"clip": 0.0}, "clip"),
    ({"pooling": "batch"}, "pooling"), ({"coef": float("nan")}, "coef"),
    ({"method": "spearman", "pooling": "group"}, "spearman"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorrPOConfig(**kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        corrpo_from_stats(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rewards must have shape"):
        corrpo_from_stats(torch.rand(2, 3), torch.rand(2, 3), rewards=torch.zeros(3), group_size=2)
    with pytest.raises(ValueError, match="groups"):
        corrpo_from_stats(torch.rand(3, 3), torch.rand(3, 3), group_size=2,
                          config=CorrPOConfig(pooling="group"))


@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=1, max_size=5), min_size=2, max_size=6),
       st.sampled_from(["completion", "group"]))
def test_rewards_are_never_nan(rows, pooling):
    """Degenerate data (ties, constants, one-token rows) never leaks NaN into rewards or advantages."""
    n = len(rows) - len(rows) % 2
    width = max(len(r) for r in rows)
    entropy = torch.zeros(n, width)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, r in enumerate(rows[:n]):
        entropy[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    measure = entropy.flip(1) * 0.5 + 1.0
    out = corrpo_from_stats(entropy, measure, mask, rewards=torch.zeros(n), group_size=2,
                            config=CorrPOConfig(pooling=pooling))
    assert torch.isfinite(out.rewards).all() and torch.isfinite(out.advantages).all()
    assert (out.valid == ~out.correlation.isnan()).all()
    assert (out.term[~out.valid] == 0).all()


def test_from_logits_packed_equals_padded():
    g = torch.Generator().manual_seed(11)
    lengths, v = [4, 2, 6, 1], 97
    logits = [torch.randn(n, v, generator=g) * 2 for n in lengths]
    targets = [torch.randint(0, v, (n,), generator=g) for n in lengths]
    targets[2][0] = -100  # a prompt token inside a packed segment stays out
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    padded = corrpo_from_logits(torch.nn.utils.rnn.pad_sequence(logits, batch_first=True),
                                torch.nn.utils.rnn.pad_sequence(targets, batch_first=True,
                                                                padding_value=-100),
                                rewards=rewards, group_size=2, config=LOGIT_SPACE)
    cu = torch.tensor([0] + list(np.cumsum(lengths)))
    packed = corrpo_from_logits(torch.cat(logits), torch.cat(targets), cu_seqlens=cu, rewards=rewards,
                                group_size=2,
                                config=LOGIT_SPACE)
    torch.testing.assert_close(packed.correlation, padded.correlation, equal_nan=True)
    torch.testing.assert_close(packed.advantages, padded.advantages)
    assert packed.valid.tolist() == [True, True, True, False]


def test_from_logits_runs_with_its_own_default_config():
    """Logits alone cannot give the paper's measure: the default is the logit-space one, named
    in the metrics, and equal to passing it explicitly."""
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(8, 5, 37, generator=g), torch.randint(0, 37, (8, 5), generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    out = corrpo_from_logits(logits, targets, rewards=rewards, group_size=4)
    want = corrpo_from_logits(logits, targets, rewards=rewards, group_size=4, config=LOGIT_SPACE)
    assert "corrpo/nll_grad_norm" in out.metrics
    assert torch.equal(out.advantages, want.advantages)
    assert torch.equal(out.correlation.nan_to_num(), want.correlation.nan_to_num())


def test_from_logits_with_the_papers_measure_says_what_to_call():
    with pytest.raises(ValueError, match=r"corrpo_from_model\(model.*nll_grad_norm"):
        corrpo_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), config=CorrPOConfig())


@pytest.mark.parametrize("group_size", [0, -4, 2.0, True, "4"])
def test_bad_group_size_is_a_value_error_naming_it(group_size):
    logits, targets = torch.randn(8, 5, 37), torch.randint(0, 37, (8, 5))
    entropy, measure = torch.rand(8, 5), torch.rand(8, 5)
    rewards = torch.rand(8)
    group = CorrPOConfig(pooling="group")
    calls = [
        lambda: corrpo_from_logits(logits, targets, rewards=rewards, group_size=group_size,
                                   config=LOGIT_SPACE),
        lambda: corrpo_from_stats(entropy, measure, rewards=rewards, group_size=group_size),
        lambda: corrpo_from_stats(entropy, measure, group_size=group_size, config=group),
        lambda: group_advantages(rewards, group_size),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="group_size must be an int >= 1"):
            call()
