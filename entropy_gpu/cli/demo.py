"""``entropy-gpu demo``: the Quickstart's main job on built-in defaults. Token statistics on a
random batch (checked against float64), a small benchmark table on whatever device is present,
and a short SIA run on the bundled SmolLM2. It spans the core, ``bench/`` and ``analysis/sia/``,
so it is the command line's own command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .support import add_threads_option, check_device, common_options, positive_int, writable_file


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", parents=[common_options(has_model=False)],
        help="token statistics and a small benchmark on this machine",
        description="Token statistics on a random batch (checked against float64), a small "
                    "benchmark table, and a short SIA run on the bundled SmolLM2.")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    demo.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    demo.add_argument("--out", help="write the benchmark run as JSON here")
    demo.add_argument("--no-sia", action="store_true", help="skip the short SIA run")
    add_threads_option(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .. import resolve_backend
    from ..cpu_threads import use_cpu_threads

    device = check_device(args.device)
    positive_int("--repeats", args.repeats)
    positive_int("--threads", args.threads)
    if args.out:
        writable_file(args.out, "--out")
    print(f"entropy-gpu demo on {device} (backend: {resolve_backend(device)})")
    threads_line = use_cpu_threads(args.threads, device)
    if threads_line:
        print(threads_line)
    print()
    _token_stats_demo(device)
    run = _benchmark_demo(device, args.repeats)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run.to_dict(), indent=1, default=str))
        print(f"\nwrote {args.out}")
    if not args.no_sia:
        from ..analysis.sia.cli import demo_sia

        print()
        demo_sia()
    return 0


def _token_stats_demo(device: torch.device) -> None:
    """Every statistic of a random batch at temperature 0.7, and the entropy's distance from float64."""
    from .. import token_stats

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


def _benchmark_demo(device: torch.device, repeats: int):
    """A small forward benchmark (ours against eager torch), printed as a table; returns the run."""
    from ..bench.report import column_legend, format_table, format_warnings
    from ..bench.suite import DTYPES, run_suite

    shapes = [(2048, 32000)] if device.type == "cpu" else [(4096, 32000), (8192, 151936)]
    dtype = DTYPES["fp32"] if device.type == "cpu" else DTYPES["bf16"]
    run = run_suite(["forward"], shapes, [], [dtype], device, impl_filter=["entropy_gpu", "eager torch"],
                    repeats=repeats, log=None)
    print(f"measured copy bandwidth: {run.metadata['copy_gbps']:.0f} GB/s")
    print("entropy + logprob + nll_grad_norm:")
    print(format_table(run.results))
    warnings = format_warnings(run)
    if warnings:
        print(warnings)
    print("columns:\n" + "\n".join(column_legend()))
    return run
