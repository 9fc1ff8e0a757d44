"""Command line: ``entropy-gpu demo | bench | grad-report | sia | sia-bench``.

``demo`` is the Quickstart's main job on built-in defaults: token statistics on a
batch, checked against float64, a small benchmark table on whatever device
is present, and a short SIA run on the bundled SmolLM2.

Every command checks its arguments before it loads a model or starts work; a user
error is one line on stderr and exit code 2 (``--debug`` shows the traceback). Nothing
contacts a model hub unless ``--allow-download`` (or ``ENTROPY_GPU_ALLOW_DOWNLOAD=1``)
is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from . import __version__
from .analysis.sia.cli import add_sia_commands
from .bench.suite import DTYPES
from .cli_support import (
    ALLOW_DOWNLOAD_ENV,
    Parser,
    UsageError,
    add_threads_option,
    check_device,
    check_model,
    downloads_allowed,
    go_offline,
    positive_float,
    positive_int,
    writable_dir,
    writable_file,
)

DESCRIPTION = ("Fused token statistics (entropy, log-prob, gradient norms) over huge vocabularies: "
               "a demo, benchmarks, SIA curves and the parameter-gradient report. "
               "Runs offline unless --allow-download is given.")
RESUMABLE = ("sia", "grad-report")  # commands that keep finished records and resume a rerun


def cmd_demo(args: argparse.Namespace) -> int:
    from . import resolve_backend, token_stats
    from .bench.report import column_legend, format_table, format_warnings
    from .bench.suite import DTYPES, run_suite
    from .cpu_threads import use_cpu_threads

    device = check_device(args.device)
    positive_int("--repeats", args.repeats)
    positive_int("--threads", args.threads)
    if args.out:
        writable_file(args.out, "--out")
    backend = resolve_backend(device)
    print(f"entropy-gpu demo on {device} (backend: {backend})")
    threads_line = use_cpu_threads(args.threads, device)
    if threads_line:
        print(threads_line)
    print()
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = 32000
    logits = torch.randn(2, 6, vocab, device=device, generator=gen) * 3
    targets = torch.randint(0, vocab, (2, 6), device=device, generator=gen)
    out = token_stats(logits, targets, stats="all", temperature=0.7)
    print("token_stats(logits [2, 6, 32000], targets, temperature=0.7), first sequence:")
    print(f"  {'field':18} " + " ".join(f"{'tok' + str(i):>8}" for i in range(6)))
    for name, value in out._asdict().items():
        print(f"  {name:18} " + " ".join(f"{v:8.4f}" for v in value[0].tolist()))
    ref = torch.log_softmax(logits.double() / 0.7, -1)
    err = (out.entropy.double() + (ref.exp() * ref).sum(-1)).abs().max().item()
    print(f"  max |entropy - float64 reference| = {err:.2e}\n")
    shapes = [(2048, 32000)] if device.type == "cpu" else [(4096, 32000), (8192, 151936)]
    dtype = DTYPES["fp32"] if device.type == "cpu" else DTYPES["bf16"]
    run = run_suite(["forward"], shapes, [], [dtype], device, impl_filter=["entropy_gpu", "eager torch"],
                    repeats=args.repeats, log=None)
    print(f"measured copy bandwidth: {run.metadata['copy_gbps']:.0f} GB/s")
    print("entropy + logprob + nll_grad_norm:")
    print(format_table(run.results))
    warnings = format_warnings(run)
    if warnings:
        print(warnings)
    print("columns:\n" + "\n".join(column_legend()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run.to_dict(), indent=1, default=str))
        print(f"\nwrote {args.out}")
    if not args.no_sia:
        from .analysis.sia.cli import demo_sia

        print()
        demo_sia()
    return 0


def _floors(args: argparse.Namespace, shapes, linear_shapes, dtypes) -> int:
    from .bench.report import shape_text
    from .bench.suite import dtype_name, floor_ms, linear_flops, required_bytes

    tflops = args.floor_tflops
    print(f"floors: memory = required bytes / {args.floors:g} GB/s"
          + (f"; compute (fused LM head) = 2 N H V / {tflops:g} TFLOP/s" if tflops else ""))
    print(f"  {'case':17} {'shape':>20} {'dtype':>5} {'bytes':>14} {'memory ms':>9} {'compute ms':>10}")
    for case in args.case:
        for shape in (linear_shapes if case == "linear" else shapes):
            for dtype in dtypes:
                nbytes = required_bytes(case, shape, dtype)
                compute = (f"{linear_flops(*shape) / tflops / 1e9:10.3f}" if case == "linear" and tflops
                           else f"{'-':>10}")
                print(f"  {case:17} {shape_text(shape):>20} {dtype_name(dtype):>5} {nbytes:14,d} "
                      f"{floor_ms(case, shape, dtype, args.floors):9.3f} {compute}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .bench.impls import IMPLEMENTATION_NAMES, unmatched_impl_filters
    from .bench.report import column_legend, format_table, format_warnings, write_reports
    from .bench.suite import (
        DTYPES,
        LINEAR_SHAPE_SETS,
        SHAPE_SETS,
        choose_cpu_threads,
        device_slug,
        run_suite,
    )

    device = check_device(args.device)
    unmatched = unmatched_impl_filters(args.impl or [])
    if unmatched:
        raise UsageError(f"--impl {' '.join(unmatched)} matches no implementation; names contain one of: "
                         f"{', '.join(IMPLEMENTATION_NAMES)}")
    positive_int("--repeats", args.repeats)
    positive_int("--threads", args.threads)
    positive_float("--rep-ms", args.rep_ms)
    positive_float("--floors", args.floors)
    positive_float("--floor-tflops", args.floor_tflops)
    preset = args.shape_set or ("gpu" if device.type == "cuda" else "cpu")
    shapes = _shapes(args.shape, "--shape", 2, "NxV") if args.shape else SHAPE_SETS[preset]
    linear_shapes = (_shapes(args.linear_shape, "--linear-shape", 3, "NxHxV") if args.linear_shape
                     else LINEAR_SHAPE_SETS[preset])
    if args.out_dir:
        writable_dir(args.out_dir, "--out-dir")
    dtype_names = args.dtype or (["bf16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"])
    dtypes = [DTYPES[d] for d in dtype_names]
    if args.floors:
        return _floors(args, shapes, linear_shapes, dtypes)
    if device.type == "cpu":
        threads, why = choose_cpu_threads(args.threads)
        # Children (the CPU memory measurement) inherit it through the environment.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        if not args.quiet:
            print(f"torch threads: {threads} ({why})")

    argv = args.argv if args.argv is not None else sys.argv[1:]
    command = "entropy-gpu " + " ".join(shlex.quote(a) for a in argv)
    name = args.name or f"{device_slug(device)}-{datetime.now(timezone.utc):%Y-%m-%d}"
    written: list[Path] = []

    def save(run) -> None:
        if args.out_dir:
            written[:] = write_reports(run, args.out_dir, name)

    run = run_suite(args.case, shapes, linear_shapes, dtypes, device, impl_filter=args.impl,
                    repeats=args.repeats, rep_ms=args.rep_ms, measure_memory=not args.no_memory,
                    seed=args.seed,
                    metadata={"command": command, "notes": list(args.note or [])}, on_progress=save,
                    log=(lambda msg: print(msg, flush=True)) if not args.quiet else None)
    save(run)
    print()
    print(format_table(run.results))
    print("\ncolumns:\n" + "\n".join(column_legend()))
    warnings = format_warnings(run)
    if warnings:
        print("\n" + warnings)
    for case, reason in run.skipped_cases.items():
        print(f"case {case} not run: {reason}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _shapes(texts: list[str], flag: str, rank: int, form: str) -> list[tuple[int, ...]]:
    from .bench.suite import parse_shape

    shapes = []
    for text in texts:
        try:
            shape = parse_shape(text)
        except ValueError:
            shape = None
        if shape is None or len(shape) != rank:
            raise UsageError(f"{flag} takes {form} with positive integers, e.g. "
                             f"{'8192x151936' if rank == 2 else '8192x4096x151936'}; got {text!r}")
        shapes.append(shape)
    return shapes


def cmd_grad_report(args: argparse.Namespace) -> int:
    from .analysis.grad_report import gsm8k_questions, run_grad_report

    device = check_device(args.device)
    for flag, value in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens),
                        ("--token-batch-size", args.token_batch_size)):
        positive_int(flag, value)
    positive_int("--threads", args.threads, minimum=0)
    positive_float("--temperature", args.temperature)
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    for flag, value in (("--samples-per-prompt", args.samples_per_prompt),
                        ("--directions-per-pass", args.directions_per_pass), *(("--ks", k) for k in args.ks),
                        *(("--last-layers", n) for n in args.last_layers)):
        positive_int(flag, value)
    writable_dir(args.out, "--out")
    if args.from_partial:  # a report from earlier runs' rows: no model needed
        from .analysis.grad_report import fidelity_report_from_partial, write_fidelity_report

        for path in args.from_partial:
            if not Path(path).is_file():
                raise UsageError(f"--from-partial: {path} is not a file")
        report = fidelity_report_from_partial(args.from_partial, model_name=args.model)
        for path in write_fidelity_report(report, args.out):
            print(f"wrote {path}")
        return 0
    check_model(args.model, args.allow_download)
    from .cpu_threads import use_cpu_threads

    threads_line = use_cpu_threads(args.threads, device)
    if threads_line and not args.quiet:
        print(threads_line)
    prompts = args.prompt or gsm8k_questions(args.prompts)
    if args.fidelity:
        from .analysis.models import load_model

        model, tokenizer = load_model(args.model, device=str(device), allow_download=args.allow_download)
        return _fidelity_report(args, model, tokenizer, prompts)
    # Resumable; data parallel under torchrun (rank 0 writes and reports).
    from .analysis.models import library_progress_bars

    with library_progress_bars(not args.quiet):
        report = run_grad_report(args.model, prompts, args.out, device=str(device),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed, param_patterns=args.params, norms=args.norms,
                                 token_batch_size=args.token_batch_size, progress=not args.quiet,
                                 overwrite=args.overwrite, allow_download=args.allow_download)
    if report is None:
        return 0
    print(f"wrote {args.out}/summary.json, tokens.jsonl, scatter.png, per_layer.png, per_response.png")
    config = report["config"]
    print(f"{config['n_tokens']} tokens, {config['n_responses']} responses; "
          f"across tokens, cheap vs exact total:")
    for measure, by_norm in report["pooled"].items():
        cells = "  ".join(f"{e[6:]}: r={c['pearson']} rho={c['spearman']}" for e, c in by_norm.items())
        print(f"  {measure:18} {cells}")
    return 0


def _fidelity_report(args: argparse.Namespace, model, tokenizer, prompts: list[str]) -> int:
    from .analysis.grad_report import fidelity_report, write_fidelity_report
    from .analysis.models import random_twin

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = fidelity_report(
        model, tokenizer, prompts, model_name=args.model, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, ks=args.ks,
        last_layers=args.last_layers, param_patterns=args.params,
        directions_per_pass=args.directions_per_pass, exact_norms=args.norms,
        twin=random_twin(model, args.seed) if args.twin or args.twin_only else None, twin_only=args.twin_only,
        partial=out / "partial.jsonl",
        progress=not args.quiet)
    report["config"]["command"] = "entropy-gpu " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    for path in write_fidelity_report(report, out):
        print(f"wrote {path}")
    print(Path(out / "fidelity.md").read_text())
    return 0


def common_options(has_model: bool = True) -> argparse.ArgumentParser:
    """Options every subcommand takes (``parents=`` of each subparser); ``has_model``: the
    command takes ``--model``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--allow-download", action="store_true",
                        help=(f"let --model name a model on the Hugging Face hub and download it "
                              f"(also: {ALLOW_DOWNLOAD_ENV}=1); without it nothing contacts a hub"
                              if has_model else
                              f"allow Hugging Face hub access (also: {ALLOW_DOWNLOAD_ENV}=1); this command "
                              f"uses only local files, and without it nothing contacts a hub"))
    return common


def build_parser() -> argparse.ArgumentParser:
    from .bench.impls import CASES

    parser = Parser(prog="entropy-gpu", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"entropy-gpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    common = [common_options()]
    no_model = [common_options(has_model=False)]
    demo = sub.add_parser("demo", parents=no_model,
                          help="token statistics and a small benchmark on this machine",
                          description="Token statistics on a random batch (checked against float64), a small "
                                      "benchmark table, and a short SIA run on the bundled SmolLM2.")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    demo.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    demo.add_argument("--out", help="write the benchmark run as JSON here")
    demo.add_argument("--no-sia", action="store_true", help="skip the short SIA run")
    add_threads_option(demo)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser(
        "bench", parents=no_model,
        help="time implementations side by side; print a table, write JSON, markdown and PNG",
        description="Time every available implementation (ours, eager and compiled PyTorch, TRL, verl, "
                    "Liger, "
                    "quack) on the same inputs, side by side, per case x shape x dtype. The report "
                    "explains its columns and flags noisy, quantised or too-small measurements.")
    bench.add_argument("--case", nargs="+", default=list(CASES), choices=CASES,
                       help="forward: entropy, log-prob, grad norm of given logits; forward_backward: "
                            "also the logits gradient; linear: the fused LM head (hidden x weight)")
    bench.add_argument("--shape-set", choices=["gpu", "cpu", "smoke"],
                       help="preset shapes (default: gpu on CUDA, cpu otherwise)")
    bench.add_argument("--shape", nargs="+", help="NxV shapes instead of the preset, e.g. 8192x151936")
    bench.add_argument("--linear-shape", nargs="+", help="NxHxV shapes for the fused LM head case")
    bench.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                       help="default: bf16 fp32 on CUDA, fp32 bf16 on CPU")
    bench.add_argument("--impl", nargs="+",
                       help="only implementations whose name contains one of these (case-insensitive), "
                            "e.g. entropy_gpu, eager, compile, trl, verl, liger, quack")
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    bench.add_argument("--repeats", type=int, default=7, help="CPU: timed calls per implementation")
    bench.add_argument("--rep-ms", type=float, default=200.0,
                       help="GPU: milliseconds of timed calls (do_bench)")
    bench.add_argument("--no-memory", action="store_true",
                       help="CPU: skip the fresh-process peak-memory runs")
    bench.add_argument("--threads", type=int,
                       help="CPU: torch threads (default: the cores left idle by the current load, "
                            "at least 1; "
                            "on an oversubscribed machine OpenMP threads wait on each other)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--out-dir", help="write <out-dir>/<name>.{json,md,png}, updated after every shape")
    bench.add_argument("--name", help="file name stem (default: <device>-<date>)")
    bench.add_argument("--note", action="append", help="a note recorded in the reports (repeatable)")
    bench.add_argument("--floors", type=float, metavar="GBPS",
                       help="print the memory floor (required bytes / GBPS) of each shape and exit")
    bench.add_argument("--floor-tflops", type=float, metavar="TFLOPS",
                       help="with --floors: also the compute floor of the fused LM head at this matmul rate")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(func=cmd_bench, argv=None)
    from .param_grad.model_parts import DEFAULT_PARAM_PATTERNS, NORMS

    grad = sub.add_parser("grad-report", parents=common,
                          help="exact parameter-gradient measure vs the cheap ones on sampled responses",
                          description="Sample responses, compute the exact per-token parameter-gradient "
                                      "measure and compare the cheap logit-space measures with it; writes "
                                      "summary.json, tokens.jsonl and PNG plots to --out.")
    grad.add_argument("--model", default="smollm2",
                      help="'smollm2' (bundled), a local model path, or a hub name in the local cache")
    grad.add_argument("--out", required=True, help="folder for summary.json, tokens.jsonl and PNG plots")
    grad.add_argument("--prompts", type=int, default=6, help="number of GSM8K test questions (first N)")
    grad.add_argument("--prompt", action="append", help="a prompt (repeatable); replaces the GSM8K questions")
    grad.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    grad.add_argument("--temperature", type=float, default=0.7, help="sampling and token_stats temperature")
    grad.add_argument("--seed", type=int, default=0, help="sampling seed (response i uses seed + i)")
    grad.add_argument("--params", nargs="+", default=list(DEFAULT_PARAM_PATTERNS),
                      help="fnmatch patterns over parameter names (default: q/k/v/o projections)")
    grad.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                      help="matrix norms per parameter")
    grad.add_argument("--token-batch-size", type=int, default=1, help="tokens per vmapped backward")
    grad.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    grad.add_argument("--threads", type=int,
                      help="torch CPU threads (default, or 0: the cores left idle by the current load, at "
                           "least 1; on an oversubscribed machine OpenMP threads wait on each other)")
    grad.add_argument("--quiet", action="store_true", help="no progress bars")
    grad.add_argument("--overwrite", action="store_true",
                      help="start over when --out holds records of a run with other arguments "
                           "(default: resume a run with the same arguments, refuse a different one)")
    fid = grad.add_argument_group("fidelity of the fast measures (--fidelity)")
    fid.add_argument("--fidelity", action="store_true",
                     help="compare the forward-mode estimate, same-position and last-layers candidates "
                          "and the logit-space measures (and the exact --norms, from the same exact "
                          "pass) with the exact Frobenius measure; writes fidelity.json/.md, frontier.png")
    fid.add_argument("--samples-per-prompt", type=int, default=4,
                     help="responses sampled per prompt (seeds --seed, --seed + 1, ...)")
    fid.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                     help="estimator directions (nested: one run of max(ks) directions)")
    fid.add_argument("--last-layers", type=int, nargs="+", default=[2],
                     help="exact on the last N layers only")
    fid.add_argument("--directions-per-pass", type=int, default=4,
                     help="forward-mode estimator: directions batched into one forward pass (more: "
                          "fewer passes, more memory; the estimate is the same)")
    fid.add_argument("--twin", action="store_true",
                     help="also measure a random-weight twin on the same responses")
    fid.add_argument("--from-partial", nargs="+", metavar="JSONL",
                     help="only write the report from the partial.jsonl files of earlier or parallel runs")
    fid.add_argument("--twin-only", action="store_true", help="measure only the random-weight twin (on the "
                                                                 "model's samples), e.g. in a parallel run")
    grad.set_defaults(func=cmd_grad_report)
    add_sia_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.argv = argv
    if not downloads_allowed(args.allow_download):
        go_offline()
    args.allow_download = downloads_allowed(args.allow_download)
    try:
        return args.func(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"entropy-gpu {args.command}: error: {exc}", file=sys.stderr)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"entropy-gpu {args.command}: error: {first} (--debug shows the traceback)", file=sys.stderr)
    except KeyboardInterrupt:
        # On a line of its own: a progress bar may hold the current one.
        resumable = args.command in RESUMABLE and not getattr(args, "fidelity", False)
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"\nentropy-gpu {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
