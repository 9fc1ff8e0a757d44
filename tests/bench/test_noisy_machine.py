"""``entropy-gpu bench`` on a noisy machine: the detection of contention, noisy,
quantised and too-small measurements, on synthetic timing samples (never on real
timings: benchmarks are not timed tests), the thread choice, and a report that
explains every column."""

from __future__ import annotations

import random

import pytest

from entropy_gpu.bench.report import (
    COLUMN_HELP,
    COLUMNS,
    _ratio,
    column_legend,
    format_table,
    markdown_report,
)
from entropy_gpu.bench.suite import (
    SMALL_BYTES,
    TIMING_FLAGS,
    BenchRun,
    Result,
    contention_warnings,
    run_warnings,
    timing_flags,
)
from entropy_gpu.cpu_threads import choose_cpu_threads

BIG = 1 << 30  # bytes: well above the too-small threshold


def jittered(center: float, n: int = 7, rel: float = 0.03, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-rel, rel)) for _ in range(n)]


def test_steady_samples_raise_no_flag():
    assert timing_flags(jittered(12.3456), required_bytes=BIG) == []
    assert timing_flags(jittered(0.5), required_bytes=BIG, device="cuda") == []


def test_scheduler_tick_medians_are_quantised():
    # What a busy 2-core machine printed: whole milliseconds, again and again.
    ticks = [132.0, 100.0, 132.0, 48.0, 88.0, 132.0, 100.0]
    assert "quantised" in timing_flags(ticks, required_bytes=BIG)
    # Mostly ticks (more than half) is enough; a few ticks among real durations is not.
    assert "quantised" in timing_flags([100.0, 104.0, 96.0, 101.237, 99.871], required_bytes=BIG)
    assert "quantised" not in timing_flags([100.0, 101.237, 99.871, 100.512, 98.03], required_bytes=BIG)
    # Durations below a tick cannot be tick-quantised.
    assert "quantised" not in timing_flags([0.0, 0.0, 0.0], required_bytes=BIG, device="cuda")


def test_a_wide_spread_is_noisy():
    samples = jittered(10.0, rel=0.01) + [170.3]  # one call descheduled for 160 ms
    assert "noisy" in timing_flags(samples, required_bytes=BIG)
    assert "noisy" not in timing_flags(jittered(10.0, rel=0.2), required_bytes=BIG)  # spread < 50%


def test_small_shapes_are_flagged_by_time_or_bytes():
    assert "small" in timing_flags(jittered(0.2), required_bytes=BIG)                 # CPU: < 1 ms
    assert "small" not in timing_flags(jittered(0.2), required_bytes=BIG, device="cuda:0")
    assert "small" in timing_flags(jittered(0.01), required_bytes=BIG, device="cuda")  # GPU: < 20 us
    assert "small" in timing_flags(jittered(5.0), required_bytes=SMALL_BYTES - 1)       # fits in caches
    assert timing_flags([]) == []


@pytest.mark.parametrize("load,cores,default,expected", [
    (6.0, 2, 2, 1),     # oversubscribed: one thread
    (0.1, 8, 8, 8),     # idle: torch's default
    (2.2, 8, 8, 6),     # a few cores busy
    (0.0, 64, 16, 16),  # never more than torch's default
])
def test_threads_follow_the_idle_cores(load, cores, default, expected):
    threads, why = choose_cpu_threads(None, load_1min=load, cores=cores, default=default)
    assert threads == expected and f"{cores} cores" in why


def test_requested_threads_win():
    assert choose_cpu_threads(3, load_1min=50.0, cores=2, default=2) == (3, "--threads")


def test_contention_from_load_against_cores():
    busy = {"cpu_count": 2, "threads": 2, "load_average_at_start": [3.1, 2.0, 1.0]}
    assert "busy machine" in contention_warnings(busy)[0]
    quiet = {"cpu_count": 8, "threads": 4, "load_average_at_start": [0.3, 0.2, 0.1],
             "load_average_at_end": [4.1, 1.0, 0.5]}  # our own 4 threads at the end: fine
    assert contention_warnings(quiet) == []
    late = {**quiet, "load_average_at_end": [12.0, 3.0, 1.0]}
    assert "at end" in contention_warnings(late)[0]
    assert contention_warnings({"threads": 2}) == []  # no core count: no claim


def _result(name: str, times: list[float], **kw) -> Result:
    r = Result(case="forward", implementation=name, source="", shape=[4096, 32000], dtype="fp32",
               device="cpu",
               outputs=["entropy"], times_ms=times, median_ms=sorted(times)[len(times) // 2],
               min_ms=min(times), max_ms=max(times), required_bytes=BIG, **kw)
    return r


def test_run_warnings_count_flagged_rows_and_the_table_shows_flags():
    run = BenchRun(metadata={"device": "cpu", "cpu_count": 2, "threads": 2,
                             "load_average_at_start": [5.0, 4.0, 3.0]},
                   results=[_result("eager torch", [132.0, 100.0, 132.0, 48.0, 88.0], is_baseline=True),
                            _result("entropy_gpu", jittered(20.0), is_ours=True)])
    warnings = run_warnings(run)
    assert any("busy machine" in w for w in warnings)
    assert any(w.startswith("1 of 2 rows quantised") for w in warnings)
    assert any(w.startswith("1 of 2 rows noisy") for w in warnings)
    table = format_table(run.results)
    assert "flags" in table.splitlines()[1] and "noisy,quantised" in table
    md = markdown_report(run)
    assert "Read with care" in md and all(f"**{c}**" in md for c in COLUMNS)


def test_every_column_and_flag_is_explained():
    assert list(COLUMN_HELP) == COLUMNS
    legend = "\n".join(column_legend())
    assert all(f"{name}:" in legend for name in [*COLUMNS, *TIMING_FLAGS])


def test_ratios_keep_significant_digits():
    assert _ratio(0.0012) == "0.0012x" and _ratio(1.234) == "1.23x" and _ratio(1234.0) == "1.23e+03x"
    assert _ratio(None) == "-"
