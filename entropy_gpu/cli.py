"""Command line: ``entropy-gpu demo | bench | grad-report | sia | sia-bench``.

``demo`` is the Quickstart's main job on built-in defaults: token statistics on a
batch, checked against float64, a small benchmark table on whatever device
is present, and a short SIA run on the bundled SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from .bench.suite import DTYPES
from .analysis.sia.cli import add_sia_commands


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import resolve_backend, token_stats
    from .bench.suite import DTYPES, run_suite
    from .bench.report import format_table

    device = _device(args.device)
    backend = resolve_backend(device)
    print(f"entropy-gpu demo on {device} (backend: {backend})\n")
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
    from .bench.suite import dtype_name, floor_ms, linear_flops, required_bytes
    from .bench.report import shape_text

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

    from .bench.suite import DTYPES, LINEAR_SHAPE_SETS, SHAPE_SETS, device_slug, parse_shape, run_suite
    from .bench.report import format_table, write_reports

    device = _device(args.device)
    if args.threads:
        # Children (the CPU memory measurement) inherit it through the environment.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    preset = args.shape_set or ("gpu" if device.type == "cuda" else "cpu")
    shapes = [parse_shape(s) for s in args.shape] if args.shape else SHAPE_SETS[preset]
    linear_shapes = ([parse_shape(s) for s in args.linear_shape] if args.linear_shape
                     else LINEAR_SHAPE_SETS[preset])
    for shape in shapes:
        if len(shape) != 2:
            raise SystemExit(f"--shape takes NxV, got {'x'.join(map(str, shape))}")
    for shape in linear_shapes:
        if len(shape) != 3:
            raise SystemExit(f"--linear-shape takes NxHxV, got {'x'.join(map(str, shape))}")
    dtype_names = args.dtype or (["bf16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"])
    dtypes = [DTYPES[d] for d in dtype_names]
    if args.floors:
        return _floors(args, shapes, linear_shapes, dtypes)

    argv = args.argv if args.argv is not None else sys.argv[1:]
    command = "entropy-gpu " + " ".join(shlex.quote(a) for a in argv)
    name = args.name or f"{device_slug(device)}-{datetime.now(timezone.utc):%Y-%m-%d}"
    written: list[Path] = []

    def save(run) -> None:
        if args.out_dir:
            written[:] = write_reports(run, args.out_dir, name)

    run = run_suite(args.case, shapes, linear_shapes, dtypes, device, impl_filter=args.impl,
                    repeats=args.repeats, rep_ms=args.rep_ms, measure_memory=not args.no_memory, seed=args.seed,
                    metadata={"command": command, "notes": list(args.note or [])}, on_progress=save,
                    log=(lambda msg: print(msg, flush=True)) if not args.quiet else None)
    save(run)
    print()
    print(format_table(run.results))
    for case, reason in run.skipped_cases.items():
        print(f"case {case} not run: {reason}")
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_grad_report(args: argparse.Namespace) -> int:
    from .analysis.grad_report import gsm8k_questions, run_grad_report

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompt or gsm8k_questions(args.prompts)
    # Resumable; data parallel under torchrun (rank 0 writes and reports).
    try:
        report = run_grad_report(args.model, prompts, args.out, device=str(_device(args.device)),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                 param_patterns=args.params, norms=args.norms,
                                 token_batch_size=args.token_batch_size, progress=not args.quiet,
                                 overwrite=args.overwrite)
    except ValueError as exc:
        print(f"entropy-gpu grad-report: error: {exc}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    print(f"wrote {args.out}/summary.json, tokens.jsonl, scatter.png, per_layer.png, per_response.png")
    config = report["config"]
    print(f"{config['n_tokens']} tokens, {config['n_responses']} responses; across tokens, cheap vs exact total:")
    for measure, by_norm in report["pooled"].items():
        cells = "  ".join(f"{e[6:]}: r={c['pearson']} rho={c['spearman']}" for e, c in by_norm.items())
        print(f"  {measure:18} {cells}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench.impls import CASES

    parser = argparse.ArgumentParser(prog="entropy-gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="token statistics and a small benchmark on this machine")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--out", help="write the benchmark run as JSON here")
    demo.add_argument("--no-sia", action="store_true", help="skip the short SIA run")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser(
        "bench", help="time implementations side by side; print a table, write JSON, markdown and PNG",
        description="Time every available implementation (ours, eager and compiled PyTorch, TRL, verl, Liger, "
                    "quack) on the same inputs, side by side, per case x shape x dtype.")
    bench.add_argument("--case", nargs="+", default=list(CASES), choices=CASES,
                       help="forward; forward_backward and linear run once our API provides them")
    bench.add_argument("--shape-set", choices=["gpu", "cpu", "smoke"],
                       help="preset shapes (default: gpu on CUDA, cpu otherwise)")
    bench.add_argument("--shape", nargs="+", help="NxV shapes instead of the preset, e.g. 8192x151936")
    bench.add_argument("--linear-shape", nargs="+", help="NxHxV shapes for the fused LM head case")
    bench.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp32")
    bench.add_argument("--impl", nargs="+", help="only implementations whose name contains one of these")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--repeats", type=int, default=7, help="CPU: timed calls per implementation")
    bench.add_argument("--rep-ms", type=float, default=200.0, help="GPU: milliseconds of timed calls (do_bench)")
    bench.add_argument("--no-memory", action="store_true", help="CPU: skip the fresh-process peak-memory runs")
    bench.add_argument("--threads", type=int,
                       help="CPU: torch threads (default: torch's). On an oversubscribed machine 1 avoids "
                            "OpenMP threads waiting on each other")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out-dir", help="write <out-dir>/<name>.{json,md,png}, updated after every shape")
    bench.add_argument("--name", help="file name stem (default: <device>-<date>)")
    bench.add_argument("--note", action="append", help="a note recorded in the reports (repeatable)")
    bench.add_argument("--floors", type=float, metavar="GBPS",
                       help="print the memory floor (required bytes / GBPS) of each shape and exit")
    bench.add_argument("--floor-tflops", type=float, metavar="TFLOPS",
                       help="with --floors: also the compute floor of the fused LM head at this matmul rate")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(func=cmd_bench, argv=None)
    from .analysis.param_grad import DEFAULT_PARAM_PATTERNS, NORMS

    grad = sub.add_parser("grad-report", help="exact parameter-gradient measure vs the cheap ones on sampled responses")
    grad.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local model path")
    grad.add_argument("--out", required=True, help="folder for summary.json, tokens.jsonl and PNG plots")
    grad.add_argument("--prompts", type=int, default=6, help="number of GSM8K test questions (first N)")
    grad.add_argument("--prompt", action="append", help="a prompt (repeatable); replaces the GSM8K questions")
    grad.add_argument("--max-new-tokens", type=int, default=64)
    grad.add_argument("--temperature", type=float, default=0.7)
    grad.add_argument("--seed", type=int, default=0)
    grad.add_argument("--params", nargs="+", default=list(DEFAULT_PARAM_PATTERNS),
                      help="fnmatch patterns over parameter names (default: q/k/v/o projections)")
    grad.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    grad.add_argument("--token-batch-size", type=int, default=1, help="tokens per vmapped backward")
    grad.add_argument("--device", default="cpu")
    grad.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (0: torch's default; 1 is fastest on a busy shared CPU)")
    grad.add_argument("--quiet", action="store_true", help="no progress bars")
    grad.add_argument("--overwrite", action="store_true",
                      help="start over when --out holds records of a run with other arguments "
                           "(default: resume a run with the same arguments, refuse a different one)")
    grad.set_defaults(func=cmd_grad_report)
    add_sia_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
