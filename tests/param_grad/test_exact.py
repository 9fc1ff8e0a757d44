"""Exact logit-gradient norms against plain autograd, one backward per token.

The reference below differentiates the model's own logits (``model(ids).logits``,
through the full LM head) with respect to each selected parameter and takes
``torch.linalg.matrix_norm`` (an SVD for the nuclear norm): no code is shared with
the implementation, which uses the final hidden state, layer-output gradients,
factored nuclear norms and Gram eigenvalues.
"""

from __future__ import annotations

import pytest
import torch

from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.param_grad.exact import logit_param_grad_norms
from entropy_gpu.param_grad.model_parts import DEFAULT_PARAM_PATTERNS, NORMS, layer_name, select_parameters


def reference_grads(model, ids: torch.Tensor, start: int, names: list[str]) -> list[list[torch.Tensor]]:
    """grads[i][j] = d logits[t-1, ids[t]] / d param_j for t = start + i, one backward each."""
    params = dict(model.named_parameters())
    with torch.enable_grad():
        logits = model(input_ids=ids[None]).logits[0]
        return [list(torch.autograd.grad(logits[t - 1, ids[t]], [params[n] for n in names],
                                         retain_graph=True))
                for t in range(start, ids.numel())]


def reference_norm(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        return grad.abs().sum()
    matrix = grad.reshape(1, -1) if grad.dim() == 1 else grad.reshape(grad.shape[0], -1)
    return torch.linalg.matrix_norm(matrix, ord="fro" if norm == "fro" else "nuc")


def block_norm(grads: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Norm of the gradients of a group of parameters laid out as one block-diagonal matrix."""
    blocks = [g.reshape(1, -1) if g.dim() == 1 else g.reshape(g.shape[0], -1) for g in grads]
    return reference_norm(torch.block_diag(*blocks), norm)


def assert_matches_reference(model, ids, start, result, *, rtol, atol, nuclear_rtol=None):
    """``nuclear_rtol``: nuclear norms come from Gram-matrix eigenvalues, which cost
    ~sqrt(float64 eps) * sigma_max per singular value (exact up to that)."""
    grads = reference_grads(model, ids, start, list(result.param_names))
    assert result.positions.tolist() == list(range(start, ids.numel()))
    assert result.token_ids.tolist() == ids[start:].tolist()
    for norm in result.per_param:
        def close(got, want, what, norm=norm):
            tol = rtol if norm != "nuclear" or nuclear_rtol is None else nuclear_rtol
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=atol,
                                       msg=lambda m: f"{norm} {what}: {m}")

        close(result.per_param[norm], torch.stack([torch.stack([reference_norm(g, norm) for g in row])
                                                   for row in grads]), "per parameter")
        for li, lname in enumerate(result.layer_names):
            cols = [j for j, layer in enumerate(result.layer_of_param) if layer == li]
            close(result.per_layer[norm][:, li], torch.stack([block_norm([row[j] for j in cols], norm)
                                                              for row in grads]), lname)
        close(result.total[norm], torch.stack([block_norm(row, norm) for row in grads]), "total")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama64():
    """Tiny Llama in float64: the exact route must match autograd to rounding."""
    return tiny_llama(vocab_size=97, hidden_size=32, layers=2, heads=4, tie_word_embeddings=True).double()


@pytest.mark.parametrize("token_batch_size", [1, 3])
def test_attention_projections_match_per_token_autograd(llama64, token_batch_size):
    # 40 tokens, response from 24: the rank bound k (= position + 1) crosses
    # min(out, in) = 32, so both the factored (k < 32) and the dense nuclear norm run;
    # 16 tokens with _TOKENS_PER_FORWARD = 16: batches of 3 end on a partial batch.
    ids = torch.randint(0, 97, (40,))
    result = logit_param_grad_norms(llama64, ids, 24, token_batch_size=token_batch_size)
    assert result.param_names == tuple(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo")
    assert result.layer_names == ("model.layers.0", "model.layers.1")
    assert all(result.per_param[n].shape == (16, 8) for n in NORMS)
    assert all(result.per_param[n].dtype == torch.float64 for n in NORMS)
    assert_matches_reference(llama64, ids, 24, result, rtol=1e-9, atol=1e-10, nuclear_rtol=1e-6)
    with torch.no_grad():
        logits = llama64(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(result.logits, logits[23:-1].gather(-1, ids[24:, None])[:, 0])


def test_float32_model_and_mixed_parameter_kinds():
    """Biases, norm weights and MLP weights (autograd route for non-Linear parameters), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 61, (15,))
    patterns = ["*.self_attn.*_proj.*", "*.input_layernorm.weight", "model.layers.1.mlp.down_proj.weight"]
    result = logit_param_grad_norms(model, ids, 6, param_patterns=patterns, token_batch_size=4)
    names = result.param_names
    assert ("model.layers.0.self_attn.q_proj.bias" in names
            and "model.layers.1.input_layernorm.weight" in names)
    assert result.per_param["nuclear"].dtype == torch.float32
    assert_matches_reference(model, ids, 6, result, rtol=2e-4, atol=1e-6)


def test_lm_head_gradient_is_rank_one_closed_form():
    """d z_y / d W_head = e_y h^T: L1 = ||h||_1, Frobenius = nuclear = ||h||_2."""
    model = tiny_llama(vocab_size=50, hidden_size=16, layers=1, heads=2, tie_word_embeddings=False).double()
    ids = torch.randint(0, 50, (9,))
    result = logit_param_grad_norms(model, ids, 3, param_patterns="lm_head.weight")
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None]).last_hidden_state[0, 2:8]
    torch.testing.assert_close(result.per_param["l1"][:, 0], hidden.abs().sum(-1))
    torch.testing.assert_close(result.per_param["fro"][:, 0], hidden.norm(dim=-1))
    torch.testing.assert_close(result.per_param["nuclear"][:, 0], hidden.norm(dim=-1))
    torch.testing.assert_close(result.hidden_norm, hidden.norm(dim=-1))
    assert result.layer_names == ("lm_head.weight",)


def test_tied_embedding_includes_both_paths(llama64):
    """Tied input/output embedding: the gradient flows through the input lookup and the
    head row; autograd (the reference) sees both, and so must we."""
    ids = torch.randint(0, 97, (10,))
    result = logit_param_grad_norms(llama64, ids, 4, param_patterns="model.embed_tokens.weight")
    assert_matches_reference(llama64, ids, 4, result, rtol=1e-9, atol=1e-10, nuclear_rtol=1e-6)


def test_gemma2_final_logit_softcapping():
    """A model whose logits are soft-capped (Gemma-2): the capped logit is differentiated."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    config = Gemma2Config(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          final_logit_softcapping=2.0, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval().double()
    ids = torch.randint(0, 53, (11,))
    result = logit_param_grad_norms(model, ids, 5)
    assert len(result.param_names) == 8
    assert_matches_reference(model, ids, 5, result, rtol=1e-9, atol=1e-10, nuclear_rtol=1e-6)
    assert result.logits.abs().max() <= 2.0


def test_requires_grad_flags_restored_and_frozen_model_works(llama64):
    ids = torch.randint(0, 97, (8,))
    llama64.requires_grad_(False)
    llama64.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    try:
        with torch.no_grad():
            result = logit_param_grad_norms(llama64, ids, 5, param_patterns="*.layers.1.*.weight")
        flags = {n: p.requires_grad for n, p in llama64.named_parameters()}
        assert [n for n, f in flags.items() if f] == ["model.layers.0.mlp.up_proj.weight"]
    finally:
        llama64.requires_grad_(True)
    assert_matches_reference(llama64, ids, 5, result, rtol=1e-9, atol=1e-10, nuclear_rtol=1e-6)
    assert set(result.layer_names) == {"model.layers.1"}


def test_selection_and_layer_names():
    model = tiny_llama(vocab_size=20, hidden_size=16, layers=3, heads=2)
    names = list(select_parameters(model))
    assert len(names) == 12 and all(any(n.endswith(p[1:]) for p in DEFAULT_PARAM_PATTERNS) for n in names)
    assert list(select_parameters(model, "model.layers.2.self_attn.[qk]_proj.weight")) == [
        "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"]
    assert layer_name("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_name("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"param_patterns": ["*.self_attn.q_proj.weight", "*.attention.wq"]}, ValueError, r"\*\.attention\.wq"),
    ({"param_patterns": []}, ValueError, "param_patterns is empty"),
    ({"norms": ["l1", "spectral"]}, ValueError, "unsupported norm.*spectral"),
    ({"norms": []}, ValueError, "norms is empty"),
    ({"response_start": 6}, ValueError, "empty response"),
    ({"response_start": 0}, ValueError, "response_start must be >= 1"),
    ({"response_start": 2.0}, TypeError, "response_start must be an int"),
    ({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, ValueError, "one sequence"),
    ({"input_ids": torch.zeros(6)}, TypeError, "int64 or int32"),
    ({"token_batch_size": 0}, ValueError, "token_batch_size"),
])
def test_bad_input_is_rejected_clearly(kwargs, error, match):
    model = tiny_llama(vocab_size=20, hidden_size=16, layers=1, heads=2)
    args = {"input_ids": torch.arange(6), "response_start": 3} | kwargs
    with pytest.raises(error, match=match):
        logit_param_grad_norms(model, args.pop("input_ids"), args.pop("response_start"), **args)


def test_model_whose_logits_are_not_the_hidden_state_product_is_refused():
    """Llama ignores final_logit_softcapping; our logit would then differ from the model's."""
    model = tiny_llama(vocab_size=20, hidden_size=16, layers=1, heads=2)
    model.config.final_logit_softcapping = 0.5
    with pytest.raises(ValueError, match="not supported"):
        logit_param_grad_norms(model, torch.arange(8), 3)


def test_bfloat16_model_runs_and_agrees_with_float32_roughly():
    """A bf16 model with logits of a trained model's size passes the check against its
    own (rounded) logits; norms come out float32, within 10% of the float32 model's."""
    model = tiny_llama(vocab_size=40, hidden_size=32, layers=2, heads=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits up to ~30, like a trained model's
    ids = torch.randint(0, 40, (12,))
    want = logit_param_grad_norms(model, ids, 6)
    got = logit_param_grad_norms(model.to(torch.bfloat16), ids, 6)
    for norm in NORMS:
        assert got.total[norm].dtype == torch.float32
        torch.testing.assert_close(got.total[norm], want.total[norm], rtol=0.1, atol=0)
