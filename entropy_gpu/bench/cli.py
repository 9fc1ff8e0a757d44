"""``entropy-gpu bench`` (registered by ``entropy_gpu.cli``): time every available implementation
side by side and write the reports."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..cli.support import (
    UsageError,
    check_device,
    common_options,
    positive_float,
    positive_int,
    writable_dir,
)


def register(subparsers) -> None:
    from .impls import CASES
    from .suite import DTYPES

    bench = subparsers.add_parser(
        "bench", parents=[common_options(has_model=False)],
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
    _add_output_options(bench)
    bench.set_defaults(func=cmd_bench, argv=None)


def _add_output_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--out-dir", help="write <out-dir>/<name>.{json,md,png}, updated after every shape")
    bench.add_argument("--name", help="file name stem (default: <device>-<date>)")
    bench.add_argument("--note", action="append", help="a note recorded in the reports (repeatable)")
    bench.add_argument("--floors", type=float, metavar="GBPS",
                       help="print the memory floor (required bytes / GBPS) of each shape and exit")
    bench.add_argument("--floor-tflops", type=float, metavar="TFLOPS",
                       help="with --floors: also the compute floor of the fused LM head at this matmul rate")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")


def cmd_bench(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .report import column_legend, format_table, format_warnings, write_reports
    from .suite import device_slug, run_suite

    device = check_device(args.device)
    shapes, linear_shapes, dtypes = _checked_inputs(args, device)
    if args.floors:
        return _floors(args, shapes, linear_shapes, dtypes)
    if device.type == "cpu":
        _use_cpu_threads(args.threads, quiet=args.quiet)

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


def _checked_inputs(args: argparse.Namespace, device) -> tuple[list, list, list]:
    """Every check before work; the shapes, fused-LM-head shapes and dtypes to run."""
    from .impls import IMPLEMENTATION_NAMES, unmatched_impl_filters
    from .suite import DTYPES, LINEAR_SHAPE_SETS, SHAPE_SETS

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
    if not args.floors:  # --floors allocates nothing
        _check_memory(args, device, shapes, linear_shapes, dtypes)
    return shapes, linear_shapes, dtypes


def _check_memory(args: argparse.Namespace, device, shapes, linear_shapes, dtypes) -> None:
    """A shape whose inputs alone exceed the device's free memory is a user error, found
    before anything is allocated (not a "tried to allocate" traceback)."""
    from .report import shape_text
    from .suite import available_memory_bytes, dtype_name, input_bytes

    available = available_memory_bytes(device)
    if available is None:
        return
    free, source = available
    for case in args.case:
        flag = "--linear-shape" if case == "linear" else "--shape"
        for shape in (linear_shapes if case == "linear" else shapes):
            for dtype in dtypes:
                need = input_bytes(case, shape, dtype)
                if need > free:
                    raise UsageError(
                        f"{flag} {shape_text(shape)} ({case}, {dtype_name(dtype)}) needs "
                        f"{need / 1e9:,.1f} GB for its inputs alone, more than the "
                        f"{free / 1e9:,.1f} GB {source}; use a smaller shape")


def _use_cpu_threads(requested: int | None, quiet: bool) -> None:
    import torch

    from ..cpu_threads import choose_cpu_threads

    threads, why = choose_cpu_threads(requested)
    # Children (the CPU memory measurement) inherit it through the environment.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if not quiet:
        print(f"torch threads: {threads} ({why})")


def _floors(args: argparse.Namespace, shapes, linear_shapes, dtypes) -> int:
    from .report import shape_text
    from .suite import dtype_name, floor_ms, linear_flops, required_bytes

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


def _shapes(texts: list[str], flag: str, rank: int, form: str) -> list[tuple[int, ...]]:
    from .suite import parse_shape

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
