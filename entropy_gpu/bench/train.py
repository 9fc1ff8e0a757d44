"""Benchmarks of the training-step paths, side by side in one process:

- the fused LM head (``linear_token_stats``) against ``matmul`` + ``token_stats`` and
  against the matmul alone (time, peak extra memory);
- the logits backward (entropy + logprob): achieved bandwidth of one read and one
  write of the logits, against the measured copy bandwidth on GPU.

Run ``python -m entropy_gpu.bench.train --help``. Timing as in ``entropy_gpu.bench``
(CUDA events through ``triton.testing.do_bench`` on GPU; ``perf_counter`` on CPU, with
the implementations interleaved round-robin). Never used by tests to assert speed.
``entropy-gpu bench`` (entropy_gpu/bench/suite.py) runs the same paths against third-party
baselines as its ``forward_backward`` and ``linear`` cases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..linear import linear_token_stats
from ..stats import token_stats
from .suite import copy_bandwidth_gbps, rss_growth_mib, time_cuda

LM_HEAD_OUTPUTS = ("entropy", "logprob", "nll_grad_norm")


@dataclass
class TrainResult:
    name: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    spread_ms: float
    peak_extra_mib: float | None
    gbytes_per_s: float | None = None       # backward: (read + write) bytes / time
    fraction_of_copy: float | None = None   # backward: of the measured copy bandwidth
    max_abs_err: float | None = None        # against the float64 reference (sampled rows)


def time_side_by_side(calls: dict[str, Callable], device: torch.device,
                      repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call for each of ``calls``. On CPU the calls are interleaved
    round-robin (one call of each per round), so a change in machine load hits every
    implementation alike; on GPU each is timed with CUDA events."""
    if device.type == "cuda":
        return {name: time_cuda(fn) for name, fn in calls.items()}
    for fn in calls.values():
        fn()  # warm-up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


# ---------------------------------------------------------------------------- LM head

def lm_head_implementations(backend: str = "auto") -> dict[str, Callable]:
    """name -> fn(hidden, weight, targets) returning (entropy, logprob, nll_grad_norm), or
    the logits for the matmul-only baseline."""
    def fused(hidden, weight, targets):
        out = linear_token_stats(hidden, weight, targets, stats=LM_HEAD_OUTPUTS, backend=backend)
        return out.entropy, out.logprob, out.nll_grad_norm

    def materialized(hidden, weight, targets):
        out = token_stats(hidden @ weight.t(), targets, stats=LM_HEAD_OUTPUTS, backend=backend)
        return out.entropy, out.logprob, out.nll_grad_norm

    def matmul_only(hidden, weight, targets):
        return hidden @ weight.t()

    return {"fused linear_token_stats": fused, "matmul + token_stats": materialized,
            "matmul only": matmul_only}


def lm_head_inputs(n: int, h: int, v: int, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(n, h, device=device, dtype=dtype).normal_(0, 1, generator=gen)
    weight = torch.empty(v, h, device=device, dtype=dtype).normal_(0, 2 / h**0.5, generator=gen)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    return hidden, weight, targets


def lm_head_error(outputs, hidden: Tensor, weight: Tensor, targets: Tensor, sample_rows: int = 32) -> float:
    """Max |error| of (entropy, logprob, nll_grad_norm) against float64, on sampled rows."""
    idx = torch.linspace(0, hidden.shape[0] - 1, min(hidden.shape[0], sample_rows),
                         device=hidden.device).long()
    logp = torch.log_softmax(hidden[idx].double() @ weight.double().t(), -1)
    p = logp.exp()
    y = targets[idx]
    ref = (-(p * logp).sum(-1), logp.gather(1, y[:, None]).squeeze(1),
           p.scatter_add(1, y[:, None], -torch.ones_like(p[:, :1])).norm(dim=-1))
    return max(float((o[idx].double() - r).abs().max()) for o, r in zip(outputs, ref))


def _lm_head_peak_child(name: str, n: int, h: int, v: int, dtype: str, threads: int) -> None:
    torch.set_num_threads(threads)
    hidden, weight, targets = lm_head_inputs(n, h, v, getattr(torch, dtype), "cpu")
    fn = lm_head_implementations("torch")[name]
    fn(hidden[:8], weight[:1000], targets[:8] % 1000)  # warm up thread pools and lazy imports
    print(rss_growth_mib(lambda: fn(hidden, weight, targets)))


def lm_head_cpu_peak_mib(name: str, n: int, h: int, v: int, dtype: torch.dtype) -> float | None:
    """Peak extra resident memory (MiB) of one forward of ``name``, in a fresh process."""
    code = (f"from entropy_gpu.bench.train import _lm_head_peak_child; "
            f"_lm_head_peak_child({name!r}, {n}, {h}, {v}, {str(dtype).replace('torch.', '')!r}, "
            f"{torch.get_num_threads()})")
    # A fixed glibc mmap threshold: freed large blocks go back to the OS, so the
    # high-water mark is that of live allocations, not of allocator fragmentation
    # (which varied by 0-20 MiB from run to run here).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    last = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    return float(last[0]) if last and last[0] != "None" else None


def run_lm_head_benchmark(n: int, h: int, v: int, dtype: torch.dtype = torch.float32, device="cpu",
                          repeats: int = 5, measure_memory: bool = True) -> list[TrainResult]:
    """Time the fused head, matmul + token_stats and the matmul alone on the same inputs."""
    device = torch.device(device)
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    impls = lm_head_implementations()
    peaks, errors = {}, {}
    for name, fn in impls.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            outputs = fn(hidden, weight, targets)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            outputs = fn(hidden, weight, targets)
            peaks[name] = lm_head_cpu_peak_mib(name, n, h, v, dtype) if measure_memory else None
        errors[name] = lm_head_error(outputs, hidden, weight, targets) if name != "matmul only" else None
        del outputs
    times = time_side_by_side({name: (lambda fn=fn: fn(hidden, weight, targets)) for name,
                               fn in impls.items()},
                              device, repeats)
    return [TrainResult(name=name, shape=f"{n}x{h}x{v}", dtype=str(dtype).replace("torch.", ""),
                        device=str(device),
                        median_ms=statistics.median(times[name]),
                        spread_ms=max(times[name]) - min(times[name]),
                        peak_extra_mib=peaks[name], max_abs_err=errors[name])
            for name in impls]


# --------------------------------------------------------------------------- backward

def backward_implementations(device: torch.device) -> dict[str, Callable]:
    """name -> fn(logits, targets, grad_entropy, grad_logprob) -> gradient w.r.t. logits.

    The entropy_gpu entries time the backward alone: the forward's row state is
    computed once (``backward_setup``), as it is saved by the forward in training."""
    from ..backend import triton_supports

    graphs = {}

    def eager(logits, targets, ge, gl):
        """Eager autograd's backward alone: the forward graph is built once and kept."""
        key = (logits.data_ptr(), logits.shape)
        if key not in graphs:
            graphs.clear()
            z = logits.detach().requires_grad_(True)
            logp = torch.log_softmax(z.float(), -1)
            ent = -(logp.exp() * logp).sum(-1)
            lp = logp.gather(-1, targets[:, None]).squeeze(-1)
            graphs[key] = (z, (ent * ge).sum() + (lp * gl).sum())
        z, loss = graphs[key]
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        return g

    impls = {}
    backends = (["triton"] if device.type == "cuda" and triton_supports(device) else []) + ["torch"]
    for backend in backends:
        impls[f"entropy_gpu[{backend}] backward"] = _ours_backward(backend, inplace=False)
        impls[f"entropy_gpu[{backend}] backward, in place"] = _ours_backward(backend, inplace=True)
    impls["eager torch backward (log_softmax graph)"] = eager
    return impls


def backward_setup(logits: Tensor, targets: Tensor, ge: Tensor, gl: Tensor):
    """(params, target_cols) that the forward would save: the row state of the logits."""
    from ..backward import saved_backward_params

    return saved_backward_params(logits, targets, ge, gl, ignore_index=-100, backend="torch")


def _ours_backward(backend: str, inplace: bool) -> Callable:
    """The backward of ``token_stats`` alone (``backward.logits_backward``), from a saved state."""
    from ..backward import logits_backward

    cache = {}

    def run(logits, targets, ge, gl):
        key = (logits.data_ptr(), logits.shape)
        if key not in cache:
            cache.clear()
            cache[key] = backward_setup(logits, targets, ge, gl)
            # In place overwrites its input: give it a scratch copy that it may destroy
            # (each timed call then reads a gradient, the same number of bytes).
            cache["scratch"] = logits.clone()
        params, cols = cache[key]
        src = cache["scratch"] if inplace else logits
        return logits_backward(src, params, cols, inv_temperature=1.0, backend=backend, inplace=inplace)

    return run


def run_backward_benchmark(n: int, v: int, dtype: torch.dtype = torch.bfloat16, device="cpu",
                           repeats: int = 5,
                           copy_gbps: float | None = None, impls: dict[str, Callable] | None = None
                           ) -> list[TrainResult]:
    """Logits gradient of entropy + logprob: time, bytes moved (read + write of the logits)
    per second, and the fraction of the measured copy bandwidth."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(n, v, device=device, dtype=dtype).normal_(0, 2, generator=gen)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    ge = torch.randn(n, device=device, generator=gen)
    gl = torch.randn(n, device=device, generator=gen)
    itemsize = torch.finfo(dtype).bits // 8
    moved = 2 * n * v * itemsize  # one read and one write of every logit
    impls = impls or backward_implementations(device)
    errors, peaks = {}, {}
    sample = slice(0, min(n, 16))
    want = _reference_backward(logits[sample], targets[sample], ge[sample], gl[sample])
    for name, fn in impls.items():
        errors[name] = float((fn(logits, targets, ge, gl)[sample].double() - want).abs().max())
        peaks[name] = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn(logits, targets, ge, gl)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = time_side_by_side({name: (lambda fn=fn: fn(logits, targets, ge, gl)) for name,
                               fn in impls.items()},
                              device, repeats)
    results = []
    for name in impls:
        med = statistics.median(times[name])
        gbps = moved / med / 1e6
        results.append(TrainResult(name=name, shape=f"{n}x{v}", dtype=str(dtype).replace("torch.", ""),
                                   device=str(device), median_ms=med,
                                   spread_ms=max(times[name]) - min(times[name]),
                                   peak_extra_mib=peaks[name], gbytes_per_s=gbps,
                                   fraction_of_copy=gbps / copy_gbps if copy_gbps else None,
                                   max_abs_err=errors[name]))
    return results


def _reference_backward(logits, targets, ge, gl):
    z = logits.double().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    (g,) = torch.autograd.grad((ent * ge.double()).sum() + (lp * gl.double()).sum(), z)
    return g


def format_results(results: list[TrainResult]) -> str:
    lines = [f"{'implementation':40} {'shape':>18} {'dtype':>8} {'median ms':>10} {'spread':>8} "
             f"{'peak MiB':>9} {'GB/s':>8} {'of copy':>7} {'max err':>8}"]
    for r in results:
        peak = f"{r.peak_extra_mib:9.1f}" if r.peak_extra_mib is not None else "        -"
        gbps = f"{r.gbytes_per_s:8.1f}" if r.gbytes_per_s is not None else "       -"
        frac = f"{100 * r.fraction_of_copy:6.1f}%" if r.fraction_of_copy else "      -"
        err = f"{r.max_abs_err:8.1e}" if r.max_abs_err is not None else "       -"
        lines.append(f"{r.name:40} {r.shape:>18} {r.dtype:>8} {r.median_ms:10.2f} {r.spread_ms:8.2f} {peak} "
                     f"{gbps} {frac} {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entropy_gpu.bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-head", default=None, metavar="NxHxV",
                        help="fused LM head shape (default: 2048x512x32000 on CPU, 8192x4096x151936 on GPU)")
    parser.add_argument("--backward", default=None, metavar="NxV",
                        help="backward shape (default: 2048x32000 on CPU, 8192x151936 on GPU)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids OpenMP barrier stalls on a shared machine)")
    parser.add_argument("--skip", choices=["lm-head", "backward"], action="append", default=[])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if gpu else "fp32")]
    results = []
    if "lm-head" not in args.skip:
        shape = args.lm_head or ("8192x4096x151936" if gpu else "2048x512x32000")
        n, h, v = (int(x) for x in shape.split("x"))
        results += run_lm_head_benchmark(n, h, v, dtype, device, repeats=args.repeats)
    if "backward" not in args.skip:
        n, v = (int(x) for x in (args.backward or ("8192x151936" if gpu else "2048x32000")).split("x"))
        copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else None
        if copy_gbps:
            print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s")
        results += run_backward_benchmark(n, v, dtype, device, repeats=args.repeats, copy_gbps=copy_gbps)
    print(format_results(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
