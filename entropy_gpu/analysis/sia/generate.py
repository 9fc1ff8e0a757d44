"""Model-generated reasoning traces, judged by answer extraction."""

from __future__ import annotations

import torch

from .answers import answers_match, extract_answer
from .curve import SIAConfig, prompt_ids
from .data import Problem, Trace

GENERATION_MODES = ("greedy", "sampled")


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
        sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if mode == "sampled" \
            else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        for problem, row in zip(batch, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            predicted = extract_answer(text, problem.answer_kind, labels=problem.choices)
            traces.append(Trace(problem, text, mode, correct=answers_match(predicted, problem.answer,
                                                                           problem.answer_kind),
                                predicted=predicted))
    return traces
