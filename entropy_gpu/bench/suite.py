"""Benchmark harness: implementations of the same per-token statistics, timed side
by side in one process, with achieved bandwidth, peak memory and error against
float64.

Used by ``entropy-gpu bench`` / ``entropy-gpu demo`` and by ``benchmarks/``
(pytest-benchmark); the implementations live in ``impls.py`` and the
JSON / markdown / PNG writers in ``report.py``. Never used by tests to
assert speed.

Timing. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
call, median after warm-up); inputs that would fit in four L2s are rotated among
copies. CPU: ``time.perf_counter`` around each call after one warm-up call, median.
Inputs are random (never zeros).

Bytes. ``required_bytes`` is the least traffic a case needs (each input read once,
each output written once); achieved bandwidth is that over the median time, and
its fraction of the copy bandwidth measured in the same run is the roofline gauge.

Errors. On ``ERROR_SAMPLE_ROWS`` rows spread over the batch, every output is
compared with a float64 reference computed from the same (rounded) inputs:
``max |out - ref| / max(1, |ref|)``; for gradients the largest relative L2 error
of a row. Non-finite values are counted over all rows. Above the tolerance, or
any non-finite value, flags the row (``error_ok = False``): a fast wrong kernel
shows up in every table.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..cpu_threads import cpu_count, load_average
from .impls import (
    CASES,
    DIFFERENTIABLE_OUTPUTS,
    FORWARD_OUTPUTS,
    Implementation,
    implementations_for,
)

# Shapes: (N, V) for forward and forward_backward, (N, H, V) for the fused LM head.
SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    # Qwen-2.5, Llama-3, Llama-2/Mistral, Gemma-3 vocabularies; 128 rows as in SIA analysis.
    "gpu": [(8192, 151936), (16384, 128256), (4096, 32000), (1024, 262144), (128, 151936)],
    # Same vocabularies with fewer rows: each fits 24 GiB with eager's fp32 copies, and runs on 2 cores.
    # 2048 x 32000 fp32 is the CPU goal's reference point.
    "cpu": [(2048, 32000), (512, 151936), (512, 128256), (256, 262144), (128, 151936)],
    "smoke": [(64, 1000), (8, 4099)],
}
LINEAR_SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    # N x H x V: Qwen-2.5-7B, Llama-3-8B, Llama-2-7B, Gemma-3-4B heads.
    "gpu": [(8192, 3584, 151936), (16384, 4096, 128256), (4096, 4096, 32000), (1024, 2560, 262144)],
    # Qwen-2.5-0.5B and SmolLM2-135M heads.
    "cpu": [(512, 896, 151936), (1024, 576, 49152)],
    "smoke": [(16, 32, 1000)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ERROR_SAMPLE_ROWS = 64
OUTPUT_TOLERANCE = 1e-3    # max |out - ref| / max(1, |ref|)
GRADIENT_TOLERANCE = 1e-2  # max over rows of ||g - g_ref|| / ||g_ref|| (bf16 gradients round at ~4e-3)
ROTATE_BELOW_L2S = 4       # GPU: rotate input copies when one set is smaller than this many L2 caches


@dataclass
class Result:
    """One implementation on one case, shape and dtype."""

    case: str
    implementation: str
    source: str
    shape: list[int]
    dtype: str
    device: str
    outputs: list[str]
    status: str = "ok"                    # "ok", "error", "out of memory"
    note: str = ""
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    first_call_s: float | None = None     # includes compilation (Triton, inductor)
    required_bytes: int = 0
    gbytes_per_s: float | None = None     # required bytes / median time
    fraction_of_copy: float | None = None  # of the copy bandwidth measured in the same run
    tflops: float | None = None           # linear case: 2 N H V / median time
    peak_extra_mib: float | None = None
    max_err: dict[str, float] = field(default_factory=dict)
    nonfinite: int = 0
    error_ok: bool | None = None
    speedup_vs_eager: float | None = None  # eager median / this median, same run
    time_vs_ours: float | None = None      # this median / our median, same run
    is_ours: bool = False
    is_baseline: bool = False

    def row(self) -> dict:
        return asdict(self)

    @property
    def spread_pct(self) -> float | None:
        """(max - min) / median in percent."""
        if self.median_ms is None or self.min_ms is None or self.max_ms is None:
            return None
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms


@dataclass
class BenchRun:
    """What one benchmark run measured: metadata (device, date, commit, command,
    versions, measured copy bandwidth, notes), the results, and what was skipped
    and why."""

    metadata: dict
    results: list[Result] = field(default_factory=list)
    skipped_cases: dict[str, str] = field(default_factory=dict)            # case -> reason
    skipped_implementations: dict[str, list[dict]] = field(default_factory=dict)  # case -> [{name, reason}]

    def to_dict(self) -> dict:
        return {
            "metadata": self.metadata,
            "skipped_cases": self.skipped_cases,
            "skipped_implementations": self.skipped_implementations,
            "results": [r.row() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: dict) -> BenchRun:
        return cls(metadata=data["metadata"], results=[Result(**row) for row in data["results"]],
                   skipped_cases=data.get("skipped_cases", {}),
                   skipped_implementations=data.get("skipped_implementations", {}))


# --------------------------------------------------------------------------- bytes and flops


def itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def forward_bytes(n_rows: int, vocab: int, dtype: torch.dtype, n_outputs: int = len(FORWARD_OUTPUTS)) -> int:
    """Least traffic of the forward case: logits read once, int64 targets read,
    ``n_outputs`` fp32 vectors written."""
    return n_rows * vocab * itemsize(dtype) + n_rows * 8 + n_outputs * n_rows * 4


def forward_backward_bytes(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Least traffic of forward + backward: logits read once and their gradient
    written once (a kernel that writes the gradient during the forward reaches
    this; a separate backward reads the logits a second time), plus targets, two
    fp32 outputs and their two fp32 cotangents."""
    return 2 * n_rows * vocab * itemsize(dtype) + n_rows * 8 + 4 * n_rows * 4


def linear_bytes(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Least traffic of the fused LM head: hidden states and weight read once,
    targets read, three fp32 outputs written (the logits never reach memory)."""
    return (n_rows + vocab) * hidden * itemsize(dtype) + n_rows * 8 + 3 * n_rows * 4


def linear_flops(n_rows: int, hidden: int, vocab: int) -> int:
    return 2 * n_rows * hidden * vocab


def required_bytes(case: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    if case == "forward":
        return forward_bytes(*shape, dtype)
    if case == "forward_backward":
        return forward_backward_bytes(*shape, dtype)
    if case == "linear":
        return linear_bytes(*shape, dtype)
    raise ValueError(f"unknown case {case!r}")


def input_bytes(case: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a case holds before any implementation runs: what ``make_inputs`` allocates, plus
    the logits gradient a ``forward_backward`` call writes. An implementation needs more (its
    outputs and working memory): this is the least a shape needs, checked before allocating."""
    if case == "linear":
        n_rows, hidden, vocab = shape
        return (n_rows + vocab) * hidden * itemsize(dtype) + n_rows * 8
    n_rows, vocab = shape
    logits = n_rows * vocab * itemsize(dtype)
    if case == "forward":
        return logits + n_rows * 8
    if case == "forward_backward":
        return 2 * logits + n_rows * 8 + len(DIFFERENTIABLE_OUTPUTS) * n_rows * 4
    raise ValueError(f"unknown case {case!r}")


def available_memory_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for new tensors, where that number comes from) on ``device``: the GPU's free
    memory on CUDA, ``MemAvailable`` of /proc/meminfo on CPU; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except (OSError, ValueError, IndexError):
        pass
    return None


def floor_ms(case: str, shape: tuple[int, ...], dtype: torch.dtype, gbytes_per_s: float) -> float:
    """Memory floor: required bytes / bandwidth, in milliseconds."""
    return required_bytes(case, shape, dtype) / gbytes_per_s / 1e6


# --------------------------------------------------------------------------- inputs


@dataclass
class CaseInputs:
    """Random inputs of one case; ``tensors`` are the positional arguments."""

    case: str
    tensors: tuple[Tensor, ...]
    cotangents: dict[str, Tensor] = field(default_factory=dict)  # forward_backward only

    @property
    def targets(self) -> Tensor:
        return self.tensors[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def make_inputs(case: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> CaseInputs:
    """Random inputs, built in place (no freed temporary inflates a memory figure).

    Logits are N(0, 2) (a spread-out distribution; every column matters); the fused
    LM head gets hidden ~ N(0, 1) and weight ~ N(0, 2 / sqrt(H)), so that its
    logits have the same scale.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = shape[-1]
    if case == "linear":
        n_rows, hidden_size, vocab = shape
        hidden = torch.empty(n_rows, hidden_size, device=device, dtype=dtype).normal_(0, 1, generator=gen)
        weight = torch.empty(vocab, hidden_size, device=device, dtype=dtype).normal_(
            0, 2 / math.sqrt(hidden_size), generator=gen)
        targets = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
        return CaseInputs(case, (hidden, weight, targets))
    n_rows = shape[0]
    logits = torch.empty(n_rows, vocab, device=device, dtype=dtype).normal_(0, 2, generator=gen)
    targets = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
    cotangents = {}
    if case == "forward_backward":
        cotangents = {name: torch.randn(n_rows, device=device, generator=gen)
                      for name in DIFFERENTIABLE_OUTPUTS}
    return CaseInputs(case, (logits, targets), cotangents)


def case_call(case: str, fn: Callable,
              inputs: CaseInputs) -> Callable[[], tuple[dict[str, Tensor], Tensor | None]]:
    """One timed iteration of ``case``: returns (outputs, gradient of the logits or None).

    For forward_backward, the implementation gets its own leaf copy of the logits
    (Liger overwrites its input with the gradient) and the backward is of
    ``sum_k cotangent_k * output_k`` over the outputs it computes.
    """
    if case != "forward_backward":
        def call():
            return fn(*inputs.tensors), None
        return call
    logits, targets = inputs.tensors
    leaf = logits.detach().clone().requires_grad_(True)

    def call_backward():
        leaf.grad = None
        outputs = fn(leaf, targets)
        loss = sum((outputs[name].float() * inputs.cotangents[name]).sum() for name in outputs)
        loss.backward()
        return {name: value.detach() for name, value in outputs.items()}, leaf.grad
    return call_backward


# --------------------------------------------------------------------------- reference and errors


def reference_outputs(logits64: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """float64 entropy, target log-prob, nll_grad_norm and entropy_change of rows of logits (t = 1)."""
    logp = torch.log_softmax(logits64, -1)
    p = logp.exp()
    y = targets[:, None]
    entropy = -(p * logp).sum(-1)
    logprob = logp.gather(-1, y).squeeze(-1)
    # grad H . grad log p_y = sum_i -p_i (log p_i + H) (onehot_i - p_i)
    surprisal_dev = logp + entropy[:, None]
    entropy_change = (p * p * surprisal_dev).sum(-1) - logprob.exp() * (logprob + entropy)
    return {
        "entropy": entropy,
        "logprob": logprob,
        "nll_grad_norm": p.scatter_add(-1, y, -torch.ones_like(p[:, :1])).norm(dim=-1),
        "entropy_change": entropy_change,
    }


def sample_rows(n_rows: int, device: torch.device, count: int = ERROR_SAMPLE_ROWS) -> Tensor:
    """Indices of ``count`` rows spread over the batch (first and last included)."""
    return torch.linspace(0, n_rows - 1, min(n_rows, count), device=device).round().long().unique()


def max_errors(outputs: dict[str, Tensor], inputs: CaseInputs, grad: Tensor | None = None,
               rows: Tensor | None = None) -> tuple[dict[str, float], int]:
    """(max error per output on sampled rows vs float64, non-finite count over all rows).

    Outputs: ``max |out - ref| / max(1, |ref|)``. Gradient (key ``grad_logits``):
    largest ``||g - g_ref|| / ||g_ref||`` of a row.
    """
    targets = inputs.targets
    if rows is None:
        rows = sample_rows(targets.shape[0], targets.device)
    if inputs.case == "linear":
        hidden, weight, _ = inputs.tensors
        logits64 = hidden[rows].double() @ weight.double().t()
    else:
        logits64 = inputs.tensors[0][rows].double()
    y = targets[rows]
    errors: dict[str, float] = {}
    nonfinite = 0
    if grad is not None:
        leaf = logits64.clone().requires_grad_(True)
        ref = reference_outputs(leaf, y)
        loss = sum((ref[name] * inputs.cotangents[name][rows].double()).sum() for name in outputs)
        (ref_grad,) = torch.autograd.grad(loss, leaf)
        ref = {name: value.detach() for name, value in ref.items()}
        row_err = (grad[rows].double() - ref_grad).norm(dim=-1) / ref_grad.norm(dim=-1).clamp_min(1e-30)
        errors["grad_logits"] = float(row_err.max())
        nonfinite += int((~torch.isfinite(grad)).sum())
    else:
        ref = reference_outputs(logits64, y)
    for name, value in outputs.items():
        err = (value[rows].double() - ref[name]).abs() / ref[name].abs().clamp_min(1.0)
        errors[name] = float(err.max()) if torch.isfinite(err).all() else float("nan")
        nonfinite += int((~torch.isfinite(value)).sum())
    return errors, nonfinite


def errors_ok(errors: dict[str, float], nonfinite: int) -> bool:
    """Whether every error is within tolerance (NaN never is) and all values are finite."""
    if nonfinite:
        return False
    for name, value in errors.items():
        tolerance = GRADIENT_TOLERANCE if name == "grad_logits" else OUTPUT_TOLERANCE
        if not value <= tolerance:
            return False
    return True


# --------------------------------------------------------------------------- timing


def time_cpu(fn: Callable, repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` calls (perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda(fn: Callable, rep_ms: float = 200.0, warmup_ms: float = 50.0) -> list[float]:
    """Milliseconds of each call, CUDA events, L2 flushed before each (``do_bench``)."""
    import triton.testing

    torch.cuda.synchronize()
    return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Measured copy bandwidth (GB/s, bytes read + bytes written) on ``device``."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = statistics.median(time_cuda(lambda: dst.copy_(src), rep_ms=100))
    else:
        ms = statistics.median(time_cpu(lambda: dst.copy_(src), repeats))
    return 2 * nbytes / ms / 1e6


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


# --------------------------------------------------------------------------- memory


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


def _find_implementation(case: str, name: str, device: torch.device) -> Implementation:
    impls, _ = implementations_for(case, device)
    for impl in impls:
        if impl.name == name:
            return impl
    raise KeyError(f"no implementation {name!r} for case {case!r} on {device}")


# glibc returns a freed block to the system only if it was mmapped; a fixed threshold
# (which also switches off glibc's adaptive one) makes every large buffer mmapped,
# so one implementation's freed buffers neither hide nor inflate the next one's peak.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def _peak_child(case: str, names: list[str], shape: tuple[int, ...], dtype: str, seed: int) -> None:
    """Child process of ``cpu_peak_extra_mib``: prints one line per implementation,
    ``name<TAB>MiB``, the RSS growth of one call after a warm-up call."""
    device = torch.device("cpu")
    inputs = make_inputs(case, shape, DTYPES[dtype], device, seed)
    for name in names:
        try:
            call = case_call(case, _find_implementation(case, name, device).make(), inputs)
            call()  # warm-up: compilation and one-time buffers stay out of the figure
            print(f"{name}\t{rss_growth_mib(call)}", flush=True)
        except Exception as exc:  # not in the registry (a test's adapter), or it broke
            print(f"{name}\tNone\t{type(exc).__name__}", flush=True)
        call = None


def cpu_peak_extra_mib(case: str, names: str | list[str], shape: tuple[int, ...], dtype: str,
                       seed: int = 0) -> float | None | dict[str, float | None]:
    """Peak extra memory (MiB) of one call of each implementation in ``names`` on CPU,
    after a warm-up call, measured in a fresh process (no allocator cache of the
    parent's runs hides anything). A single name gives a float (or None), a list a
    dict; None where it could not be measured."""
    import os

    single = isinstance(names, str)
    wanted = [names] if single else list(names)
    code = (f"from entropy_gpu.bench import _peak_child; "
            f"_peak_child({case!r}, {wanted!r}, {tuple(shape)!r}, {dtype!r}, {seed})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **_CHILD_ENV})
    peaks: dict[str, float | None] = {name: None for name in wanted}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("\t")
        value = value.split("\t")[0]
        if name in peaks and value not in ("", "None"):
            try:
                peaks[name] = float(value)
            except ValueError:
                pass
    return peaks[names] if single else peaks


# --------------------------------------------------------------------------- running a case


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def _rotated(call_factory: Callable[[CaseInputs], Callable], inputs: CaseInputs, case: str, shape, dtype,
             device,
             seed: int) -> Callable:
    """On GPU, cycle through enough input copies that they cannot all sit in L2."""
    l2 = l2_cache_bytes(device)
    copies = 1 if not l2 else min(8, math.ceil(ROTATE_BELOW_L2S * l2 / max(1, inputs.nbytes())))
    if copies <= 1:
        return call_factory(inputs)
    calls = [call_factory(inputs)] + [call_factory(make_inputs(case, shape, dtype, device, seed + k))
                                      for k in range(1, copies)]
    state = {"next": 0}

    def call():
        k = state["next"]
        state["next"] = (k + 1) % len(calls)
        return calls[k]()
    return call


def run_case(case: str, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu", *,
             impls: list[Implementation] | None = None, repeats: int = 7, rep_ms: float = 200.0,
             copy_gbps: float | None = None, measure_memory: bool = True, seed: int = 0,
             log: Callable[[str], None] | None = None) -> list[Result]:
    """Run every implementation of ``case`` on the same random inputs; one Result each.

    An implementation that raises (or runs out of memory) gets a Result with that
    status and no times; the others still run.
    """
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if impls is None:
        impls, _ = implementations_for(case, device)
    inputs = make_inputs(case, shape, dtype, device, seed)
    nbytes = required_bytes(case, shape, dtype)
    results = []
    for impl in impls:
        result = Result(case=case, implementation=impl.name, source=impl.source, shape=list(shape),
                        dtype=dtype_name(dtype), device=str(device), outputs=list(impl.outputs),
                        note=impl.note, required_bytes=nbytes, is_ours=impl.is_ours,
                        is_baseline=impl.is_baseline)
        if log:
            log(f"  {case} {'x'.join(map(str, shape))} {result.dtype}: {impl.name}")
        try:
            _measure(result, impl, inputs, case, shape, dtype, device, repeats=repeats, rep_ms=rep_ms,
                     copy_gbps=copy_gbps, seed=seed)
        except torch.OutOfMemoryError:
            result.status = "out of memory"
            result.note = f"out of memory on {device}"
        except Exception as exc:  # a broken adapter must not end a one-shot GPU run
            result.status = "error"
            result.note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
    if device.type == "cpu" and measure_memory:
        ok = [r for r in results if r.status == "ok"]
        peaks = cpu_peak_extra_mib(case, [r.implementation for r in ok], shape, dtype_name(dtype), seed)
        for r in ok:
            r.peak_extra_mib = peaks[r.implementation]
    add_ratios(results)
    return results


def _measure(result: Result, impl: Implementation, inputs: CaseInputs, case: str, shape, dtype, device, *,
             repeats: int, rep_ms: float, copy_gbps: float | None, seed: int) -> None:
    start = time.perf_counter()
    fn = impl.make()
    call = case_call(case, fn, inputs)
    outputs, grad = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.first_call_s = time.perf_counter() - start
    result.max_err, result.nonfinite = max_errors(outputs, inputs, grad)
    result.error_ok = errors_ok(result.max_err, result.nonfinite)
    del outputs, grad
    if device.type == "cuda":
        timed = _rotated(lambda inp: case_call(case, fn, inp), inputs, case, shape, dtype, device, seed)
        times = time_cuda(timed, rep_ms=rep_ms)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize()
        result.peak_extra_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        times = time_cpu(call, repeats)
    result.times_ms = [round(t, 6) for t in times]
    result.median_ms = statistics.median(times)
    result.min_ms, result.max_ms = min(times), max(times)
    result.gbytes_per_s = result.required_bytes / result.median_ms / 1e6
    if case == "linear":  # compute-bound: TFLOP/s is the gauge, not bandwidth
        result.tflops = linear_flops(*shape) / result.median_ms / 1e9
    elif copy_gbps:
        result.fraction_of_copy = result.gbytes_per_s / copy_gbps


def add_ratios(results: list[Result]) -> None:
    """Speed-up over eager and time relative to ours, from medians of the same run."""
    timed = [r for r in results if r.median_ms]
    eager = next((r for r in timed if r.is_baseline), None)
    ours = next((r for r in timed if r.is_ours), None)
    for r in timed:
        r.speedup_vs_eager = eager.median_ms / r.median_ms if eager else None
        r.time_vs_ours = r.median_ms / ours.median_ms if ours else None


# --------------------------------------------------------------------------- whole runs


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8192x151936"`` -> (8192, 151936); ``"NxHxV"`` for the fused LM head."""
    try:
        shape = tuple(int(part) for part in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: expected NxV or NxHxV with integers, e.g. 8192x151936") from None
    if len(shape) not in (2, 3) or min(shape) <= 0:
        raise ValueError(f"shape {text!r}: expected NxV or NxHxV with positive integers")
    return shape


def git_commit(cwd: str | None = None) -> str | None:
    """HEAD's hash, with ``+dirty`` when tracked files have changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd,
                              check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu``, ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def environment_metadata(device: torch.device) -> dict:
    """Device, versions and timing method of this process, for a run's metadata."""
    import os
    from datetime import datetime, timezone

    import entropy_gpu

    from .impls import package_version

    versions = {"entropy-gpu": entropy_gpu.__version__}
    versions.update({name: package_version(name) for name in
                     ("torch", "triton", "transformers", "trl", "verl", "liger-kernel", "quack-kernels")})
    versions["python"] = sys.version.split()[0]
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
        timing = ("triton.testing.do_bench: CUDA events, L2 flushed before each call, median after warm-up; "
                  f"inputs rotated among copies when a set is under {ROTATE_BELOW_L2S} L2 caches")
    else:
        timing = "time.perf_counter around each call after one warm-up call; median"
    return {
        "device": device.type,
        "device_name": device_description(device),
        "device_slug": device_slug(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        # A tree copied to a GPU machine may have no .git: gpu_run.sh passes the hash.
        "commit": os.environ.get("ENTROPY_GPU_COMMIT") or git_commit(),
        "versions": versions,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_count": cpu_count(),
        "timing": timing,
        "error_sample_rows": ERROR_SAMPLE_ROWS,
        "load_average_at_start": load_average(),
        "notes": [],
    }


# --------------------------------------------------------------------------- honest timing on a noisy machine

NOISY_SPREAD_PCT = 50.0        # (max - min) / median above this: the samples disagree
QUANTUM_MS = 1.0               # scheduler ticks (HZ 1000/250/100) are multiples of 1 ms
QUANTUM_TOLERANCE_MS = 0.005   # perf_counter resolves ns: a real duration is rarely this close to a tick
SMALL_MEDIAN_MS = {"cpu": 1.0, "cuda": 0.02}   # below: call overhead, not the work, dominates
SMALL_BYTES = 16 * 2**20       # below: the data fit in caches; not what a real batch sees

TIMING_FLAGS = {
    "noisy": f"spread above {NOISY_SPREAD_PCT:g}%: the timed calls disagree (other load, frequency changes)",
    "quantised": "most timed calls are whole milliseconds: the process was descheduled and woken on "
                 "scheduler ticks, so the time is the machine's, not the kernel's",
    "small": "shape too small to mean anything: fixed per-call overhead or caches dominate; "
             "compare implementations at larger shapes",
}


def timing_flags(times_ms: list[float], *, required_bytes: int = 0, device: str = "cpu") -> list[str]:
    """Which of ``TIMING_FLAGS`` apply to one implementation's timed calls."""
    flags = []
    if len(times_ms) >= 2:
        median = statistics.median(times_ms)
        if median > 0 and 100.0 * (max(times_ms) - min(times_ms)) / median > NOISY_SPREAD_PCT:
            flags.append("noisy")
    if len(times_ms) >= 3:
        on_tick = [t for t in times_ms
                   if t >= QUANTUM_MS and abs(t - round(t / QUANTUM_MS) * QUANTUM_MS) <= QUANTUM_TOLERANCE_MS]
        if 2 * len(on_tick) > len(times_ms):
            flags.append("quantised")
    if times_ms:
        device_type = "cuda" if str(device).startswith("cuda") else "cpu"
        if statistics.median(times_ms) < SMALL_MEDIAN_MS[device_type] or 0 < required_bytes < SMALL_BYTES:
            flags.append("small")
    return flags


def contention_warnings(metadata: dict) -> list[str]:
    """Run-level warnings from the load averages, core and thread counts in ``metadata``.

    At the start the 1-minute load is other processes; at the end it includes ours
    (about ``threads``). Either way, more runnable threads than cores means contention.
    """
    cores, threads = metadata.get("cpu_count"), metadata.get("threads") or 1
    if not cores:
        return []
    checks = (("load_average_at_start", "at start", threads), ("load_average_at_end", "at end", 0))
    for key, when, ours in checks:
        load = metadata.get(key)
        if load and load[0] + ours > cores + 0.5:
            return [f"busy machine ({when}: 1-min load {load[0]:.1f} on {cores} cores, {threads} torch "
                    f"thread(s)): other processes compete for the CPU; times are inflated and noisy"]
    return []


def run_warnings(run: BenchRun) -> list[str]:
    """Everything a reader should know before trusting ``run``'s numbers."""
    warnings = contention_warnings(run.metadata) if run.metadata.get("device") == "cpu" else []
    timed = [r for r in run.results if r.times_ms]
    for flag in ("noisy", "quantised", "small"):
        hit = [r for r in timed if flag in timing_flags(r.times_ms, required_bytes=r.required_bytes,
                                                         device=r.device)]
        if hit:
            warnings.append(f"{len(hit)} of {len(timed)} rows {flag}: {TIMING_FLAGS[flag]}")
    return warnings


def run_suite(cases: list[str], shapes: list[tuple[int, ...]], linear_shapes: list[tuple[int, ...]],
              dtypes: list[torch.dtype], device: str | torch.device, *, impl_filter: list[str] | None = None,
              repeats: int = 7, rep_ms: float = 200.0, measure_memory: bool = True, seed: int = 0,
              metadata: dict | None = None, log: Callable[[str], None] | None = print,
              on_progress: Callable[[BenchRun], None] | None = None) -> BenchRun:
    """Every available case x shape x dtype, implementations side by side.

    ``impl_filter``: keep implementations whose name contains one of these
    substrings (case-insensitive). A case our API does not provide yet is recorded
    in ``skipped_cases``; ``on_progress`` is called after each shape and dtype (so
    a run cut short still leaves its results written).
    """
    from .impls import case_unavailable_reason

    device = torch.device(device)
    run = BenchRun(metadata={**environment_metadata(device), **(metadata or {})})
    run.metadata["copy_gbps"] = copy_gbps = copy_bandwidth_gbps(device)
    if log:
        log(f"device: {run.metadata['device_name']}; measured copy bandwidth {copy_gbps:.1f} GB/s")
    for case in cases:
        reason = case_unavailable_reason(case)
        if reason:
            run.skipped_cases[case] = reason
            if log:
                log(f"skipping case {case}: {reason}")
            continue
        impls, skipped = implementations_for(case, device)
        if impl_filter:
            wanted = [f.lower() for f in impl_filter]
            impls = [i for i in impls if any(w in i.name.lower() for w in wanted)]
        run.skipped_implementations[case] = [{"name": s.name, "reason": s.reason} for s in skipped]
        if log:
            for s in skipped:
                log(f"{case}: skipping {s.name}: {s.reason}")
        for shape in (linear_shapes if case == "linear" else shapes):
            for dtype in dtypes:
                run.results += run_case(case, shape, dtype, device, impls=impls, repeats=repeats,
                                        rep_ms=rep_ms, copy_gbps=copy_gbps, measure_memory=measure_memory,
                                        seed=seed, log=log)
                run.metadata["load_average_at_end"] = load_average()
                if on_progress:
                    on_progress(run)
    return run
