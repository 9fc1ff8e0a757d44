"""Benchmark reports: terminal table, JSON, markdown and a PNG plot.

``write_reports`` writes a ``BenchRun`` (``bench.py``) as
``<name>.json``, ``<name>.md`` and ``<name>.png`` side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .suite import (
    GRADIENT_TOLERANCE,
    OUTPUT_TOLERANCE,
    TIMING_FLAGS,
    BenchRun,
    Result,
    run_warnings,
    timing_flags,
)

OUTPUT_LETTERS = {"entropy": "H", "logprob": "L", "nll_grad_norm": "G", "entropy_change": "C"}
ERROR_DEFINITION = (
    f"max |out - ref| / max(1, |ref|) on sampled rows against float64 from the same rounded inputs "
    f"(tolerance {OUTPUT_TOLERANCE:g}); gradients: max over sampled rows of ||g - g_ref|| / ||g_ref|| "
    f"(tolerance {GRADIENT_TOLERANCE:g}); '!' marks a row above tolerance or with non-finite values"
)
OUTPUTS_LEGEND = ("outputs: H entropy, L target log-prob, G nll_grad_norm (||p - onehot||), "
                  "C entropy_change (grad H . grad log p_y)")


# --------------------------------------------------------------------------- cells


def shape_text(shape: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def outputs_text(outputs: list[str]) -> str:
    return "".join(OUTPUT_LETTERS.get(name, "?") for name in outputs)


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


def _time_cell(r: Result) -> str:
    if r.status != "ok":
        return r.status
    if r.median_ms < 10:
        return f"{r.median_ms:.3f}"
    return f"{r.median_ms:.1f}" if r.median_ms < 1000 else f"{r.median_ms:.0f}"


def _error_cell(r: Result) -> str:
    if not r.max_err:
        return "-"
    worst = max((v for v in r.max_err.values()), key=lambda v: (math.isnan(v), v))
    return ("!" if r.error_ok is False else "") + _num(worst, ".1e", "nan")


def _ratio(value: float | None) -> str:
    """``1.23x``; three significant digits so that a 1000x gap does not print as 0.00x."""
    if value is None:
        return "-"
    return (f"{value:.2f}" if 0.1 <= value < 100 else f"{value:.3g}") + "x"


def _flags_cell(r: Result) -> str:
    flags = timing_flags(r.times_ms, required_bytes=r.required_bytes, device=r.device) if r.times_ms else []
    return ",".join(flags) or "-"


def _row_cells(r: Result) -> list[str]:
    return [
        r.implementation,
        outputs_text(r.outputs),
        _time_cell(r),
        _num(r.spread_pct, ".0f") + ("%" if r.spread_pct is not None else ""),
        _num(r.gbytes_per_s, ".1f") if r.case != "linear" else _num(r.tflops, ".1f") + " TF/s",
        _num(None if r.fraction_of_copy is None else 100 * r.fraction_of_copy, ".1f")
        + ("%" if r.fraction_of_copy is not None else ""),
        _ratio(r.speedup_vs_eager),
        _ratio(r.time_vs_ours),
        _num(r.peak_extra_mib, ".0f"),
        _error_cell(r),
        _flags_cell(r),
    ]


COLUMNS = ["implementation", "out", "median ms", "spread", "GB/s", "of copy", "vs eager", "time/ours",
           "peak MiB", "max err", "flags"]
COLUMN_HELP = {
    "implementation": "what was timed (ours: entropy_gpu; baselines: eager/compiled torch, other libraries)",
    "out": "outputs the implementation computes: H entropy, L target log-prob, G nll_grad_norm, "
           "C entropy_change",
    "median ms": "median wall time of one call over the timed calls (after warm-up)",
    "spread": "(slowest - fastest) / median of the timed calls; large spreads mean a noisy measurement",
    "GB/s": "required bytes (inputs read once, outputs written once) / median time; TF/s for the LM head",
    "of copy": "GB/s as a fraction of the copy bandwidth measured in the same run (the roofline gauge)",
    "vs eager": "eager torch median / this median (above 1x: faster than eager)",
    "time/ours": "this median / our median (above 1x: slower than ours)",
    "peak MiB": "peak memory beyond the inputs (CPU: resident-set growth in a fresh process)",
    "max err": "largest error against float64 on sampled rows; '!' marks a row above tolerance",
    "flags": "noisy, quantised or small (explained below and in the warnings); '-' when none applies",
}


def column_legend() -> list[str]:
    """One line per column of ``format_table``."""
    return [f"{name:>14}: {text}" for name, text in COLUMN_HELP.items()] + \
           [f"{name:>14}: {text}" for name, text in TIMING_FLAGS.items()]


def format_warnings(run: BenchRun) -> str:
    """The run's warnings (contention, noisy / quantised / too-small rows), one per line."""
    return "\n".join(f"warning: {w}" for w in run_warnings(run))


def _groups(results: list[Result]) -> dict[tuple, list[Result]]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, tuple(r.shape), r.dtype), []).append(r)
    return groups


# --------------------------------------------------------------------------- terminal


def format_table(results: list[Result]) -> str:
    """Plain-text table, one block per (case, shape, dtype)."""
    lines = []
    for (case, shape, dtype), rows in _groups(results).items():
        cells = [COLUMNS] + [_row_cells(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        lines.append(f"{case} {shape_text(shape)} {dtype}")
        for c in cells:
            lines.append("  " + "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                                          for i in range(len(COLUMNS))))
        for r in rows:
            if r.status != "ok":
                lines.append(f"  {r.implementation}: {r.status}: {r.note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def summary_table(results: list[Result], case: str, dtype: str) -> list[str]:
    """Markdown: implementations x shapes, each cell ``median ms (speed-up vs eager)``."""
    rows = [r for r in results if r.case == case and r.dtype == dtype]
    if not rows:
        return []
    shapes = list(dict.fromkeys(tuple(r.shape) for r in rows))
    names = list(dict.fromkeys(r.implementation for r in rows))
    cell = {(r.implementation, tuple(r.shape)): r for r in rows}
    body = []
    for name in names:
        line = [name]
        for shape in shapes:
            r = cell.get((name, shape))
            if r is None:
                line.append("")
            elif r.status != "ok":
                line.append(r.status)
            else:
                text = _time_cell(r)
                if r.speedup_vs_eager is not None:
                    text += f" ({r.speedup_vs_eager:.2f}x)"
                if r.error_ok is False:
                    text += " !"
                line.append(text)
        body.append(line)
    return _md_table(["implementation"] + [shape_text(s) for s in shapes], body)


def markdown_report(run: BenchRun) -> str:
    """The whole run as markdown: metadata, summary per case and dtype, full tables."""
    m = run.metadata
    lines = [f"# entropy-gpu benchmark: {m.get('device_name', '?')} ({m.get('date', '?')})", ""]
    for key, label in [("device_name", "device"), ("date", "date (UTC)"), ("commit", "commit"),
                       ("command", "command"), ("versions", "versions"),
                       ("copy_gbps", "measured copy bandwidth"),
                       ("timing", "timing"), ("threads", "CPU threads"),
                       ("load_average_at_start", "load average (1, 5, 15 min) at start"),
                       ("load_average_at_end", "load average at end")]:
        if key in m and m[key] is not None:
            value = m[key]
            if key == "versions":
                value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
            elif key == "copy_gbps":
                value = f"{value:.1f} GB/s (read + write)"
            elif key.startswith("load_average"):
                value = ", ".join(f"{x:.2f}" for x in value)
            elif key in ("command", "commit"):
                value = f"`{value}`"
            lines.append(f"- {label}: {value}")
    for note in m.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", f"Errors: {ERROR_DEFINITION}.", f"{OUTPUTS_LEGEND}.", ""]
    warnings = run_warnings(run)
    if warnings:
        lines += ["**Read with care:**", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["Columns:", ""] + [f"- **{name}**: {text}" for name, text in COLUMN_HELP.items()]
    lines += [f"- flag **{name}**: {text}" for name, text in TIMING_FLAGS.items()] + [""]
    cases = list(dict.fromkeys(r.case for r in run.results))
    for case in cases:
        dtypes = list(dict.fromkeys(r.dtype for r in run.results if r.case == case))
        for dtype in dtypes:
            lines += [f"## {case}, {dtype}: median ms (speed-up vs eager torch)", ""]
            lines += summary_table(run.results, case, dtype) + [""]
    if run.skipped_cases:
        lines += ["## Cases not run", ""]
        lines += [f"- {case}: {reason}" for case, reason in run.skipped_cases.items()] + [""]
    if run.skipped_implementations:
        lines += ["## Implementations skipped", ""]
        for case, items in run.skipped_implementations.items():
            for item in items:
                lines.append(f"- {case}: {item['name']}: {item['reason']}")
        lines.append("")
    lines += ["## All measurements", ""]
    header = ["case", "shape", "dtype"] + COLUMNS
    body = [[r.case, shape_text(r.shape), r.dtype] + _row_cells(r) for r in run.results]
    lines += _md_table(header, body) + [""]
    notes = [(r.implementation, r.note) for r in run.results if r.note]
    if notes:
        lines += ["Implementation notes:", ""]
        lines += [f"- {name}: {note}" for name, note in dict(notes).items()] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- PNG


def plot_png(run: BenchRun, path: str | Path) -> bool:
    """Bar chart of achieved bandwidth (TFLOP/s for the fused LM head) per case and
    dtype, shapes on the x axis, with the measured copy bandwidth as a line.
    Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = list(dict.fromkeys((r.case, r.dtype) for r in run.results))
    if not panels:
        return False
    # constrained layout makes room for the legend outside the axes, clear of the copy line.
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.8 * len(panels)), squeeze=False,
                             layout="constrained")
    copy = run.metadata.get("copy_gbps")
    for ax, (case, dtype) in zip(axes[:, 0], panels):
        rows = [r for r in run.results if r.case == case and r.dtype == dtype]
        shapes = list(dict.fromkeys(tuple(r.shape) for r in rows))
        names = list(dict.fromkeys(r.implementation for r in rows))
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            xs, ys, bad, flags = [], [], [], []
            for i, shape in enumerate(shapes):
                r = next((r for r in rows if r.implementation == name and tuple(r.shape) == shape), None)
                value = None if r is None else (r.tflops if case == "linear" else r.gbytes_per_s)
                if value:
                    xs.append(i + (k - (len(names) - 1) / 2) * width)
                    ys.append(value)
                    bad.append(r.error_ok is False)
                    flags.append(_flags_cell(r))
            bars = ax.bar(xs, ys, width, label=name)
            for bar, is_bad, flag in zip(bars, bad, flags):
                if is_bad:
                    bar.set_hatch("xx")
                if flag != "-":  # the table's flags, on the bar they qualify
                    ax.annotate(flag, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", rotation=90, fontsize=7)
        if copy and case != "linear":
            ax.axhline(copy, color="black", linestyle="--", linewidth=1,
                       label=f"measured copy {copy:.0f} GB/s")
        ax.set_xticks(range(len(shapes)), [shape_text(s) for s in shapes])
        ax.set_xlabel("input shape (hidden N x H x vocabulary V)" if case == "linear"
                      else "input shape (rows N x vocabulary V)")
        ax.set_ylabel("TFLOP/s" if case == "linear" else "achieved GB/s")
        ax.set_yscale("log")
        ax.margins(y=0.25)  # room above the bars for the flags
        device_name = run.metadata.get("device_name", "")
        ax.set_title(f"{case}, {dtype} ({device_name}); hatched: error above tolerance; "
                     f"text on a bar: its timing flags (small, noisy, quantised)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(run: BenchRun, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<out_dir>/<name>.{json,md,png}``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{name}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(run.to_dict(), indent=1, default=str) + "\n")
    md_path.write_text(markdown_report(run))
    written = [json_path, md_path]
    if plot_png(run, png_path):
        written.append(png_path)
    return written


def load_run(path: str | Path) -> BenchRun:
    return BenchRun.from_dict(json.loads(Path(path).read_text()))

