"""The ``entropy-gpu sia`` pipeline: data -> traces -> curves -> JSONL, JSON, PNG."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .curve import SIAConfig, analyze_traces
from .data import Trace, gold_traces, load_dataset
from .generate import generate_traces
from .plots import plot_compare, plot_curves, plot_signatures
from .signatures import summarize

TRACE_SOURCES = ("gold", "greedy", "sampled")

# Used when the caller gives no instruction: the probe "The answer is" then matches
# how the model was asked to finish.
DEFAULT_INSTRUCTIONS = {
    "number": "Solve the problem step by step, then write 'The answer is' followed by the final number.",
    "letter": "Think step by step, then write 'The answer is' followed by the letter of the correct option.",
    "boxed": "Solve the problem step by step, then write the final answer in \\boxed{}.",
    "text": "Think step by step, then write 'The answer is' followed by your final answer.",
}


@dataclass
class RunSpec:
    """Everything ``run_sia`` needs besides the SIA config."""

    model: str = "smollm2"
    dataset: str = "gsm8k"
    out: str = "runs/sia"
    limit: int | None = 20
    split: str = "test"
    traces: str = "gold"
    max_new_tokens: int = 256
    gen_temperature: float = 0.7
    batch_size: int = 8
    random_twin: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    grid_points: int = 21
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True
    allow_download: bool = False  # let a --model hub name be downloaded


def write_outputs(curves, out_dir: Path, meta: dict, title: str, grid_points: int, n_boot: int, seed: int) -> dict:
    """curves.jsonl, summary.json, curves.png, signatures.png in ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [c.to_dict() for c in curves]
    with (out_dir / "curves.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {**meta, **summarize(records, grid_points=grid_points, n_boot=n_boot, seed=seed)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot_curves(summary, out_dir / "curves.png", title)
    plot_signatures(records, out_dir / "signatures.png", title, n_boot=n_boot, seed=seed)
    return summary


def run_sia(spec: RunSpec, config: SIAConfig, log=print) -> dict:
    """Run the whole analysis; returns the summary (also written to ``spec.out``)."""
    from ..models import load_model, random_twin

    if spec.traces not in TRACE_SOURCES:
        raise ValueError(f"traces must be one of {TRACE_SOURCES}, got {spec.traces!r}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    problems = load_dataset(spec.dataset, spec.limit, spec.split)
    if not problems:
        raise ValueError(f"dataset {spec.dataset!r} gave no problems")
    if config.instruction is None:
        config.instruction = DEFAULT_INSTRUCTIONS[problems[0].answer_kind]
    config.validate()
    missing = [p.id for p in problems if config.estimator == "choices" and not p.choices]
    if missing:
        raise ValueError(f"estimator 'choices' needs a finite answer set, and problem {missing[0]} has none: "
                         f"use next_token or sampled, or give 'choices' in your JSONL")
    out = Path(spec.out)
    traces = None
    if spec.traces == "gold":  # fail before loading the model; empty traces are skipped below
        with_trace = [p for p in problems if p.solution and p.solution.strip()]
        traces = gold_traces(with_trace or problems[:1])
        kept = {id(p) for p in with_trace}
        traces += [Trace(p, "", "gold") for p in problems if id(p) not in kept]
    log(f"loading {spec.model} ...")
    model, tokenizer = load_model(spec.model, dtype=dtypes[spec.dtype], device=spec.device,
                                  allow_download=spec.allow_download)

    t0 = time.perf_counter()
    if traces is None:
        traces = generate_traces(model, tokenizer, problems, mode=spec.traces, config=config,
                                 max_new_tokens=spec.max_new_tokens, temperature=spec.gen_temperature,
                                 batch_size=spec.batch_size, seed=spec.seed, progress=spec.progress)
    generation_s = time.perf_counter() - t0
    empty = [t.problem.id for t in traces if not t.text.strip()]
    traces = [t for t in traces if t.text.strip()]
    if empty:
        log(f"skipped {len(empty)} empty trace(s) (listed in summary.json 'skipped_empty_traces')")
    if not traces:
        raise ValueError(f"all {len(empty)} traces are empty: nothing to analyse "
                         f"(try a larger --max-new-tokens)")
    meta = {
        "model": spec.model, "dataset": spec.dataset, "split": spec.split, "limit": spec.limit,
        "traces": spec.traces, "config": config.to_dict(), "skipped_empty_traces": empty,
        "generation": {"max_new_tokens": spec.max_new_tokens, "temperature": spec.gen_temperature,
                       "seconds": round(generation_s, 2)} if spec.traces != "gold" else None,
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
    runs = {spec.model: model}
    if spec.random_twin:
        runs[f"{spec.model} (random weights)"] = random_twin(model, seed=spec.seed)
    summaries = {}
    for i, (label, m) in enumerate(runs.items()):
        t0 = time.perf_counter()
        curves = analyze_traces(m, tokenizer, traces, config, progress=spec.progress, desc=f"SIA {label}")
        seconds = time.perf_counter() - t0
        run_meta = {**meta, "model_label": label,
                    "timing": {"analysis_seconds": round(seconds, 2),
                               "tokens_processed": sum(c.tokens_processed for c in curves)}}
        target = out if i == 0 else out / "random_twin"
        title = f"{label} | {spec.dataset} {spec.traces} traces | {config.estimator} | n={len(curves)}"
        summaries[label] = write_outputs(curves, target, run_meta, title, spec.grid_points, spec.n_boot, spec.seed)
        log(f"wrote {target}/curves.jsonl, summary.json, curves.png, signatures.png ({seconds:.1f} s)")
    if spec.random_twin:
        plot_compare(summaries, out / "compare.png",
                     f"{spec.dataset} {spec.traces} traces | {config.estimator} | trained vs random weights")
        log(f"wrote {out}/compare.png")
    return summaries[spec.model]


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: counts, curve endpoints, AUROCs."""
    if summary["n_correct"] or summary["n_incorrect"]:
        judged = f"correct: {summary['n_correct']}  incorrect: {summary['n_incorrect']}"
    else:
        judged = "correctness: unknown"
    lines = [f"traces: {summary['n_traces']}  {judged}  mean steps: {summary['mean_steps']:.1f}"]
    if summary.get("skipped_empty_traces"):
        lines.append(f"skipped empty traces: {len(summary['skipped_empty_traces'])}")
    entry = summary["curves"].get("all", {})
    for field in ("entropy", "answer_logprob"):
        if field in entry:
            m = entry[field]["mean"]
            lines.append(f"mean {field:15s} at k/K=0: {m[0]:8.3f}   k/K=0.5: {m[len(m) // 2]:8.3f}   k/K=1: {m[-1]:8.3f}")
    for name, s in summary["signatures"].items():
        if s.get("auroc") is not None:
            lines.append(f"AUROC {name:20s} {s['auroc']:.3f}  [{s['lo']:.3f}, {s['hi']:.3f}]"
                         f"  (correct traces have {s['direction_if_correct']} values under SIA)")
    return "\n".join(lines)


__all__ = ["DEFAULT_INSTRUCTIONS", "RunSpec", "TRACE_SOURCES", "format_summary", "run_sia", "write_outputs"]
