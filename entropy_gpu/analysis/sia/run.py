"""The ``entropy-gpu sia`` pipeline: data -> traces -> curves -> JSONL, JSON, PNG."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..intervals import interval_text
from ..runs import Ranks, RecordLog, check_run_config, progress, ranks_for_run, write_json, write_jsonl
from .curve import SIAConfig, analyze_traces
from .data import Problem, Trace, gold_trace, iter_dataset
from .generate import check_engine, generate_traces, generate_traces_vllm, load_vllm
from .plots import plot_compare, plot_curves, plot_signatures
from .signatures import summarize

TRACE_SOURCES = ("gold", "greedy", "sampled")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

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
    allow_download: bool = False  #: let a --model hub name be downloaded
    engine: str = "hf"          #: trace generation: hf (transformers generate) | vllm
    overwrite: bool = False     #: start over when OUT holds a run with another config

    #: the ``sia`` flag behind each key of ``identity`` (named when a rerun is refused)
    IDENTITY_FLAGS = {
        "model": "--model", "dataset": "--dataset", "split": "--split", "limit": "--limit",
        "traces": "--traces", "generation.engine": "--engine",
        "generation.max_new_tokens": "--max-new-tokens",
        "generation.temperature": "--gen-temperature", "generation.batch_size": "--batch-size",
        "device": "--device", "dtype": "--dtype", "seed": "--seed", "config.seed": "--seed",
        "config.estimator": "--estimator", "config.segmentation": "--segment", "config.pattern": "--pattern",
        "config.every": "--every", "config.probe": "--probe", "config.answer_prefix": "--answer-prefix",
        "config.instruction": "--instruction", "config.use_chat_template": "--no-chat-template",
        "config.system_prompt": "--system-prompt", "config.num_samples": "--num-samples",
        "config.sample_temperature": "--sample-temperature",
        "config.max_answer_tokens": "--max-answer-tokens",
        "config.method": "--method",
    }

    def identity(self, config: SIAConfig) -> dict:
        """What the records depend on (stored in OUT/run.json; a resume must match it).
        ``grid_points``, ``n_boot`` and ``random_twin`` only shape the summary or add a
        folder, so they may change between resumes."""
        generation = None if self.traces == "gold" else {
            "engine": self.engine, "max_new_tokens": self.max_new_tokens, "temperature": self.gen_temperature,
            "batch_size": self.batch_size}
        return {"what": "entropy-gpu sia", "format": 1, "model": self.model, "dataset": self.dataset,
                "split": self.split, "limit": self.limit, "traces": self.traces, "generation": generation,
                "device": torch.device(self.device).type, "dtype": self.dtype, "seed": self.seed,
                "config": config.to_dict()}


def write_outputs(curves, out_dir: Path, meta: dict, title: str, grid_points: int, n_boot: int,
                  seed: int) -> dict:
    """curves.jsonl, summary.json, curves.png, signatures.png in ``out_dir``; returns the summary.
    ``curves``: ``AnswerCurve`` objects or their ``to_dict()`` records, in output order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [c if isinstance(c, dict) else c.to_dict() for c in curves]
    write_jsonl(out_dir / "curves.jsonl", records)
    summary = {**meta, **summarize(records, grid_points=grid_points, n_boot=n_boot, seed=seed)}
    write_json(out_dir / "summary.json", summary)
    plot_curves(summary, out_dir / "curves.png", title)
    plot_signatures(records, out_dir / "signatures.png", title, n_boot=n_boot, seed=seed)
    return summary


def _scan(spec: RunSpec, config: SIAConfig) -> tuple[int, str]:
    """One streaming pass over the problems before any model is loaded: their number and
    the first one's answer kind; ValueError for a problem the run could not analyse."""
    n, kind, first, with_trace = 0, None, None, 0
    for p in iter_dataset(spec.dataset, spec.limit, spec.split):
        if kind is None:
            kind, first = p.answer_kind, p
        if config.estimator == "choices" and not p.choices:
            raise ValueError(f"estimator 'choices' needs a finite answer set, and problem {p.id} has none: "
                             f"use next_token or sampled, or give 'choices' in your JSONL")
        with_trace += bool(p.solution and p.solution.strip())
        n += 1
    if not n:
        raise ValueError(f"dataset {spec.dataset!r} gave no problems")
    if spec.traces == "gold" and not with_trace:
        gold_trace(first)  # its error; problems without a trace among others are skipped as empty
    return n, kind


def _chunks(spec: RunSpec) -> Iterator[tuple[int, list[tuple[int, Problem]]]]:
    """(chunk number, [(index, problem)]) in input order. A chunk is one generation batch
    (``batch_size`` problems; gold traces: one problem), the unit given to a rank, so the
    batches, and the traces generated from them, do not depend on the number of ranks."""
    size = spec.batch_size if spec.traces != "gold" else 1
    chunk: list[tuple[int, Problem]] = []
    for index, problem in enumerate(iter_dataset(spec.dataset, spec.limit, spec.split)):
        chunk.append((index, problem))
        if len(chunk) == size:
            yield index // size, chunk
            chunk = []
    if chunk:
        yield chunk[0][0] // size, chunk


def run_sia(spec: RunSpec, config: SIAConfig, log=print, ranks: Ranks | None = None) -> dict:
    """Run the whole analysis; returns the summary (also written to ``spec.out``; ``{}`` on
    ranks other than 0).

    Under ``torchrun`` every rank analyses its share of the traces (``ranks``, default: from
    the environment) and rank 0 writes the outputs, identical to a one-process run. Finished
    traces are kept in ``OUT/records/``: a rerun with the same arguments resumes; one with
    other arguments raises ValueError unless ``spec.overwrite``.
    """
    from ..models import load_model, random_twin

    if spec.traces not in TRACE_SOURCES:
        raise ValueError(f"traces must be one of {TRACE_SOURCES}, got {spec.traces!r}")
    if spec.traces != "gold":
        check_engine(spec.engine)
        if spec.engine == "vllm" and spec.model == "smollm2":
            load_vllm(spec.model)  # its error, before any work
    if spec.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {spec.batch_size}")
    with ranks_for_run(ranks, spec.device) as ranks:
        if spec.traces != "gold" and spec.engine == "vllm" and ranks.world_size > 1:
            # vLLM sets up its own distributed state; one engine per torchrun rank is untested.
            raise ValueError("--engine vllm runs in one process (no torchrun); "
                             "use --engine hf under torchrun")
        quiet = lambda *a: None  # ranks other than 0 say nothing
        summary = _run(spec, config, log if ranks.is_main else quiet, ranks, load_model, random_twin)
    return summary


def _run(spec: RunSpec, config: SIAConfig, log, ranks: Ranks, load_model, random_twin) -> dict:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    started = time.perf_counter()
    n_problems, first_kind = _scan(spec, config)  # fail before loading the model
    if config.instruction is None:
        config.instruction = DEFAULT_INSTRUCTIONS[first_kind]
    config.validate()
    out = Path(spec.out)
    check_run_config(out, spec.identity(config), overwrite=spec.overwrite, ranks=ranks,
                     record_dirs=("records", "random_twin/records"), flags=RunSpec.IDENTITY_FLAGS)
    labels = [spec.model] + ([f"{spec.model} (random weights)"] if spec.random_twin else [])
    targets = {label: out if i == 0 else out / "random_twin" for i, label in enumerate(labels)}
    logs = {label: RecordLog(targets[label], ranks) for label in labels}
    resumed = {label: len(logs[label].done) for label in labels}
    if any(resumed.values()):
        log("resuming: " + ", ".join(f"{label}: {n} of {n_problems} traces done"
                                     for label, n in resumed.items()))

    def missing(chunk):
        return [(i, p) for i, p in chunk if any(i not in logs[label] for label in labels)]

    todo = sum(len(missing(chunk)) for c, chunk in _chunks(spec) if ranks.owns(c))
    seconds = {"generation": 0.0, "analysis": 0.0}
    if todo:
        log(f"loading {spec.model} ..." + (f" ({ranks.world_size} ranks)" if ranks.world_size > 1 else ""))
        model, tokenizer = load_model(spec.model, dtype=dtypes[spec.dtype], device=ranks.device,
                                      allow_download=spec.allow_download)
        models = {spec.model: model}
        if spec.random_twin:
            models[labels[1]] = random_twin(model, seed=spec.seed)
        _analyse_missing(spec, config, ranks, models, tokenizer, logs, missing, todo, seconds)
    summaries = {}
    for label in labels:
        records = logs[label].gathered()  # on every rank
        logs[label].close()
        if len(records) != n_problems:
            raise RuntimeError(f"{targets[label]}: {len(records)} records for {n_problems} traces")
        curves = [r["curve"] for r in records if "curve" in r]
        empty = [r["id"] for r in records if r.get("empty")]
        if not curves:
            raise ValueError(f"all {len(empty)} traces are empty: nothing to analyse "
                             f"(try a larger --max-new-tokens)")
        if not ranks.is_main:
            continue
        if empty and label == spec.model:
            log(f"skipped {len(empty)} empty trace(s) (listed in summary.json 'skipped_empty_traces')")
        meta = {
            "model": spec.model, "dataset": spec.dataset, "split": spec.split, "limit": spec.limit,
            "traces": spec.traces, "config": config.to_dict(), "model_label": label,
            "skipped_empty_traces": empty,
            "generation": {"engine": spec.engine, "max_new_tokens": spec.max_new_tokens,
                           "temperature": spec.gen_temperature, "batch_size": spec.batch_size}
            if spec.traces != "gold" else None,
            "tokens_processed": sum(c["tokens_processed"] for c in curves),
            # How this invocation ran: differs between runs on the same traces.
            "run": {"world_size": ranks.world_size, "records_resumed": resumed[label],
                    "seconds": round(time.perf_counter() - started, 2),
                    "rank0_generation_seconds": round(seconds["generation"], 2),
                    "rank0_analysis_seconds": round(seconds["analysis"], 2),
                    "torch": torch.__version__, "machine": platform.machine(),
                    "threads": torch.get_num_threads()},
        }
        title = f"{label} | {spec.dataset} {spec.traces} traces | {config.estimator} | n={len(curves)}"
        summaries[label] = write_outputs(curves, targets[label], meta, title, spec.grid_points, spec.n_boot,
                                         spec.seed)
        log(f"wrote {targets[label]}/curves.jsonl, summary.json, curves.png, signatures.png")
    if ranks.is_main and spec.random_twin:
        plot_compare(summaries, out / "compare.png",
                     f"{spec.dataset} {spec.traces} traces | {config.estimator} | trained vs random weights")
        log(f"wrote {out}/compare.png")
    ranks.barrier()
    return summaries.get(spec.model, {})


def _analyse_missing(spec: RunSpec, config: SIAConfig, ranks: Ranks, models: dict, tokenizer,
                     logs: dict[str, RecordLog], missing, todo: int, seconds: dict[str, float]) -> None:
    """Generate (or read) the traces of this rank's chunks that some model label still lacks
    and append their records; adds the time spent to ``seconds``. ``models``: label -> model,
    the first one the model that generates."""
    model = next(iter(models.values()))
    engine = load_vllm(spec.model, dtype=VLLM_DTYPES[spec.dtype], seed=spec.seed) \
        if spec.traces != "gold" and spec.engine == "vllm" else None
    bar = progress(todo, "SIA", ranks, spec.progress)
    for c, chunk in _chunks(spec):
        if not ranks.owns(c) or not missing(chunk):
            continue
        t0 = time.perf_counter()
        problems = [p for _, p in chunk]
        traces = _traces(spec, config, model, engine, tokenizer, problems, seed=spec.seed + c)
        seconds["generation"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for (index, _), trace in zip(chunk, traces):
            if all(index in logs[label] for label in models):
                continue  # done earlier; generated again only because its batch was not
            for label in models:
                if index not in logs[label]:
                    logs[label].append(_record(models[label], tokenizer, index, trace, config))
            bar.update(1)
        seconds["analysis"] += time.perf_counter() - t0
    bar.close()


def _traces(spec: RunSpec, config: SIAConfig, model, engine, tokenizer, problems: list[Problem],
            seed: int) -> list[Trace]:
    if spec.traces == "gold":  # a problem without a trace: an empty trace, skipped
        return [gold_trace(p) if p.solution and p.solution.strip() else Trace(p, "", "gold")
                for p in problems]
    if engine is not None:
        return generate_traces_vllm(engine, tokenizer, problems, mode=spec.traces, config=config,
                                    max_new_tokens=spec.max_new_tokens, temperature=spec.gen_temperature,
                                    seed=seed)
    return generate_traces(model, tokenizer, problems, mode=spec.traces, config=config,
                           max_new_tokens=spec.max_new_tokens, temperature=spec.gen_temperature,
                           batch_size=spec.batch_size, seed=seed, progress=False)


def _record(model, tokenizer, index: int, trace: Trace, config: SIAConfig) -> dict:
    """The record of one trace: its curve, or a marker for an empty trace (skipped)."""
    if not trace.text.strip():
        return {"index": index, "id": trace.problem.id, "empty": True}
    curve = analyze_traces(model, tokenizer, [trace], config, progress=False)[0]
    return {"index": index, "id": trace.problem.id, "curve": curve.to_dict()}


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: counts, curve endpoints, AUROCs."""
    unjudged = summary.get("n_unjudged", 0)
    if summary["n_correct"] or summary["n_incorrect"]:
        judged = f"correct: {summary['n_correct']}  incorrect: {summary['n_incorrect']}  unjudged: {unjudged}"
    else:
        judged = f"correctness: unknown (unjudged: {unjudged})"
    lines = [f"traces: {summary['n_traces']}  {judged}  mean steps: {summary['mean_steps']:.1f}"]
    if summary.get("skipped_empty_traces"):
        lines.append(f"skipped empty traces: {len(summary['skipped_empty_traces'])}")
    entry = summary["curves"].get("all", {})
    for field in ("entropy", "answer_logprob"):
        if field in entry:
            m = entry[field]["mean"]
            lines.append(f"mean {field:15s} at k/K=0: {m[0]:8.3f}   "
                         f"k/K=0.5: {m[len(m) // 2]:8.3f}   k/K=1: {m[-1]:8.3f}")
    for name, s in summary["signatures"].items():
        if s.get("auroc") is not None:
            interval = interval_text(s.get("lo"), s.get("hi"), ".3f")
            lines.append(f"AUROC {name:20s} {s['auroc']:.3f}  {interval}"
                         f"  (correct traces have {s['direction_if_correct']} values under SIA)")
    return "\n".join(lines)


__all__ = ["DEFAULT_INSTRUCTIONS", "RunSpec", "TRACE_SOURCES", "format_summary", "run_sia", "write_outputs"]
