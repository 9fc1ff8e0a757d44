"""The calibrated same-position measure: its features against the model's own attention,
the fit against planted weights, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.param_grad.calibrated import (
    CalibrationFeatures,
    MeasureCalibration,
    calibrated_grad_scores,
    calibrated_scores,
    calibration_features,
    fit_calibration,
)
from entropy_gpu.param_grad.estimate import same_position_grad_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval().double()


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    config = Gemma2Config(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=5.0,
        initializer_range=0.5,
    )
    return Gemma2ForCausalLM(config).eval().double()


def _attention_entropy_reference(model, ids, attention):
    """Per layer, the entropy of the model's own eager attention probabilities (mean over
    heads), at every query position: ``[B, T, L]``."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=attention, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = saved
    out = []
    for p in probs:
        p = p.double()
        out.append((-torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(1))
    return torch.stack(out, -1)


@pytest.mark.parametrize(
    "make", [_llama_gqa, _gemma2], ids=["llama-gqa-sdpa-path", "gemma2-softcap-eager-path"]
)
def test_features_are_the_model_attention_entropy_and_same_position_norms(make):
    """Against the entropies of the model's own eager attention probabilities (unpadded: a
    float64 eager forward turns left padding into NaN rows), and a left-padded batch row
    against the same sequence alone."""
    model = make()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 61, (2, 12), generator=gen)
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[0, 5:], response[1, 8:] = True, True
    features = calibration_features(model, ids, response)
    reference = _attention_entropy_reference(model, ids, torch.ones_like(ids))
    n_layers = model.config.num_hidden_layers
    assert features.attention_entropy.shape == (2, 12, n_layers)
    expected = torch.zeros_like(reference)
    expected[:, 1:] = reference[:, :-1]  # token t is predicted at query t - 1
    torch.testing.assert_close(features.attention_entropy[response], expected[response], rtol=1e-6, atol=1e-8)
    assert expected[response].std() > 0.1  # not uniform attention everywhere
    assert (features.attention_entropy[~response] == 0).all()
    same = same_position_grad_norms(model, ids, response, norms="fro")
    torch.testing.assert_close(features.same_per_layer, same.per_layer["fro"])

    if make is _gemma2:
        return  # its eager forward gives NaN rows for left padding
    attention = (torch.arange(12) >= torch.tensor([[0], [3]])).long()  # second row left-padded
    padded = calibration_features(model, ids, response, attention_mask=attention)
    alone = calibration_features(model, ids[1:, 3:], response[1:, 3:])
    torch.testing.assert_close(
        padded.attention_entropy[1, 3:], alone.attention_entropy[0], rtol=1e-6, atol=1e-8
    )


def test_features_do_not_change_with_gradient_checkpointing():
    model = _llama_gqa().train()
    model.config.use_cache = False
    ids = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(1))
    response = torch.zeros(1, 10, dtype=torch.bool)
    response[0, 4:] = True
    plain = calibration_features(model, ids, response)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    again = calibration_features(model, ids, response)
    assert again.attention_entropy.shape[-1] == model.config.num_hidden_layers
    torch.testing.assert_close(again.attention_entropy, plain.attention_entropy)
    torch.testing.assert_close(again.same_per_layer, plain.same_per_layer)


def test_fit_recovers_planted_weights_and_the_score_tracks_the_planted_norm():
    rng = np.random.default_rng(0)
    w, b = rng.normal(0.3, 0.2, 4), rng.normal(0.0, 0.3, 3)
    same, attn, exact = [], [], []
    for _ in range(12):
        n = int(rng.integers(20, 60))
        s, a = rng.lognormal(0, 1, (n, 4)), rng.uniform(0, 3, (n, 3))
        same.append(s)
        attn.append(a)
        exact.append(np.exp(np.log(s) @ w + a @ b + rng.normal()))  # any per-response scale
    names = [f"model.layers.{i}" for i in range(4)]
    calibration = fit_calibration(same, attn, exact, names, ridge=0.0)
    np.testing.assert_allclose(calibration.same_weights, w, rtol=1e-8)
    np.testing.assert_allclose(calibration.attention_weights, b, rtol=1e-8, atol=1e-10)
    features = CalibrationFeatures(
        mask=torch.ones(1, same[0].shape[0], dtype=torch.bool),
        logits=torch.zeros(1, same[0].shape[0]),
        same_per_layer=torch.as_tensor(same[0])[None],
        attention_entropy=torch.as_tensor(attn[0])[None],
        layer_names=tuple(names),
    )
    score = calibrated_scores(features, calibration)[0].double().numpy()
    assert np.corrcoef(np.log(score), np.log(exact[0]))[0, 1] > 1 - 1e-6
    # A ridge penalty shrinks the weights.
    shrunk = fit_calibration(same, attn, exact, names, ridge=1.0)
    assert np.linalg.norm(shrunk.same_weights) < np.linalg.norm(calibration.same_weights)


def test_calibration_round_trips_and_refuses_what_does_not_fit(tmp_path):
    model = tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2, seed=1).double()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2))
    response = torch.zeros(1, 9, dtype=torch.bool)
    response[0, 3:] = True
    names = ("model.layers.0", "model.layers.1")
    calibration = MeasureCalibration(
        layer_names=names, same_weights=(1.0, 0.5), attention_weights=(0.1, -0.2), model="tiny"
    )
    calibration.save(tmp_path / "c.json")
    assert MeasureCalibration.load(tmp_path / "c.json") == calibration
    scores = calibrated_grad_scores(model, ids, response, calibration)
    assert scores.shape == (1, 9) and (scores[response] > 0).all() and (scores[~response] == 0).all()

    with pytest.raises(ValueError, match="other layers"):
        calibrated_grad_scores(
            model,
            ids,
            response,
            MeasureCalibration(layer_names=("a", "b"), same_weights=(1.0, 1.0), attention_weights=(0.0, 0.0)),
        )
    with pytest.raises(ValueError, match="attention"):
        calibrated_grad_scores(
            model,
            ids,
            response,
            MeasureCalibration(layer_names=names, same_weights=(1.0, 1.0), attention_weights=(0.0,)),
        )
    with pytest.raises(ValueError, match="finite"):
        MeasureCalibration(layer_names=names, same_weights=(float("nan"), 1.0), attention_weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="2 layers"):
        MeasureCalibration(layer_names=names, same_weights=(1.0,), attention_weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        fit_calibration([np.ones((3, 2))], [np.ones((3, 2))], [np.array([1.0, 0.0, 2.0])], names)
    with pytest.raises(ValueError, match="one entry per response"):
        fit_calibration([np.ones((3, 2))], [], [np.ones(3)], names)


def test_corrpo_with_the_calibrated_measure(tmp_path):
    """``ParamGradMeasure(method="calibrated")`` in CorR-PO: its per-token measure is the
    calibrated score of the same batch, its rho that of those scores; the file path loads;
    bad combinations are refused before any pass."""
    from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats

    model = tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2, seed=1)
    calibration = MeasureCalibration(
        layer_names=("model.layers.0", "model.layers.1"),
        same_weights=(0.7, 1.2),
        attention_weights=(0.4, -0.3),
    )
    calibration.save(tmp_path / "c.json")
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(4))
    completion = torch.zeros(3, 10, dtype=torch.bool)
    completion[:, 5:] = True
    attention = torch.ones_like(ids)
    config = CorrPOConfig(measure=ParamGradMeasure(method="calibrated", calibration=str(tmp_path / "c.json")))
    assert config.measure.calibration == calibration
    stats = completion_stats(model, ids, completion, attention_mask=attention, config=config)
    expected = calibrated_grad_scores(model, ids, completion, calibration, attention_mask=attention)
    torch.testing.assert_close(stats.measure[completion], expected[completion].float(), rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="calibration goes with"):
        ParamGradMeasure(method="calibrated")
    with pytest.raises(ValueError, match="calibration goes with"):
        ParamGradMeasure(calibration=calibration)
    with pytest.raises(ValueError, match="cannot read"):
        ParamGradMeasure(method="calibrated", calibration=str(tmp_path / "missing.json"))


def _one_hop_reference_attention(layer: int):
    """Same-position eager attention, except in ``layer``, where every position's value stays
    differentiable: there the token's own attention read keeps the paths through earlier values."""
    from transformers.integrations.sdpa_attention import repeat_kv

    import entropy_gpu.param_grad.estimate as estimate

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx != layer:
            return estimate._same_position_eager(
                module, query, key, value, attention_mask, scaling, dropout, **kwargs
            )
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        n = key.shape[2]
        scores = torch.matmul(query, key.detach().transpose(2, 3)) * scaling
        own_key = (query * (key - key.detach())).sum(-1) * scaling
        eye = torch.eye(n, dtype=torch.bool)
        scores = scores + eye * own_key[..., None]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    return attention


def test_one_hop_values_against_autograd_in_a_graph_that_keeps_those_paths(monkeypatch):
    """Per layer, ``one_hop_values=True`` gives the Frobenius norm of the per-token gradients of
    that layer's v_proj and o_proj weights computed by autograd (one backward per token) in the
    same-position graph whose attention in that layer keeps every position's value; it exceeds
    the plain same-position norm."""
    import entropy_gpu.param_grad.estimate as estimate

    model = _llama_gqa()
    ids = torch.randint(0, 61, (1, 11), generator=torch.Generator().manual_seed(9))
    response = torch.zeros(1, 11, dtype=torch.bool)
    response[0, 4:] = True
    for layer in range(model.config.num_hidden_layers):
        names = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in ("v", "o")]
        fast = same_position_grad_norms(
            model, ids, response, param_patterns=names, norms="fro", one_hop_values=True
        )
        plain = same_position_grad_norms(model, ids, response, param_patterns=names, norms="fro")
        params = dict(model.named_parameters())
        with monkeypatch.context() as m:
            m.setattr(estimate, "_same_position_attention", _one_hop_reference_attention(layer))
            estimate._register_same_position()
            with torch.enable_grad(), estimate._attention(model, estimate._SAME_POSITION_ATTENTION):
                logits = model(input_ids=ids).logits[0]
                reference = []
                for t in range(4, 11):
                    gv, go = torch.autograd.grad(
                        logits[t - 1, ids[0, t]], [params[n] for n in names], retain_graph=True
                    )
                    reference.append(torch.sqrt(gv.square().sum() + go.square().sum()))
        estimate._register_same_position()
        torch.testing.assert_close(fast.total["fro"][0, 4:], torch.stack(reference), rtol=1e-7, atol=1e-10)
        assert (fast.total["fro"][0, 5:] > plain.total["fro"][0, 5:]).all()

    with pytest.raises(ValueError, match="Frobenius"):
        same_position_grad_norms(model, ids, response, norms=("fro", "l1"), one_hop_values=True)
    with pytest.raises(ValueError, match="o_proj"):
        same_position_grad_norms(
            model, ids, response, param_patterns="*.v_proj.weight", norms="fro", one_hop_values=True
        )


def test_one_hop_values_sdpa_path_equals_the_eager_path_on_a_padded_batch(monkeypatch):
    import entropy_gpu.param_grad.estimate as estimate

    model = _llama_gqa()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    attention = (torch.arange(12) >= torch.tensor([[0], [3]])).long()
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[0, 5:], response[1, 8:] = True, True
    fast = same_position_grad_norms(
        model, ids, response, attention_mask=attention, norms="fro", one_hop_values=True
    )
    monkeypatch.setattr(estimate, "_same_position_attention", estimate._same_position_eager)
    eager = same_position_grad_norms(
        model, ids, response, attention_mask=attention, norms="fro", one_hop_values=True
    )
    torch.testing.assert_close(fast.per_layer["fro"], eager.per_layer["fro"], rtol=1e-9, atol=1e-12)
    alone = same_position_grad_norms(model, ids[1:, 3:], response[1:, 3:], norms="fro", one_hop_values=True)
    # other absolute positions: RoPE's float32 tables round differently
    torch.testing.assert_close(fast.total["fro"][1, 8:], alone.total["fro"][0, 5:], rtol=1e-5, atol=1e-9)


def test_corrpo_with_the_one_hop_measure():
    from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats

    model = tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2, seed=1)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    completion = torch.zeros(2, 9, dtype=torch.bool)
    completion[:, 4:] = True
    config = CorrPOConfig(measure=ParamGradMeasure(method="one_hop"))
    stats = completion_stats(model, ids, completion, attention_mask=torch.ones_like(ids), config=config)
    expected = same_position_grad_norms(model, ids, completion, norms="fro", one_hop_values=True).total["fro"]
    torch.testing.assert_close(stats.measure[completion], expected[completion].float())
    plain = same_position_grad_norms(model, ids, completion, norms="fro").total["fro"]
    assert (stats.measure[completion] > plain[completion]).all()
