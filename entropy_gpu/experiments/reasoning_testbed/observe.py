"""The papers' observational claims across SFT checkpoints: held-out accuracy, the exact
per-response rho (and how the fast measures track it), and SIA answer-entropy curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

from entropy_gpu.analysis.runs import read_records

from . import task
from .config import TestbedConfig
from .evaluate import heldout_accuracy, probe, sia_records, summarize_probe, summarize_sia
from .policy import load_policy
from .sft import checkpoints

FAST_MEASURES = ("same_position", "one_hop")


def observe_checkpoints(config: TestbedConfig, out: Path, progress: bool = True) -> Path:
    """One record per SFT checkpoint in ``OUT/observe/records.jsonl`` (resumes: skips recorded steps)."""
    folder = out / "observe"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "records.jsonl"
    done = {r["sft_step"] for r in read_records(path)} if path.is_file() else set()
    problems = task.generate(
        config.observe_heldout, 1, tuple(config.difficulties), heldout=True, distinct=True
    )
    for step, ckpt in checkpoints(out / "sft"):
        if step in done:
            continue
        if progress:
            print(f"observe: SFT checkpoint {step}", flush=True)
        t0 = time.perf_counter()
        model, tokenizer = load_policy(ckpt)
        record = {
            "sft_step": step,
            **heldout_accuracy(
                model,
                tokenizer,
                problems,
                seed=30_000,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
            ),
        }
        rows = probe(
            model,
            tokenizer,
            problems[: config.observe_probe_problems],
            seed=40_000,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            fast_measures=FAST_MEASURES,
        )
        record["probe"] = summarize_probe(rows, FAST_MEASURES)
        record["probe_responses"] = rows
        # SIA traces: the problems after the probe's, so the two samples are independent.
        sia = sia_records(
            model,
            tokenizer,
            problems[
                config.observe_probe_problems : config.observe_probe_problems + config.observe_sia_problems
            ],
            seed=50_000,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
        )
        record["sia"] = summarize_sia(sia)
        record["sia_traces"] = sia
        record["seconds"] = time.perf_counter() - t0
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return path
