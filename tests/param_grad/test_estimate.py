"""Forward-mode estimate of the per-token parameter-gradient norm, and the same-position
candidate, against plain per-token autograd (float64, tiny models).

Two kinds of checks: (1) exact ones: every directional derivative the estimator returns
equals ``v . g_t`` from a per-token autograd gradient and the same direction ``v``; (2)
statistical ones: the mean of ``(v . g_t)^2`` over many directions converges to
``||g_t||_F^2`` within a tolerance set by the estimator's variance.

Tolerances of forward- against reverse-mode values are 1e-5 relative, not float64 rounding:
Hugging Face RMSNorm and eager softmax compute in float32 even in a float64 model, and the
two modes round those float32 stages differently (a wrong formula is off by O(1)).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from entropy_gpu import estimate_logit_param_grad_norms, logit_param_grad_norms
from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.param_grad.estimate import (
    _direction,
    last_layers_patterns,
    same_position_grad_norms,
)
from entropy_gpu.param_grad.model_parts import select_parameters

FWD_VS_REV = {"rtol": 1e-5, "atol": 1e-9}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2, seed=1).double()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
    return Qwen2ForCausalLM(config).eval().double()  # q/k/v with biases


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    config = Gemma2Config(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                          attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval().double()


def reference_grads(model, ids, positions, names):
    """Per token ``y_t`` (t in positions), the autograd gradient of the model's own logit
    ``logits[t-1, y_t]`` w.r.t. each named parameter; one backward per token."""
    params = dict(model.named_parameters())
    with torch.enable_grad():
        logits = model(input_ids=ids[None]).logits[0]
        return [torch.autograd.grad(logits[t - 1, ids[t]], [params[n] for n in names], retain_graph=True)
                for t in positions]


def _mask(n: int, start: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[start:] = True
    return mask


def _llama():
    return tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2).double()


@pytest.mark.parametrize("make", [_llama, _qwen2, _gemma2], ids=["llama", "qwen2", "gemma2"])
def test_directional_derivatives_equal_autograd_dot_products(make):
    """Each JVP value is exactly v_d . g_t (same seeded directions), also with biases (Qwen2)
    and attention + final-logit soft-capping (Gemma-2)."""
    model = make()
    ids = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    patterns = ["*.self_attn.*_proj.*"]
    est = estimate_logit_param_grad_norms(model, ids, _mask(9, 4), k=3, param_patterns=patterns, seed=7,
                                          directions_per_pass=2)
    names = list(select_parameters(model, patterns))
    grads = reference_grads(model, ids, range(4, 9), names)
    index = {name: i for i, name in enumerate(select_parameters(model, patterns))}
    for d in range(3):
        dirs = [_direction(p.shape, 7, index[n], d, "rademacher", p.dtype, p.device)
                for n, p in select_parameters(model, patterns).items()]
        want = torch.stack([sum((g * v).sum() for g, v in zip(row, dirs)) for row in grads])
        torch.testing.assert_close(est.directional[0, d, 0, 4:], want, **FWD_VS_REV)
    assert (est.directional[0, :, 0, :4] == 0).all()


def test_generic_parameters_take_the_dual_parameter_route(llama64):
    """Norm weights are not Linear weights: dual parameters, one direction per pass."""
    ids = torch.randint(0, 61, (7,), generator=torch.Generator().manual_seed(1))
    patterns = ["*.input_layernorm.weight", "model.layers.1.self_attn.o_proj.weight"]
    est = estimate_logit_param_grad_norms(llama64, ids, _mask(7, 3), k=2, param_patterns=patterns, seed=3)
    named = select_parameters(llama64, patterns)
    grads = reference_grads(llama64, ids, range(3, 7), list(named))
    for d in range(2):
        dirs = [_direction(p.shape, 3, i, d, "rademacher", p.dtype, p.device)
                for i, p in enumerate(named.values())]
        want = torch.stack([sum((g * v).sum() for g, v in zip(row, dirs)) for row in grads])
        torch.testing.assert_close(est.directional[0, d, 0, 3:], want, **FWD_VS_REV)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_mean_over_many_directions_converges_to_exact_squared_norm(llama64, distribution):
    """k = 2048 directions: each token's estimate lies within 5 standard deviations of the
    exact ||g||_F^2, with the standard deviation of the estimator, sqrt(2/k) ||g||^2 (an
    upper bound for Rademacher, exact for Gaussian directions)."""
    ids = torch.randint(0, 61, (10,), generator=torch.Generator().manual_seed(2))
    k = 2048
    est = estimate_logit_param_grad_norms(llama64, ids, _mask(10, 5), k=k, distribution=distribution,
                                          directions_per_pass=512, seed=11)
    exact = logit_param_grad_norms(llama64, ids, 5, norms="fro").total["fro"].square()
    got = est.sq_fro()[0, 5:]
    sd = math.sqrt(2 / k) * exact
    assert ((got - exact).abs() <= 5 * sd).all(), (got, exact)
    # The empirical spread of the squares matches the variance formula's bound too.
    sample_sd = est.directional[0, :, 0, 5:].square().std(0)
    assert (sample_sd <= 1.2 * math.sqrt(2) * exact).all()
    assert (sample_sd >= 0.3 * exact).all()  # not degenerate (e.g. all-zero tangents)


def test_split_by_layer_sums_to_total_and_matches_exact_layers(llama64):
    ids = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(4))
    k = 1024
    est = estimate_logit_param_grad_norms(llama64, ids, _mask(9, 4), k=k, split_layers=True,
                                          directions_per_pass=256, seed=5)
    per_layer = est.per_layer_sq()[0, 4:]
    assert est.layer_names == ("model.layers.0", "model.layers.1")
    torch.testing.assert_close(per_layer.sum(-1), est.sq_fro()[0, 4:], rtol=1e-12, atol=0)
    exact = logit_param_grad_norms(llama64, ids, 4, norms="fro").per_layer["fro"].square()
    assert ((per_layer - exact).abs() <= 5 * math.sqrt(2 / k) * exact).all()
    with pytest.raises(ValueError, match="split_layers=True"):
        estimate_logit_param_grad_norms(llama64, ids, _mask(9, 4), k=1).per_layer_sq()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_single_sequences(llama64, side):
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 61, (n,), generator=gen) for n in (11, 7)]
    starts = [6, 3]
    width = 11
    ids = torch.zeros(2, width, dtype=torch.long)
    attention = torch.zeros(2, width, dtype=torch.long)
    response = torch.zeros(2, width, dtype=torch.bool)
    for b, (s, start) in enumerate(zip(seqs, starts)):
        off = width - s.numel() if side == "left" else 0
        ids[b, off:off + s.numel()] = s
        attention[b, off:off + s.numel()] = 1
        response[b, off + start:off + s.numel()] = True
    batch = estimate_logit_param_grad_norms(llama64, ids, response, attention_mask=attention, k=4, seed=9)
    for b, (s, start) in enumerate(zip(seqs, starts)):
        single = estimate_logit_param_grad_norms(llama64, s, _mask(s.numel(), start), k=4, seed=9)
        torch.testing.assert_close(batch.directional[0, :, b][:, response[b]],
                                   single.directional[0, :, 0, start:], **FWD_VS_REV)


def test_seeded_runs_repeat_whatever_the_batching(llama64):
    ids = torch.randint(0, 61, (8,), generator=torch.Generator().manual_seed(8))
    runs = [estimate_logit_param_grad_norms(llama64, ids, _mask(8, 3), k=5, seed=1, directions_per_pass=p)
            for p in (1, 2, 5, 5)]
    for run in runs[1:]:
        torch.testing.assert_close(run.directional, runs[0].directional, **FWD_VS_REV)
    other = estimate_logit_param_grad_norms(llama64, ids, _mask(8, 3), k=5, seed=2)
    assert not torch.allclose(other.directional, runs[0].directional)
    # Nested: the first k directions of a larger run are the smaller run.
    torch.testing.assert_close(runs[0].sq_fro(3), estimate_logit_param_grad_norms(
        llama64, ids, _mask(8, 3), k=3, seed=1).sq_fro(), rtol=1e-12, atol=0)


def test_unsupported_attention_falls_back_to_eager_with_a_warning():
    model = tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2).double()
    ids = torch.randint(0, 61, (8,), generator=torch.Generator().manual_seed(3))
    want = estimate_logit_param_grad_norms(model, ids, _mask(8, 3), k=2)
    model.config._attn_implementation = "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sdpa has forward-mode derivatives: no warning
        sdpa = estimate_logit_param_grad_norms(model, ids, _mask(8, 3), k=2)
    torch.testing.assert_close(sdpa.directional, want.directional, **FWD_VS_REV)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.warns(UserWarning, match="eager attention"):
        flash = estimate_logit_param_grad_norms(model, ids, _mask(8, 3), k=2, check_logits=False)
    assert model.config._attn_implementation == "flash_attention_2"  # restored
    torch.testing.assert_close(flash.directional, want.directional, **FWD_VS_REV)


def _bad(**kwargs):
    model = tiny_llama(vocab_size=20, hidden_size=16, layers=1, heads=2)
    args = {"input_ids": torch.arange(6), "response_mask": _mask(6, 3)} | kwargs
    return estimate_logit_param_grad_norms(model, args.pop("input_ids"), args.pop("response_mask"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"param_patterns": ["*.attention.wq"]}, ValueError, r"match no parameter"),
    ({"response_mask": torch.zeros(6, dtype=torch.bool)}, ValueError, "empty response"),
    ({"response_mask": torch.ones(6, dtype=torch.bool)}, ValueError, "position 0"),
    ({"response_mask": _mask(5, 3)}, ValueError, "response_mask shape"),
    ({"attention_mask": torch.tensor([1, 1, 1, 1, 0, 0])}, ValueError, "outside attention_mask"),
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"k": True}, TypeError, "k must be an int"),
    ({"directions_per_pass": 0}, ValueError, "directions_per_pass"),
    ({"distribution": "uniform"}, ValueError, "distribution"),
    ({"input_ids": torch.zeros(6)}, TypeError, "int64 or int32"),
    ({"input_ids": torch.zeros(1, 1, 6, dtype=torch.long)}, ValueError, "input_ids must be"),
])
def test_bad_input_is_rejected_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        _bad(**kwargs)


def test_model_whose_logits_are_not_the_hidden_state_product_is_refused():
    model = tiny_llama(vocab_size=20, hidden_size=16, layers=1, heads=2)
    model.config.final_logit_softcapping = 0.5  # Llama ignores it; our logit would apply it
    with pytest.raises(ValueError, match="not h . W\\[y\\]"):
        estimate_logit_param_grad_norms(model, torch.arange(8), _mask(8, 3), k=1)


# ---- the other fast candidates ----


def test_same_position_keeps_the_forward_and_is_exact_without_cross_position_paths(llama64):
    """At the first position the hidden state attends to itself only: no cross-position path
    exists, so the same-position norms equal the exact ones there; later tokens differ."""
    ids = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(12))
    same = same_position_grad_norms(llama64, ids, _mask(9, 1))
    exact = logit_param_grad_norms(llama64, ids, 1)
    for norm in ("l1", "fro", "nuclear"):
        torch.testing.assert_close(same.total[norm][0, 1], exact.total[norm][0], **FWD_VS_REV)
        torch.testing.assert_close(same.per_layer[norm][0, 1], exact.per_layer[norm][0], **FWD_VS_REV)
    assert not torch.allclose(same.total["fro"][0, 2:], exact.total["fro"][1:], rtol=1e-3)
    assert (same.total["fro"][0, 0] == 0) and (same.total["fro"][0, 1:] > 0).all()


def test_same_position_batch_equals_single_sequences(llama64):
    gen = torch.Generator().manual_seed(13)
    a, b = torch.randint(0, 61, (8,), generator=gen), torch.randint(0, 61, (5,), generator=gen)
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0], ids[1, 3:] = a, b
    attention = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    response = torch.zeros(2, 8, dtype=torch.bool)
    response[0, 4:], response[1, 5:] = True, True
    batch = same_position_grad_norms(llama64, ids, response, attention_mask=attention, norms="fro")
    torch.testing.assert_close(batch.total["fro"][0, 4:], same_position_grad_norms(
        llama64, a, _mask(8, 4), norms="fro").total["fro"][0, 4:], **FWD_VS_REV)
    torch.testing.assert_close(batch.total["fro"][1, 5:], same_position_grad_norms(
        llama64, b, _mask(5, 2), norms="fro").total["fro"][0, 2:], **FWD_VS_REV)


def test_same_position_refuses_non_linear_parameters(llama64):
    with pytest.raises(ValueError, match="nn.Linear weights and biases only"):
        same_position_grad_norms(llama64, torch.arange(6), _mask(6, 2),
                                 param_patterns="*.input_layernorm.weight")


def test_last_layers_patterns(llama64):
    names = last_layers_patterns(llama64, n_layers=1)
    assert names == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]
    with pytest.raises(ValueError, match="n_layers"):
        last_layers_patterns(llama64, n_layers=0)


@pytest.mark.parametrize("make", [lambda: tiny_llama(vocab_size=61, hidden_size=16, layers=2, heads=2,
                                                     seed=1).double(), _qwen2],
                         ids=["llama", "qwen2-gqa-bias"])
def test_same_position_sdpa_attention_equals_the_eager_one(make, monkeypatch):
    """The SDPA-based same-position attention (the default) gives the norms of the eager one
    (which materializes the [T, T] probabilities and detaches keys and values explicitly), in
    float64, on a left-padded batch (Qwen2: unpadded, its own eager forward gives NaN rows
    for left padding in float64), for every norm and layer."""
    import entropy_gpu.param_grad.estimate as estimate

    model = make()
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 53, (2, 11), generator=gen)
    attention = (torch.arange(11) >= torch.tensor([[0], [0 if make is _qwen2 else 4]])).long()
    response = torch.zeros(2, 11, dtype=torch.bool)
    response[0, 5:], response[1, 7:] = True, True
    patterns = ["*.self_attn.*_proj.weight", "*.self_attn.*_proj.bias"] if make is _qwen2 else \
        ["*.self_attn.*_proj.weight"]
    fast = same_position_grad_norms(model, ids, response, attention_mask=attention, param_patterns=patterns)
    monkeypatch.setattr(estimate, "_same_position_attention", estimate._same_position_eager)
    eager = same_position_grad_norms(model, ids, response, attention_mask=attention, param_patterns=patterns)
    for norm in ("l1", "fro", "nuclear"):
        torch.testing.assert_close(fast.per_layer[norm], eager.per_layer[norm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-12, atol=1e-12)
    assert (fast.total["fro"][response] > 0).all()


def test_own_position_weight_is_the_softmax_diagonal():
    """The no-grad own-position weight, in chunks, with and without an additive mask."""
    from entropy_gpu.param_grad.estimate import _own_position_weight

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64), torch.randn(2, 3, 9, 4, generator=gen,
                                                                                   dtype=torch.float64)
    causal = torch.arange(9)[None, :] > torch.arange(2, 9)[:, None]           # query i sits at key 2 + i
    scores = (q @ k.transpose(2, 3) * 0.5).masked_fill(causal, float("-inf"))
    want = torch.softmax(scores, -1).diagonal(offset=2, dim1=-2, dim2=-1)[..., None]
    torch.testing.assert_close(_own_position_weight(q, k, None, 0.5, chunk=3), want)
    additive = torch.zeros(2, 1, 7, 9, dtype=torch.float64).masked_fill(causal, -1e300)
    additive[1, :, :, 0] = -1e300                                             # a padded first key
    want_padded = torch.softmax(scores + additive, -1).diagonal(offset=2, dim1=-2, dim2=-1)[..., None]
    torch.testing.assert_close(_own_position_weight(q, k, additive, 0.5, chunk=4), want_padded)
