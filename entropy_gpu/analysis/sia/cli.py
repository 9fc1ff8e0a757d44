"""``entropy-gpu sia`` and ``entropy-gpu sia-bench`` (registered by ``entropy_gpu.cli``), and the
demo's short SIA run (``demo_sia``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...cli.support import (
    UsageError,
    add_threads_option,
    check_device,
    check_model,
    common_options,
    positive_float,
    positive_int,
    text_with_escapes,
    writable_dir,
    writable_file,
)

SEGMENT_CHOICES = ("newline", "sentence", "regex", "tokens")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled SmolLM2-135M-Instruct), a local model path, or a hub name in the "
                        "local cache (others need --allow-download)")
    p.add_argument("--dataset", default="gsm8k",
                   help="gsm8k | math500 | arc_easy | arc_challenge | path/to/problems.jsonl")
    p.add_argument("--split", default="test", help="ARC only: test or validation")
    p.add_argument("--limit", type=int, default=20, help="first N problems (0: all)")
    p.add_argument("--traces", default="auto", choices=("auto", "gold", "greedy", "sampled"),
                   help="gold: teacher-force the dataset's solutions (GSM8K, MATH-500, JSONL 'trace'); "
                        "greedy/sampled: let the model reason, judge by answer extraction; "
                        "auto: gold where the dataset has solutions, else greedy (ARC)")
    p.add_argument("--estimator", default="auto", choices=("auto", "choices", "next_token", "sampled"),
                   help="auto: choices when the dataset has an answer set (ARC), else next_token")
    p.add_argument("--segment", default="sentence", choices=SEGMENT_CHOICES,
                   help="how a trace is cut into steps")
    p.add_argument("--pattern", help="separator regex for --segment regex")
    p.add_argument("--every", type=int, help="tokens per step for --segment tokens")
    p.add_argument("--probe", default="\nThe answer is", type=text_with_escapes,
                   help="appended after each prefix (backslash escapes \\n, \\t, \\\\ are decoded)")
    p.add_argument("--answer-prefix", default=" ", type=text_with_escapes,
                   help="between the probe and an answer (escapes as in --probe)")
    p.add_argument("--instruction", help="appended to the question (default: per answer kind; '' for none)")
    p.add_argument("--system-prompt", help="system turn (default: the chat template's own)")
    p.add_argument("--no-chat-template", action="store_true", help="plain 'Question: ...\\nAnswer:' prompt")
    p.add_argument("--num-samples", type=int, default=16, help="sampled estimator: answers per prefix")
    p.add_argument("--sample-temperature", type=float, default=1.0, help="sampled estimator: temperature")
    p.add_argument("--max-answer-tokens", type=int, default=8, help="sampled estimator: answer length limit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generated traces: length limit")
    p.add_argument("--gen-temperature", type=float, default=0.7, help="--traces sampled: temperature")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="model weights")
    p.add_argument("--seed", type=int, default=0, help="generation and sampling seed")
    add_threads_option(p)


def _config(args: argparse.Namespace, has_choices: bool):
    from .curve import SIAConfig

    estimator = args.estimator if args.estimator != "auto" else ("choices" if has_choices else "next_token")
    return SIAConfig(
        estimator=estimator, segmentation=args.segment, pattern=args.pattern, every=args.every,
        probe=args.probe, answer_prefix=args.answer_prefix, instruction=args.instruction,
        use_chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
        num_samples=args.num_samples, sample_temperature=args.sample_temperature,
        max_answer_tokens=args.max_answer_tokens, seed=args.seed,
        method=getattr(args, "method", "packed"))


def _check_common(args: argparse.Namespace) -> list:
    """Everything ``sia`` and ``sia-bench`` can check before loading the model; returns
    the first problem of the dataset (a list of at most one), which decides defaults."""
    check_device(args.device)
    positive_int("--limit", args.limit, minimum=0)
    for flag, value in (("--num-samples", args.num_samples), ("--max-answer-tokens", args.max_answer_tokens),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--every", args.every)):
        positive_int(flag, value)
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be >= 2 (an entropy needs two samples), got {args.num_samples}")
    positive_float("--sample-temperature", args.sample_temperature)
    positive_float("--gen-temperature", args.gen_temperature)
    if args.segment == "regex" and not args.pattern:
        raise UsageError("--segment regex needs --pattern, e.g. --pattern '\\n(?=Step \\d)'")
    if args.segment == "tokens" and args.every is None:
        raise UsageError("--segment tokens needs --every N (tokens per step)")
    if args.pattern is not None and args.segment != "regex":
        raise UsageError(f"--pattern only applies to --segment regex (this run cuts steps with --segment "
                         f"{args.segment}); add --segment regex or drop --pattern")
    if args.pattern:
        import re
        try:
            re.compile(args.pattern)
        except re.error as exc:
            raise UsageError(f"--pattern {args.pattern!r} is not a valid regex ({exc})") from None
    first = _first_problem(args)
    positive_int("--threads", args.threads)
    check_model(args.model, args.allow_download)
    return first


def _first_problem(args: argparse.Namespace) -> list:
    """The checks of ``--dataset``, ``--split`` and ``--estimator``; the dataset's first problem."""
    from .data import DATASETS, load_dataset

    if args.dataset.startswith("arc_") and args.split not in ("test", "validation"):
        raise UsageError(f"--split must be test or validation for ARC, got {args.split!r}")
    if args.dataset not in DATASETS and not Path(args.dataset).is_file():
        path = Path(args.dataset)
        if path.is_dir():
            raise UsageError(f"--dataset {args.dataset}: is a folder; give the path of a .jsonl file")
        if path.suffix or len(path.parts) > 1 or args.dataset.startswith((".", "~")):  # meant as a path
            raise UsageError(f"--dataset {args.dataset}: no such file")
        raise UsageError(f"--dataset {args.dataset}: unknown dataset; use one of {', '.join(DATASETS)} "
                         f"or the path of a .jsonl file")
    try:
        first = load_dataset(args.dataset, 1, args.split)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise UsageError(f"--dataset {args.dataset}: {exc}") from None
    if not first:
        raise UsageError(f"--dataset {args.dataset} has no problems")
    if args.estimator == "choices" and not first[0].choices:
        raise UsageError(f"--estimator choices needs a finite answer set, and {args.dataset} has none: "
                         f"use --estimator next_token or sampled")
    return first


def _use_threads(args: argparse.Namespace, quiet: bool = False) -> None:
    from ...cpu_threads import use_cpu_threads

    line = use_cpu_threads(args.threads, args.device)
    if line and not quiet:
        print(line)


def _traces_source(requested: str, first, dataset: str) -> str:
    has_solutions = bool(first[0].solution and first[0].solution.strip())
    if requested == "auto":
        return "gold" if has_solutions else "greedy"
    if requested == "gold" and not has_solutions and first[0].meta.get("source") != "user":
        raise UsageError(f"--traces gold: {dataset} has no reasoning traces to teacher-force; "
                         f"use --traces greedy or sampled (the model writes them)")
    return requested


def cmd_sia(args: argparse.Namespace) -> int:
    from .run import RunSpec, format_summary, run_sia

    if args.every is not None and args.segment != "tokens":
        raise UsageError(f"--every only applies to --segment tokens (this run cuts steps with --segment "
                         f"{args.segment}); add --segment tokens or drop --every")
    first = _check_common(args)
    positive_int("--grid-points", args.grid_points, minimum=2)
    positive_int("--bootstrap", args.bootstrap)
    traces = _traces_source(args.traces, first, args.dataset)
    if args.engine != "hf" and traces == "gold":
        raise UsageError(f"--engine {args.engine} generates traces, and --traces gold teacher-forces the "
                         f"dataset's own (nothing is generated): use --traces greedy or sampled, or drop "
                         f"--engine")
    writable_dir(args.out, "--out")
    _use_threads(args, quiet=args.no_progress)
    spec = RunSpec(model=args.model, dataset=args.dataset, out=args.out, limit=args.limit or None,
                   split=args.split, traces=traces, max_new_tokens=args.max_new_tokens,
                   gen_temperature=args.gen_temperature, batch_size=args.batch_size,
                   random_twin=args.random_twin, device=args.device, dtype=args.dtype,
                   grid_points=args.grid_points, n_boot=args.bootstrap, seed=args.seed,
                   progress=not args.no_progress, allow_download=args.allow_download,
                   engine=args.engine, overwrite=args.overwrite)
    if args.traces == "auto" and traces != "gold":
        print(f"{args.dataset} ships no reasoning traces: the model writes them (--traces {traces})")
    from ..models import library_progress_bars

    with library_progress_bars(not args.no_progress):
        summary = run_sia(spec, _config(args, bool(first[0].choices)))
    if summary:  # rank 0 (the only rank without torchrun)
        print(format_summary(summary))
    return 0


def cmd_sia_bench(args: argparse.Namespace) -> int:
    import torch

    from ..models import load_model
    from .bench import bench_one_pass, format_bench, traces_with_steps
    from .data import gold_traces, load_dataset
    from .run import DEFAULT_INSTRUCTIONS

    first = _check_common(args)
    if args.traces not in ("auto", "gold"):
        raise UsageError("sia-bench teacher-forces the dataset's own traces: --traces must be gold")
    _traces_source("gold", first, args.dataset)
    for flag, value in (("--min-steps", args.min_steps), ("--max-traces", args.max_traces),
                        ("--repeats", args.repeats)):
        positive_int(flag, value)
    if args.out:
        writable_file(args.out, "--out")
    _use_threads(args)
    problems = load_dataset(args.dataset, args.limit or None, args.split)
    config = _config(args, bool(problems[0].choices))
    if config.instruction is None:
        config.instruction = DEFAULT_INSTRUCTIONS[problems[0].answer_kind]
    config.validate()
    traces = gold_traces(problems)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device,
                                  allow_download=args.allow_download)
    traces = traces_with_steps(traces, tokenizer, config, args.min_steps)[:args.max_traces]
    result = bench_one_pass(model, tokenizer, traces, config, repeats=args.repeats)
    result.update(model=args.model, dataset=args.dataset, threads=torch.get_num_threads())
    print(format_bench(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    """Register ``sia`` and ``sia-bench`` on the main parser's subcommands."""
    _register_sia(subparsers)
    _register_sia_bench(subparsers)


def _register_sia(subparsers) -> None:
    sia = subparsers.add_parser(
        "sia", parents=[common_options()], help="SIA curves: answer entropy along reasoning prefixes",
        description="Conditional answer entropy H_k and log p(true answer)_k along the "
                    "prefixes of reasoning traces; writes curves.jsonl, summary.json, "
                    "curves.png, signatures.png to --out.")
    _add_common(sia)
    sia.add_argument("--out", default="runs/sia", help="output folder")
    sia.add_argument("--random-twin", action="store_true",
                     help="also analyse the same traces with the model's random-weight twin "
                          "(OUT/random_twin, "
                          "OUT/compare.png)")
    sia.add_argument("--grid-points", type=int, default=21, help="normalized positions of the mean curves")
    sia.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals")
    sia.add_argument("--method", default="packed", choices=("packed", "naive"),
                     help="packed: one forward pass per trace; naive: re-encode every prefix")
    sia.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Scale and resume (docs/usage/scale.md).
    sia.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                     help="--traces greedy/sampled: generate with Hugging Face (any device) or vLLM (GPU); "
                          "vllm with gold traces is an error (nothing is generated)")
    sia.add_argument("--overwrite", action="store_true",
                     help="start over when --out holds records of a run with other arguments "
                          "(default: resume a run with the same arguments, refuse a different one)")
    sia.set_defaults(func=cmd_sia, resumable=True)


def _register_sia_bench(subparsers) -> None:
    bench = subparsers.add_parser(
        "sia-bench", parents=[common_options()],
        help="SIA one-pass vs naive re-encoding: wall time and tokens",
        description="Time the one-pass (packed) SIA evaluation against re-encoding every "
                    "prefix, on the dataset's own (gold) traces.")
    _add_common(bench)
    bench.set_defaults(segment="tokens", every=16, limit=40)
    bench.add_argument("--min-steps", type=int, default=8, help="only traces with at least this many steps")
    bench.add_argument("--max-traces", type=int, default=5, help="traces timed")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs of each method")
    bench.add_argument("--out", help="write the result as JSON here")
    bench.set_defaults(func=cmd_sia_bench)


def demo_sia(n_problems: int = 3) -> None:
    """The demo's SIA part: SmolLM2 on the first GSM8K gold traces (about 20 s on CPU)."""
    import time

    try:
        from ..models import load_model
        from .curve import SIAConfig, analyze_traces
        from .data import gold_traces, load_gsm8k
        from .run import DEFAULT_INSTRUCTIONS

        problems = load_gsm8k(n_problems)
        t0 = time.perf_counter()
        model, tokenizer = load_model()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"SIA demo skipped: {exc}")
        return
    load_s = time.perf_counter() - t0
    config = SIAConfig(estimator="next_token", instruction=DEFAULT_INSTRUCTIONS["number"])
    t0 = time.perf_counter()
    curves = analyze_traces(model, tokenizer, gold_traces(problems), config, progress=False)
    print(f"SIA: SmolLM2-135M-Instruct on {len(curves)} GSM8K gold traces, next_token estimator "
          f"(load {load_s:.0f} s, analysis {time.perf_counter() - t0:.1f} s)")
    print("  H_k = entropy of the answer's first digit after "
          "'<trace prefix>\\nThe answer is ', k = 0..K (nats)")
    for c in curves:
        print(f"  {c.id:10} answer {c.answer:>6}  H_k: " + " ".join(f"{h:5.2f}" for h in c.entropy)
              + "   log p(answer)_k: " + " ".join(f"{x:6.2f}" for x in c.answer_logprob))
    print("  full analysis: entropy-gpu sia --dataset gsm8k --limit 50 --random-twin --out runs/sia")
