"""Exact logit-gradient norms: logit_param_grad_norms vs the plain computation
(full forward through the LM head, one autograd backward per token w.r.t. the
parameters, torch.linalg.matrix_norm per gradient), on a random Llama with
SmolLM2-135M's layer shapes (fewer layers), one thread, all three norms.
"""

import pytest
import torch
from conftest import SMOKE

from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.param_grad.exact import logit_param_grad_norms
from entropy_gpu.param_grad.model_parts import select_parameters

# SmolLM2-135M: hidden 576, 9 heads (3 KV heads), vocab 49152; here 4 layers, one prompt of
# 144 tokens and a response of 16.
LAYERS, HIDDEN, HEADS, VOCAB, PROMPT, RESPONSE = ((1, 32, 2, 500, 20, 4) if SMOKE
                                                  else (4, 576, 9, 49152, 144, 16))


def plain_per_token(model, ids, start):
    params = select_parameters(model)
    logits = model(input_ids=ids[None]).logits[0]
    rows = []
    for t in range(start, ids.numel()):
        grads = torch.autograd.grad(logits[t - 1, ids[t]], list(params.values()), retain_graph=True)
        rows.append([[g.abs().sum(), torch.linalg.matrix_norm(g), torch.linalg.matrix_norm(g, ord="nuc")]
                     for g in grads])
    return torch.tensor([[[float(v) for v in cell] for cell in row] for row in rows])


def ours(model, ids, start):
    result = logit_param_grad_norms(model, ids, start)
    return torch.stack([result.per_param[n] for n in ("l1", "fro", "nuclear")], dim=-1)


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if SMOKE:
        model = tiny_llama(vocab_size=VOCAB, hidden_size=HIDDEN, layers=LAYERS, heads=HEADS)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1536,
                             num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, num_key_value_heads=3, tie_word_embeddings=True)
        model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (PROMPT + RESPONSE,))
    yield model, ids
    torch.set_num_threads(threads)


@pytest.mark.benchmark(group=f"exact logit-gradient norms, {LAYERS} layers x hidden {HIDDEN}, "
                             f"{RESPONSE} tokens after {PROMPT}")
@pytest.mark.parametrize("name", ["logit_param_grad_norms", "plain autograd per token"])
def test_param_grad_cpu(benchmark, setup, name):
    model, ids = setup
    fn = ours if name == "logit_param_grad_norms" else plain_per_token
    got = benchmark.pedantic(fn, args=(model, ids, PROMPT), rounds=1 if SMOKE else 2, warmup_rounds=0)
    want = plain_per_token(model, ids, PROMPT) if name == "logit_param_grad_norms" else got
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-5)
