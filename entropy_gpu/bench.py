"""Benchmark harness: implementations of the same per-token statistics, timed side
by side in one process, with achieved bandwidth and error against float64.

Used by ``entropy-gpu bench`` / ``entropy-gpu demo`` and by ``benchmarks/``
(pytest-benchmark). Timing: CUDA events through ``triton.testing.do_bench``
(median) on GPU, ``time.perf_counter`` medians on CPU. Never used by tests to
assert speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from .stats import token_stats

# What every implementation computes: entropy, target log-prob, nll_grad_norm.
OUTPUTS = ("entropy", "logprob", "nll_grad_norm")


def eager_torch(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The plain eager PyTorch way: materialize log-probs and probs, then reduce."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grad = p.scatter_add(-1, targets.unsqueeze(-1), -torch.ones_like(lp).unsqueeze(-1))
    return ent, lp, grad.norm(dim=-1) / temperature


def ours(backend: str) -> Callable:
    def run(logits: Tensor, targets: Tensor, temperature: float = 1.0):
        out = token_stats(logits, targets, temperature=temperature, stats=OUTPUTS, backend=backend)
        return out.entropy, out.logprob, out.nll_grad_norm
    run.__name__ = f"entropy_gpu[{backend}]"
    return run


def implementations(device: torch.device) -> dict[str, Callable]:
    from .backend import triton_supports

    impls = {"entropy_gpu[torch]": ours("torch"), "eager torch": eager_torch}
    if device.type == "cuda" and triton_supports(device):
        impls = {"entropy_gpu[triton]": ours("triton"), **impls}
    return impls


@dataclass
class Result:
    name: str
    shape: tuple
    dtype: str
    device: str
    median_ms: float
    spread_ms: float          # (max - min) over repeats
    gbytes_per_s: float       # required bytes / time
    fraction_of_copy: float | None
    peak_extra_mib: float | None
    max_abs_err: dict

    def row(self) -> dict:
        return asdict(self)


def required_bytes(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """The floor: each logit read once, targets read, three fp32 outputs written."""
    itemsize = torch.finfo(dtype).bits // 8
    return n_rows * vocab * itemsize + n_rows * 8 + 3 * n_rows * 4


def _time_cpu(fn: Callable, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _time_cuda(fn: Callable, repeats: int) -> list[float]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    times = triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats * 10), return_mode="all")
    return list(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth in GB/s (read + write), GPU only."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = statistics.median(_time_cuda(lambda: dst.copy_(src), 20))
    return 2 * src.numel() * 2 / ms / 1e6


def max_errors(outputs, logits: Tensor, targets: Tensor, temperature: float, sample_rows: int = 64) -> dict:
    """Max |error| per output against float64 on a sample of rows (a fast wrong kernel shows)."""
    n = logits.shape[0]
    idx = torch.linspace(0, n - 1, min(n, sample_rows), device=logits.device).long()
    x = logits[idx].double() / temperature
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    y = targets[idx]
    ref = {
        "entropy": -(p * logp).sum(-1),
        "logprob": logp.gather(-1, y[:, None]).squeeze(-1),
        "nll_grad_norm": p.scatter_add(-1, y[:, None], -torch.ones_like(p[:, :1])).norm(dim=-1) / temperature,
    }
    return {k: float((o[idx].double() - ref[k]).abs().max()) for k, o in zip(OUTPUTS, outputs)}


def run_benchmark(n_rows: int, vocab: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  repeats: int = 5, temperature: float = 1.0, impls: dict[str, Callable] | None = None,
                  copy_gbps: float | None = None, seed: int = 0,
                  measure_cpu_memory: bool = True) -> list[Result]:
    """Time each implementation on the same random logits; returns one Result each."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Built in place, so no freed temporary inflates a CPU memory measurement.
    logits = torch.empty(n_rows, vocab, device=device, dtype=dtype).normal_(0, 2, generator=gen)
    targets = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
    impls = impls or implementations(device)
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    results = []
    for name, fn in impls.items():
        call = lambda: fn(logits, targets, temperature)  # noqa: E731
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            outputs = call()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            outputs = call()
            if measure_cpu_memory and name in implementations(device):
                peak = cpu_peak_extra_mib(name, n_rows, vocab, dtype)
        errors = max_errors(outputs, logits, targets, temperature)
        del outputs
        times = timer(call, repeats)
        med = statistics.median(times)
        gbps = required_bytes(n_rows, vocab, dtype) / med / 1e6
        results.append(Result(
            name=name, shape=(n_rows, vocab), dtype=str(dtype).replace("torch.", ""), device=str(device),
            median_ms=med, spread_ms=max(times) - min(times), gbytes_per_s=gbps,
            fraction_of_copy=(gbps / copy_gbps) if copy_gbps else None, peak_extra_mib=peak,
            max_abs_err=errors))
    return results


def format_table(results: list[Result]) -> str:
    baseline = {}
    for r in results:
        if r.name == "eager torch":
            baseline[(r.shape, r.dtype)] = r.median_ms
    lines = [f"{'implementation':22} {'shape':>15} {'dtype':>8} {'median ms':>10} {'GB/s':>8} "
             f"{'of copy':>7} {'vs eager':>8} {'peak MiB':>8} {'max err':>9}"]
    for r in results:
        base = baseline.get((r.shape, r.dtype))
        speedup = f"{base / r.median_ms:7.2f}x" if base else "       -"
        frac = f"{100 * r.fraction_of_copy:6.1f}%" if r.fraction_of_copy else "      -"
        shape = "x".join(map(str, r.shape))
        peak = f"{r.peak_extra_mib:8.1f}" if r.peak_extra_mib is not None else "       -"
        lines.append(f"{r.name:22} {shape:>15} {r.dtype:>8} {r.median_ms:10.3f} {r.gbytes_per_s:8.1f} "
                     f"{frac:>7} {speedup:>8} {peak} {max(r.max_abs_err.values()):9.1e}")
    return "\n".join(lines)



def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def rss_growth_mib(fn: Callable) -> float | None:
    """Peak resident-memory growth (MiB) during ``fn()``, or None off Linux.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``, value 5) and reads
    ``VmHWM``; torch's CPU allocator is invisible to tracemalloc. Memory the process
    already holds from earlier calls is not counted: use a fresh process
    (``cpu_peak_extra_mib``) for a clean figure.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mib("VmRSS")
        result = fn()
        peak = _proc_status_mib("VmHWM") - before
    except OSError:
        return None
    del result
    return max(0.0, peak)


def _peak_child(name: str, n_rows: int, vocab: int, dtype: str) -> None:
    logits = torch.empty(n_rows, vocab, dtype=getattr(torch, dtype)).normal_(0, 2)
    targets = torch.randint(0, vocab, (n_rows,))
    fn = implementations(torch.device("cpu"))[name]
    print(rss_growth_mib(lambda: fn(logits, targets, 1.0)))


def cpu_peak_extra_mib(name: str, n_rows: int, vocab: int, dtype: torch.dtype) -> float | None:
    """Peak extra memory (MiB) of one call of implementation ``name`` on CPU, measured
    in a fresh process so that no allocator cache from other calls hides it."""
    import subprocess
    import sys

    code = (f"from entropy_gpu.bench import _peak_child; "
            f"_peak_child({name!r}, {n_rows}, {vocab}, {str(dtype).replace('torch.', '')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    return float(last[0]) if last and last[0] != "None" else None
