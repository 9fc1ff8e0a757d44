"""Token statistics on CPU when another process keeps a core busy (issue 20, item 3).

Times, side by side in one process, at 1 and at 2 (``--threads``) torch threads:

- ``entropy_gpu``: ``token_stats`` (entropy, logprob, nll_grad_norm; with ``--backward`` also
  the gradient of entropy + logprob), the torch backend with its row blocks as one parallel
  region (``entropy_gpu/_row_blocks.py``);
- ``entropy_gpu per-op threads``: the same blocked loop run as before the fix, in order, every
  small op its own OpenMP region (``_row_blocks.ROW_PARALLEL = False``);
- ``eager torch``: ``entropy_gpu.bench.impls.eager_forward`` (``eager_differentiable``).

interleaved (one call of each per round), under each condition: ``as found`` (whatever else
runs on the machine; the 1-minute load and the busiest other processes are recorded) and
``+1 spinner`` (a subprocess spinning on one core, started here and stopped by its pid, also
when this script is terminated). Writes JSON (date, commit, command, conditions, every
time)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/busy_cpu.py --out benchmarks/results/cpu-busy-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

import entropy_gpu
from entropy_gpu import _row_blocks
from entropy_gpu.bench.impls import eager_differentiable, eager_forward
from entropy_gpu.bench.suite import git_commit
from entropy_gpu.cpu_threads import cpu_count

FORWARD = ("entropy", "logprob", "nll_grad_norm")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _busiest_others(n: int = 3) -> list[str]:
    """The processes using the most CPU besides this one and its spinner (``ps``)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm", "--sort=-pcpu"], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out[1:n + 2] if str(os.getpid()) not in line.split()[:1]][:n]


def _time_interleaved(impls: dict, repeats: int, max_s: float) -> dict[str, list[float]]:
    """Timed calls of every implementation in rounds (one call of each per round, after one
    warm-up each), so a change of the machine's load during the run hits all of them alike.
    Stops after ``repeats`` rounds, or after 2 once ``max_s`` seconds have passed."""
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    start = time.perf_counter()
    for done in range(repeats):
        if done >= 2 and time.perf_counter() - start > max_s:
            break
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _impls(logits: torch.Tensor, targets: torch.Tensor, backward: bool):
    def ours() -> None:
        if backward:
            x = logits.detach().requires_grad_()
            out = entropy_gpu.token_stats(x, targets, stats=("entropy", "logprob"))
            (out.entropy.sum() + out.logprob.sum()).backward()
        else:
            entropy_gpu.token_stats(logits, targets, stats=FORWARD)

    def eager() -> None:
        if backward:
            x = logits.detach().requires_grad_()
            out = eager_differentiable(x, targets)
            (out["entropy"].sum() + out["logprob"].sum()).backward()
        else:
            eager_forward(logits, targets)

    def ours_per_op() -> None:
        _row_blocks.ROW_PARALLEL = False
        try:
            ours()
        finally:
            _row_blocks.ROW_PARALLEL = True

    return {"entropy_gpu": ours, "entropy_gpu per-op threads": ours_per_op, "eager torch": eager}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--conditions", nargs="+", default=["as found", "+1 spinner"],
                        choices=["as found", "+1 spinner"])
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed calls (after one warm-up)")
    parser.add_argument("--max-s", type=float, default=30.0, help="stop after 2 rounds past this many s")
    parser.add_argument("--note", action="append", default=[], help="recorded in the JSON")
    parser.add_argument("--out", help="write <out>.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally that stops the spinner

    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.rows, args.vocab).normal_(0, 2, generator=gen)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    impls = _impls(logits, targets, args.backward)
    conditions = []
    for condition in args.conditions:
        spinner = None
        if condition == "+1 spinner":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(2.0)
        try:
            cond = {"condition": condition, "load_at_start": _load(), "busiest_processes": _busiest_others(),
                    "cells": []}
            for threads in args.threads:
                torch.set_num_threads(threads)
                for name, times in _time_interleaved(impls, args.repeats, args.max_s).items():
                    cell = {"impl": name, "threads": threads, "median_ms": round(median(times), 1),
                            "times_ms": [round(t, 1) for t in times]}
                    cond["cells"].append(cell)
                    print(f"{condition:11} threads {threads}  {name:27} median {cell['median_ms']:8.1f} ms  "
                          f"(min {min(times):.1f}, max {max(times):.1f}, n {len(times)})", flush=True)
            cond["load_at_end"] = _load()
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        conditions.append(cond)
    result = {
        "what": ("forward + backward: token_stats entropy + logprob, then backward" if args.backward
                 else "forward: token_stats entropy, logprob, nll_grad_norm"),
        "shape": [args.rows, args.vocab], "dtype": "fp32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(str(Path(__file__).resolve().parent)),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "cpu_count": cpu_count(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "notes": args.note, "conditions": conditions,
    }
    if args.out:
        path = Path(args.out).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
