"""batched_logit_param_grad_norms: the exact measure for a padded batch equals the per-sequence
reference (logit_param_grad_norms, one backward per token) on each row alone."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from entropy_gpu import batched_logit_param_grad_norms, logit_param_grad_norms
from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats


def _model(bias: bool = False, tied: bool = True):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=37,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=bias,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).double().eval()


def _batch():
    """Three rows: plain, left-padded (3 pads), right-padded; response tokens marked."""
    torch.manual_seed(1)
    ids = torch.randint(0, 37, (3, 13))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0
    attention[2, 10:] = 0
    response = torch.zeros_like(ids)
    response[0, 5:] = 1
    response[1, 7:] = 1
    response[2, 4:10] = 1
    return ids, attention, response


@pytest.mark.parametrize("bias,tied,chunk", [(False, True, 4), (True, False, 1), (False, True, 100)])
def test_equals_per_sequence_reference(bias, tied, chunk):
    model = _model(bias, tied)
    ids, attention, response = _batch()
    patterns = (
        ("*.self_attn.*_proj.weight", "*.self_attn.*_proj.bias") if bias else ("*.self_attn.*_proj.weight",)
    )
    out = batched_logit_param_grad_norms(
        model, ids, response, attention_mask=attention, param_patterns=patterns, token_chunk=chunk
    )
    for b in range(3):
        real = attention[b].bool()
        seq = ids[b][real]
        start = int(response[b][real].nonzero()[0])
        ref = logit_param_grad_norms(model, seq, start, param_patterns=patterns, norms=("fro",))
        got = out.total["fro"][b][response[b].bool()]
        # Left padding shifts RoPE positions: equal up to rounding of the rotations.
        torch.testing.assert_close(got, ref.total["fro"], rtol=1e-7, atol=0)
        torch.testing.assert_close(
            out.per_layer["fro"][b][response[b].bool()], ref.per_layer["fro"], rtol=1e-7, atol=0
        )
        torch.testing.assert_close(out.logits[b][response[b].bool()], ref.logits, rtol=1e-9, atol=1e-12)
    assert (out.total["fro"][~response.bool()] == 0).all()


def test_corrpo_exact_measure_is_the_batched_norm():
    model = _model()
    ids, attention, response = _batch()
    stats = completion_stats(
        model,
        ids,
        response,
        attention_mask=attention,
        config=CorrPOConfig(measure=ParamGradMeasure(method="exact")),
    )
    direct = batched_logit_param_grad_norms(model, ids, response, attention_mask=attention)
    torch.testing.assert_close(stats.measure.double(), direct.total["fro"].float().double())


def test_cross_position_paths_matter():
    """The exact norm differs from the same-position approximation (a test that could not tell
    them apart would not test the measure)."""
    model = _model()
    ids, attention, response = _batch()
    exact = completion_stats(
        model,
        ids,
        response,
        attention_mask=attention,
        config=CorrPOConfig(measure=ParamGradMeasure(method="exact")),
    ).measure
    same = completion_stats(
        model,
        ids,
        response,
        attention_mask=attention,
        config=CorrPOConfig(measure=ParamGradMeasure(method="same_position")),
    ).measure
    assert not torch.allclose(exact, same, rtol=1e-3)


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True])
def test_bad_token_chunk(chunk):
    model = _model()
    ids, attention, response = _batch()
    with pytest.raises(ValueError, match="token_chunk"):
        batched_logit_param_grad_norms(model, ids, response, attention_mask=attention, token_chunk=chunk)
