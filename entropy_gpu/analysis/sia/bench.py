"""One pass per trace vs naive re-encoding: wall time and tokens processed, side by
side in one process (``entropy-gpu sia-bench``; ``benchmarks/test_sia_cpu.py``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from .curve import SIAConfig, analyze_traces
from .data import Trace
from .segment import segment_trace


def traces_with_steps(traces: list[Trace], tokenizer, config: SIAConfig, min_steps: int) -> list[Trace]:
    """The traces that ``config``'s segmentation cuts into at least ``min_steps`` steps."""
    keep = []
    for t in traces:
        seg = segment_trace(t.text, tokenizer, config.segmentation, pattern=config.pattern,
                            every=config.every)
        if seg.num_steps >= min_steps:
            keep.append(t)
    return keep


def bench_one_pass(model, tokenizer, traces: list[Trace], config: SIAConfig, repeats: int = 3) -> dict:
    """Time ``analyze_traces`` with the packed (one-pass) and the naive method on the
    same traces; median wall time over ``repeats``, tokens run through the model,
    forward passes, and the largest difference between the two methods' curves."""
    if not traces:
        raise ValueError("no traces to benchmark (lower min_steps or raise the limit)")
    configs = {method: replace(config, method=method) for method in ("packed", "naive")}
    for cfg in configs.values():
        analyze_traces(model, tokenizer, traces[:1], cfg, progress=False)  # warm-up
    times: dict[str, list[float]] = {method: [] for method in configs}
    curves = {}
    for _ in range(repeats):  # interleaved, so a change in machine load hits both methods
        for method, cfg in configs.items():
            t0 = time.perf_counter()
            curves[method] = analyze_traces(model, tokenizer, traces, cfg, progress=False)
            times[method].append(time.perf_counter() - t0)
    results = {method: {
        "seconds": statistics.median(times[method]),
        "tokens_processed": sum(c.tokens_processed for c in curves[method]),
        "forward_passes": sum(c.forward_passes for c in curves[method]),
    } for method in configs}
    diffs = {field: max(abs(a - b) for cp, cn in zip(curves["packed"], curves["naive"])
                        for a, b in zip(getattr(cp, field), getattr(cn, field)))
             for field in ("entropy", "answer_logprob")}
    steps = [c.num_steps for c in curves["packed"]]
    return {
        "traces": len(traces), "estimator": config.estimator, "segmentation": config.segmentation,
        "steps_min": min(steps), "steps_mean": statistics.mean(steps), "steps_max": max(steps),
        "repeats": repeats, "packed": results["packed"], "naive": results["naive"],
        "speedup": results["naive"]["seconds"] / results["packed"]["seconds"],
        "token_ratio": results["naive"]["tokens_processed"] / results["packed"]["tokens_processed"],
        "max_abs_diff": diffs,
    }


def format_bench(result: dict) -> str:
    lines = [f"{result['traces']} traces, K = {result['steps_min']}..{result['steps_max']} "
             f"(mean {result['steps_mean']:.1f}), estimator {result['estimator']}, "
             f"median of {result['repeats']}",
             f"{'method':8} {'wall s':>9} {'tokens':>9} {'forwards':>9}"]
    for method in ("packed", "naive"):
        r = result[method]
        lines.append(f"{method:8} {r['seconds']:9.2f} {r['tokens_processed']:9d} {r['forward_passes']:9d}")
    lines.append(f"speedup {result['speedup']:.1f}x (tokens {result['token_ratio']:.1f}x); "
                 "max |packed - naive|: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff"].items()))
    return "\n".join(lines)
