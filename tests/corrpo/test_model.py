"""CorR-PO with the paper's measure: ``CorrPOConfig(measure=...)`` and ``corrpo_from_model``.

The expected values are built independently per completion, unpadded: float64 entropy
from the full logits (tests/reference.py), the estimator on the single sequence, a numpy
Pearson, GRPO's group normalization.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entropy_gpu import estimate_logit_param_grad_norms
from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.corrpo import (
    CorrPOConfig,
    ParamGradMeasure,
    completion_stats,
    corrpo_from_logits,
    corrpo_from_model,
)
from entropy_gpu.param_grad.estimate import same_position_grad_norms
from tests.reference import reference_stats


def _pearson64(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2, seed=4).double()
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # peaked distributions: entropies vary across tokens
    return m


def _batch():
    """4 completions (2 groups of 2), left-padded prompts, right-padded completions."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (n,), generator=gen) for n in (4, 3, 4, 2)]
    completions = [torch.randint(0, 61, (n,), generator=gen) for n in (6, 5, 6, 4)]
    p_w, c_w = 4, 6
    ids = torch.zeros(4, p_w + c_w, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, p_w - p.numel():p_w], ids[i, p_w:p_w + c.numel()] = p, c
        attention[i, p_w - p.numel():p_w + c.numel()] = 1
        completion[i, p_w:p_w + c.numel()] = True
    return ids, attention, completion, prompts, completions


@pytest.mark.parametrize("method", ["forward_mode", "same_position"])
def test_param_grad_measure_matches_unpadded_reference(model, method):
    ids, attention, completion, prompts, completions = _batch()
    spec = ParamGradMeasure(method=method, k=6, seed=2, directions_per_pass=3)
    config = CorrPOConfig(coef=0.5, measure=spec)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    temperature = 0.8
    out = corrpo_from_model(model, ids, completion, attention_mask=attention, rewards=rewards, group_size=2,
                            config=config, temperature=temperature, batch_size=3)
    rho = []
    for p, c in zip(prompts, completions):
        seq = torch.cat([p, c])
        mask = torch.zeros(seq.numel(), dtype=torch.bool)
        mask[p.numel():] = True
        with torch.no_grad():
            logits = model(input_ids=seq[None]).logits[0]
        entropy = reference_stats(logits[p.numel() - 1:-1], c, temperature=temperature)["entropy"]
        if method == "forward_mode":
            measure = estimate_logit_param_grad_norms(model, seq, mask, k=6, seed=2).fro()[0, p.numel():]
        else:
            measure = same_position_grad_norms(model, seq, mask, norms="fro").total["fro"][0, p.numel():]
        rho.append(_pearson64(entropy.double().numpy(), measure.double().numpy()))
    rho = np.array(rho)
    np.testing.assert_allclose(out.correlation.double().numpy(), rho, atol=1e-5)
    r = (rewards.double().numpy() - 0.5 * rho).reshape(2, 2)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(out.advantages.double().numpy(), adv.reshape(-1), atol=1e-4)
    assert "corrpo/param_grad_fro" in out.metrics and out.metrics["corrpo/param_grad_fro"] > 0


def test_logit_space_measure_from_model_equals_from_logits(model):
    ids, attention, completion, *_ = _batch()
    config = CorrPOConfig(measure="nll_grad_norm")
    got = corrpo_from_model(model, ids, completion, attention_mask=attention, group_size=2, config=config,
                            temperature=0.7)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~completion[:, 1:], -100)
    want = corrpo_from_logits(logits, targets, group_size=2, config=config, temperature=0.7)
    torch.testing.assert_close(got.correlation, want.correlation, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("method", ["forward_mode", "same_position"])
def test_completion_stats_are_zero_outside_the_completion_and_work_on_a_frozen_model(model, method):
    ids, attention, completion, *_ = _batch()
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            stats = completion_stats(model, ids, completion, attention_mask=attention,
                                     config=CorrPOConfig(measure=ParamGradMeasure(method=method, k=2)))
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)
    assert (stats.entropy[~completion] == 0).all() and (stats.measure[~completion] == 0).all()
    assert (stats.measure[completion] > 0).all() and (stats.entropy[completion] > 0).all()


def test_config_accepts_param_grad_measures_and_rejects_bad_ones():
    assert CorrPOConfig(measure="param_grad_fro").measure == ParamGradMeasure()
    assert CorrPOConfig(measure="param_grad_fro").measure_name == "param_grad_fro"
    assert CorrPOConfig(measure=ParamGradMeasure(k=32)).needs_model
    assert not CorrPOConfig(measure="entropy_grad_norm").needs_model
    assert ParamGradMeasure(param_patterns="*.q_proj.weight").param_patterns == ("*.q_proj.weight",)
    for bad, match in [({"k": 0}, "k must be"), ({"k": 2.5}, "k must be"),
                       ({"directions_per_pass": 0}, "directions"),
                       ({"param_patterns": ()}, "param_patterns"), ({"seed": "a"}, "seed"),
                       ({"method": "reverse"}, "method")]:
        with pytest.raises(ValueError, match=match):
            ParamGradMeasure(**bad)
    with pytest.raises(ValueError, match="measure must be one of"):
        CorrPOConfig(measure="param_grad_l1")


def test_from_logits_refuses_a_measure_that_needs_the_model():
    with pytest.raises(ValueError, match="corrpo_from_model"):
        corrpo_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long),
                           config=CorrPOConfig(measure="param_grad_fro"))


def test_from_model_checks_group_size_before_the_passes():
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        corrpo_from_model(None, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                          group_size=0)


def test_bad_batches_get_clear_errors(model):
    ids, attention, completion, *_ = _batch()
    with pytest.raises(ValueError, match="empty response"):
        corrpo_from_model(model, ids, torch.zeros_like(completion), attention_mask=attention)
    with pytest.raises(ValueError, match="batch_size"):
        corrpo_from_model(model, ids, completion, attention_mask=attention, batch_size=0)
    with pytest.raises(ValueError, match="match no parameter"):
        corrpo_from_model(model, ids, completion, attention_mask=attention,
                          config=CorrPOConfig(measure=ParamGradMeasure(param_patterns=("*.wq",))))
