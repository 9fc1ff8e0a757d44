"""The bench PNG a reader understands (issue 20, item 7): an x label, a legend clear of the
data, flagged points marked. (The grad-report PNGs: tests/analysis/test_report_plots.py.)"""

from __future__ import annotations

import numpy as np

from entropy_gpu.bench.report import plot_png
from entropy_gpu.bench.suite import BenchRun, Result


def _result(name, shape, times, gbps, ok=True):
    return Result(case="forward", implementation=name, source="", shape=list(shape), dtype="fp32",
                  device="cpu", outputs=["entropy"], median_ms=float(np.median(times)), times_ms=times,
                  gbytes_per_s=gbps,
                  required_bytes=10**9, error_ok=ok)


def test_bench_png_has_an_x_label_a_legend_outside_and_flags_on_bars(tmp_path, saved_figures):
    run = BenchRun(metadata={"device_name": "test cpu", "copy_gbps": 10.0})
    run.results = [_result("ours", (2048, 32000), [100.0, 101.0, 102.0], 5.0),
                   _result("eager torch", (2048, 32000), [100.0, 300.0, 200.0], 2.0),  # noisy
                   _result("ours", (8, 100), [0.01, 0.01, 0.01], 0.1)]  # small
    assert plot_png(run, tmp_path / "b.png")
    ax = saved_figures[0].axes[0]
    assert ax.get_xlabel().startswith("input shape")
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # outside the axes, off the copy line
    texts = [t.get_text() for t in ax.texts]
    assert any("noisy" in t for t in texts) and any("small" in t for t in texts), texts
