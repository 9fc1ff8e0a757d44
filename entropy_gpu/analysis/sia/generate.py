"""Model-generated reasoning traces, judged by answer extraction.

Two engines produce the same records: Hugging Face ``generate`` (``engine="hf"``, the
default, any device) and vLLM (``engine="vllm"``, GPU, where it is installed). Both use
the prompt the SIA curves condition on, the same sampling parameters (greedy, or pure
temperature sampling over the full softmax: no top-k, top-p, min-p or repetition
penalty), stop at EOS or ``max_new_tokens``, and turn the generated token ids into a
``Trace`` with ``trace_from_tokens``. The SIA analysis itself always runs on the
entropy_gpu path; vLLM only writes the traces.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .answers import answers_match, extract_answer
from .curve import SIAConfig, prompt_ids
from .data import Problem, Trace

GENERATION_MODES = ("greedy", "sampled")
ENGINES = ("hf", "vllm")


def check_engine(engine: str) -> None:
    """ValueError for an unknown engine; ModuleNotFoundError (one line) for vLLM when it is not installed."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("--engine vllm needs vLLM (pip install vllm, on a machine with a CUDA "
                                  "GPU); --engine hf generates with Hugging Face instead")


def trace_from_tokens(tokenizer, problem: Problem, token_ids: list[int], mode: str) -> Trace:
    """The trace record of one generated completion (token ids after the prompt, EOS and
    padding included or not): decoded without special tokens, stripped, judged by the
    answer extracted from it. Shared by both engines."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
    predicted = extract_answer(text, problem.answer_kind, labels=problem.choices)
    return Trace(problem, text, mode, correct=answers_match(predicted, problem.answer, problem.answer_kind),
                 predicted=predicted)


def vllm_sampling_kwargs(mode: str, *, max_new_tokens: int, temperature: float, seed: int,
                         eos_token_id: int | None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` equal to the HF engine's settings:
    greedy is temperature 0; sampled is temperature ``temperature`` over the full
    vocabulary (top_k -1 and top_p 1 switch truncation off, as ``top_k=None, top_p=None``
    over a config without them does in HF). One completion per prompt, special tokens
    kept in the ids (``trace_from_tokens`` drops them), stop at EOS."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"unknown generation mode {mode!r}; choose from {GENERATION_MODES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode == "sampled" and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampled traces, got {temperature}")
    return {
        "n": 1, "max_tokens": max_new_tokens, "seed": seed,
        "temperature": temperature if mode == "sampled" else 0.0,
        "top_k": -1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "stop_token_ids": [eos_token_id] if eos_token_id is not None else [],
        "skip_special_tokens": False, "detokenize": False,
    }


def load_vllm(model_path: str, *, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.4):
    """A vLLM engine for ``model_path`` on this process's GPU, leaving room for the HF copy
    that the SIA analysis runs on."""
    if model_path == "smollm2":
        raise ValueError("--engine vllm needs a model folder or hub name (vLLM loads its own copy); for the "
                         "bundled SmolLM2 use --model HuggingFaceTB/SmolLM2-135M-Instruct")
    check_engine("vllm")
    from vllm import LLM

    return LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
               tensor_parallel_size=1, enable_prefix_caching=True)


def generate_traces_vllm(llm, tokenizer, problems: list[Problem], *, mode: str = "greedy",
                         config: SIAConfig | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
                         seed: int = 0) -> list[Trace]:
    """``generate_traces`` on a vLLM engine: the same prompt token ids, sampling settings
    (``vllm_sampling_kwargs``) and records (``trace_from_tokens``). Completion ``i`` of
    the call uses seed ``seed + i``."""
    from vllm import SamplingParams, TokensPrompt

    config = config or SIAConfig()
    prompts = [TokensPrompt(prompt_token_ids=prompt_ids(
        tokenizer, p.question, instruction=config.instruction, use_chat_template=config.use_chat_template,
        system_prompt=config.system_prompt)) for p in problems]
    params = [SamplingParams(**vllm_sampling_kwargs(mode, max_new_tokens=max_new_tokens,
                                                    temperature=temperature, seed=seed + i,
                                                    eos_token_id=tokenizer.eos_token_id))
              for i in range(len(problems))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [trace_from_tokens(tokenizer, p, o.outputs[0].token_ids, mode) for p, o in zip(problems, outputs)]


@torch.no_grad()
def generate_traces(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    mode: str = "greedy",
    config: SIAConfig | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[Trace]:
    """Let the model reason about each problem and judge its final answer.

    The prompt is the one the SIA curves condition on (``config``'s instruction, chat
    template and system prompt). Generation stops at the tokenizer's EOS or after
    ``max_new_tokens``; ``mode`` is ``greedy`` or ``sampled`` (pure temperature
    sampling). ``Trace.predicted`` is the answer extracted from the text
    (``extract_answer``: last number, last ``\\boxed{}``, or option letter) and
    ``Trace.correct`` whether it matches ``Problem.answer``. A trace may be empty.
    """
    from tqdm.auto import tqdm

    if mode not in GENERATION_MODES:
        raise ValueError(f"unknown generation mode {mode!r}; choose from {GENERATION_MODES}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    config = config or SIAConfig()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    traces: list[Trace] = []
    batches = range(0, len(problems), batch_size)
    for start in tqdm(batches, desc=f"generating ({mode})", disable=not progress, unit="batch"):
        batch = problems[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, p.question, instruction=config.instruction,
                              use_chat_template=config.use_chat_template, system_prompt=config.system_prompt)
                   for p in batch]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) \
            if mode == "sampled" \
            else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        traces.extend(trace_from_tokens(tokenizer, problem, row.tolist(), mode)
                      for problem, row in zip(batch, out[:, width:]))
    return traces
