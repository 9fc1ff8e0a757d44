"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

The same cases, implementations and error checks as ``entropy-gpu bench``
(``entropy_gpu/bench/suite.py``), one benchmark per case x shape x dtype x
implementation, grouped per case, shape and dtype. Shapes are chosen per device
(``SHAPE_SETS``); environment variables narrow a run:

- ``BENCH_SMOKE=1``: tiny shapes, one torch thread, no torch.compile (its first
  compile takes ~30 s on 2 cores); CI runs this with ``--benchmark-disable`` to
  check that the benchmarks still run, not how fast.
- ``BENCH_SHAPES=8192x151936,128x151936`` / ``BENCH_LINEAR_SHAPES=NxHxV,...``
- ``BENCH_DTYPES=bf16,fp32``
- ``BENCH_IMPL=triton,eager``: implementations whose name contains one of these.

What is not installed or cannot run here is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from entropy_gpu.bench.impls import case_unavailable_reason, implementations_for
from entropy_gpu.bench.suite import (
    DTYPES,
    LINEAR_SHAPE_SETS,
    SHAPE_SETS,
    case_call,
    cpu_peak_extra_mib,
    dtype_name,
    errors_ok,
    make_inputs,
    max_errors,
    parse_shape,
    required_bytes,
)

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "smoke" if SMOKE else ("gpu" if DEVICE.type == "cuda" else "cpu")
if SMOKE:
    torch.set_num_threads(1)  # tiny shapes: threads only add spin-waiting on a shared machine


def _shapes(variable: str, default: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    text = os.environ.get(variable, "").strip()
    return [parse_shape(s) for s in text.split(",") if s.strip()] if text else default


SHAPES = _shapes("BENCH_SHAPES", SHAPE_SETS[PRESET])
LINEAR_SHAPES = _shapes("BENCH_LINEAR_SHAPES", LINEAR_SHAPE_SETS[PRESET])
DTYPE_NAMES = [d.strip() for d in os.environ.get(
    "BENCH_DTYPES", "bf16,fp32" if DEVICE.type == "cuda" else "fp32,bf16").split(",") if d.strip()]
IMPL_FILTER = [f.strip().lower() for f in os.environ.get("BENCH_IMPL", "").split(",") if f.strip()]


def case_params(case: str) -> list:
    """pytest params (shape, dtype, implementation) of ``case``; skipped ones carry the reason."""
    shapes = LINEAR_SHAPES if case == "linear" else SHAPES
    reason = case_unavailable_reason(case)
    if reason:
        return [pytest.param(None, None, None, id=f"{case}-unavailable",
                             marks=pytest.mark.skip(reason=reason))]
    impls, skipped = implementations_for(case, DEVICE)
    params = []
    for impl in impls:
        why = None
        if IMPL_FILTER and not any(f in impl.name.lower() for f in IMPL_FILTER):
            why = "not selected by BENCH_IMPL"
        elif SMOKE and impl.name.startswith("torch.compile"):
            why = "smoke run: torch.compile's first compile takes ~30 s on 2 cores"
        for shape in shapes:
            for dtype in DTYPE_NAMES:
                marks = [pytest.mark.skip(reason=why)] if why else []
                params.append(pytest.param(shape, dtype, impl, marks=marks,
                                           id=f"{'x'.join(map(str, shape))}-{dtype}-{impl.name}"))
    for s in skipped:
        params.append(pytest.param(None, None, None, id=f"{s.name}", marks=pytest.mark.skip(reason=s.reason)))
    return params


_INPUTS: dict = {}


def cached_inputs(case: str, shape: tuple[int, ...], dtype: str):
    """Inputs of the current (case, shape, dtype); only the latest set is kept (big shapes)."""
    key = (case, shape, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = make_inputs(case, shape, DTYPES[dtype], DEVICE)
    return _INPUTS[key]


def run_benchmark_case(benchmark, case: str, shape: tuple[int, ...], dtype: str, impl) -> None:
    """Time one implementation with pytest-benchmark and record errors, bytes and memory.

    Fails when one of our implementations is off against float64; a competitor's
    error is recorded in extra_info (``error_ok``) and shown by ``entropy-gpu bench``.
    """
    benchmark.group = f"{case} {'x'.join(map(str, shape))} {dtype}"
    inputs = cached_inputs(case, shape, dtype)
    call = case_call(case, impl.make(), inputs)
    outputs, grad = call()
    errors, nonfinite = max_errors(outputs, inputs, grad)
    del outputs, grad
    ok = errors_ok(errors, nonfinite)
    benchmark.extra_info.update(implementation=impl.name, source=impl.source, outputs=list(impl.outputs),
                                max_err=errors, nonfinite=nonfinite, error_ok=ok,
                                required_bytes=required_bytes(case, shape, DTYPES[dtype]))
    if DEVICE.type == "cuda":
        def target():
            call()
            torch.cuda.synchronize()
    else:
        target = call
    benchmark.pedantic(target, rounds=2 if SMOKE else 7, warmup_rounds=1, iterations=1)
    if DEVICE.type == "cpu" and not SMOKE and os.environ.get("BENCH_MEMORY", "1") == "1":
        benchmark.extra_info["peak_extra_mib"] = cpu_peak_extra_mib(case, impl.name, shape,
                                                                    dtype_name(DTYPES[dtype]))
    if impl.is_ours:
        assert ok, f"{impl.name} is off against float64: {errors}, non-finite {nonfinite}"
