"""Supervised training of the testbed's policy from scratch: next-token loss on the worked
solutions, checkpoints along the way (resumable), a quick greedy held-out accuracy per checkpoint."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from entropy_gpu.analysis.runs import read_records, write_jsonl

from . import task
from .policy import ModelShape, build_model, generate, load_policy, save_policy


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    save_every: int = 250
    quick_eval_problems: int = 240
    seed: int = 0


def _batch(problems: list[task.Problem], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of prompt + solution + eos, and labels (-100 outside the completion)."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False).input_ids
        completion = tokenizer(p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def _lr(step: int, config: SFTConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def greedy_accuracy(model, tokenizer, problems: list[task.Problem], max_new_tokens: int) -> float:
    completions = generate(
        model, tokenizer, [p.prompt for p in problems], sample=False, max_new_tokens=max_new_tokens
    )
    return sum(
        task.is_correct(task.decode(tokenizer, c), p.answer) for c, p in zip(completions, problems)
    ) / len(problems)


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Saved SFT checkpoints ``(step, folder)`` in step order."""
    found = [
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-*")
        if (p / "training_state.pt").is_file()
    ]
    return sorted(found)


def _save(model, tokenizer, optimizer, folder: Path, step: int) -> None:
    save_policy(model, tokenizer, folder)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, folder / "training_state.pt")


def train_sft(
    config: SFTConfig,
    shape: ModelShape,
    difficulties: tuple[int, ...],
    folder: Path,
    max_new_tokens: int,
    progress: bool = True,
) -> Path:
    """Train (or resume) into ``folder``: ``checkpoint-N`` every ``save_every`` steps, ``log.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(shape, config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    start = 0
    saved = checkpoints(folder)
    if saved:
        start, last = saved[-1]
        state = torch.load(last / "training_state.pt", weights_only=False)
        model, tokenizer = load_policy(last)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay
        )
        optimizer.load_state_dict(state["optimizer"])
        if progress:
            print(f"SFT: resuming from {last.name}", flush=True)
    if not saved:  # the random initialisation is checkpoint 0 (the observation starts there)
        _save(model, tokenizer, optimizer, folder / "checkpoint-0", 0)
    quick = task.generate(config.quick_eval_problems, 1, difficulties, heldout=True, distinct=True)
    log = folder / "log.jsonl"
    # A killed run logged steps past its last checkpoint: drop them; times add up across attempts.
    earlier = [r for r in read_records(log) if r["step"] <= start] if log.is_file() else []
    write_jsonl(log, earlier)
    wall0, cpu0 = (earlier[-1]["wall_s"], earlier[-1]["cpu_s"]) if earlier else (0.0, 0.0)
    model.train()
    t0, c0 = time.perf_counter() - wall0, time.process_time() - cpu0
    for step in range(start, config.steps):
        problems = task.generate(config.batch_size, f"sft:{config.seed}:{step}", difficulties, heldout=False)
        ids, labels = _batch(problems, tokenizer)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss": float(loss)}
        if done % config.save_every == 0 or done == config.steps:
            record["greedy_acc_quick"] = greedy_accuracy(model, tokenizer, quick, max_new_tokens)
            _save(model, tokenizer, optimizer, folder / f"checkpoint-{done}", done)
            model.train()
        record["wall_s"] = time.perf_counter() - t0
        record["cpu_s"] = time.process_time() - c0
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if progress and (done % 25 == 0 or "greedy_acc_quick" in record):
            print(
                f"SFT step {done}/{config.steps} loss {record['loss']:.3f}"
                + (
                    f" greedy(quick) {record['greedy_acc_quick']:.3f}" if "greedy_acc_quick" in record else ""
                ),
                flush=True,
            )
    return folder
