"""Shared fixtures for the SIA tests: SmolLM2's real tokenizer and a tiny random Llama
with its vocabulary and a scaled-up (untied) LM head, so that its next-token
distributions are far from uniform and depend on the context (a uniform model would
make every entropy log V and hide bugs)."""

from __future__ import annotations

import functools

import torch

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    return load_tokenizer()


def peaky_tiny_llama(seed: int = 0, scale: float = 20.0, attn: str = "sdpa"):
    model = tiny_llama(vocab_size=49152, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # entropies of a few nats instead of log V
    model.set_attn_implementation(attn)
    return model.eval()
