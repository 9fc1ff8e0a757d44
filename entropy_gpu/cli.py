"""Command line: ``entropy-gpu demo | bench | sia | sia-bench``.

``demo`` is the Quickstart's main job on built-in defaults: token statistics on a
batch, checked against float64, a small benchmark table on whatever device
is present, and a short SIA run on the bundled SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .sia.cli import add_sia_commands

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import resolve_backend, token_stats
    from .bench import format_table, run_benchmark

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
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    copy_gbps = None
    if device.type == "cuda":
        from .bench import copy_bandwidth

        copy_gbps = copy_bandwidth(device)
        print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s")
    results = []
    for n, v in shapes:
        results += run_benchmark(n, v, dtype, device, repeats=args.repeats, copy_gbps=copy_gbps)
    print("entropy + logprob + nll_grad_norm:")
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([r.row() for r in results], indent=2))
        print(f"\nwrote {args.out}")
    if not args.no_sia:
        from .sia.cli import demo_sia

        print()
        demo_sia()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import copy_bandwidth, format_table, run_benchmark

    device = _device(args.device)
    copy_gbps = copy_bandwidth(device)
    results = []
    for shape in args.shape:
        n, v = (int(x) for x in shape.lower().split("x"))
        for dtype in args.dtype:
            results += run_benchmark(n, v, DTYPES[dtype], device, repeats=args.repeats, copy_gbps=copy_gbps)
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([r.row() for r in results], indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entropy-gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="token statistics and a small benchmark on this machine")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--out", help="write the benchmark rows as JSON here")
    demo.add_argument("--no-sia", action="store_true", help="skip the short SIA run")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="time implementations side by side")
    bench.add_argument("--shape", nargs="+", default=["2048x32000"], help="NxV, e.g. 8192x151936")
    bench.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    bench.add_argument("--device", default="auto")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--out", help="write results as JSON here")
    bench.set_defaults(func=cmd_bench)
    add_sia_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
