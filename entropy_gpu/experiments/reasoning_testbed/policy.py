"""The testbed's model (a tiny Llama built from a config) and batched generation/scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import task


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture config for the testbed (transformers ``LlamaConfig`` fields)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256


def build_model(shape: ModelShape, seed: int):
    """A randomly initialised ``LlamaForCausalLM`` with the testbed's vocabulary (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = task.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def load_policy(folder):
    """(model, tokenizer) saved by ``save_policy`` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def save_policy(model, tokenizer, folder) -> None:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    sample: bool,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 256,
) -> list[list[int]]:
    """Completion ids (ending with eos when the model stopped) for each prompt; the global RNG is
    left as it was (evaluation must not change a training run's stream)."""
    out: list[list[int]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if sample
        else {"do_sample": False}
    )
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(tokenizer, prompts[lo : lo + batch_size], model.device)
            rows = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                **kwargs,
            )[:, ids.size(1) :].tolist()
            for row in rows:
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return out
