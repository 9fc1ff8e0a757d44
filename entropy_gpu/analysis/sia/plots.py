"""PNG plots of SIA results (matplotlib's Agg canvas; pyplot's global state is not used)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..intervals import MIN_BOOTSTRAP_N, interval_text
from .signatures import SIGNATURES, auroc_with_interval

PANELS = (("entropy", "answer entropy H_k (nats)"), ("answer_logprob", "log p(true answer) after prefix k"))
BAND_NOTE = f"shaded: 95% bootstrap interval of the mean (from {MIN_BOOTSTRAP_N} traces)"
# Readable titles and x-axis labels of the signatures (keys of SIGNATURES).
SIGNATURE_TEXT = {
    "final_entropy": ("Final answer entropy", "H_K after the whole trace (nats)"),
    "slope": ("Entropy slope", "least-squares slope of H_k over k/K (nats)"),
    "frac_non_increasing": ("Steps that do not raise entropy", "fraction of steps with H_k <= H_(k-1)"),
    "largest_spike": ("Largest entropy rise", "max_k (H_k - H_(k-1)), 0 if none (nats)"),
    "fano_bound": ("Fano bound on the error", "lower bound on P(wrong answer) from H_K"),
}
COUNT_LABEL = "traces (count)"  # histograms always show counts: densities of a few values reach thousands
GROUP_STYLE = {"all": ("tab:blue", "all traces"), "correct": ("tab:green", "correct"),
               "incorrect": ("tab:red", "incorrect"), "unjudged": ("tab:gray", "unjudged")}
HIST_ALPHA = 0.35  # overlapping bars of two groups stay readable; each group also gets an outline
# A curve's y-axis spans at least this (nats, log-prob): a drift of 0.0004 nats looks flat,
# not like a trend, and tick labels never need an offset ("+1.068e1").
MIN_Y_SPAN = 0.1


def _figure(ncols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _band(ax, grid, stats: dict, color: str, label: str) -> None:
    ax.plot(grid, stats["mean"], color=color, label=label)
    lo, hi = (np.array([np.nan if v is None else v for v in stats[k]], dtype=float) for k in ("lo", "hi"))
    if np.isfinite(lo).any():  # no band where too few traces allow one (analysis/intervals.py)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)


def plain_ticks(ax, min_y_span: float = 0.0) -> None:
    """Tick labels without offset or scientific notation; a y-range of at least ``min_y_span``."""
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    if min_y_span:
        lo, hi = ax.get_ylim()
        if hi - lo < min_y_span:
            mid = (lo + hi) / 2
            ax.set_ylim(mid - min_y_span / 2, mid + min_y_span / 2)


def _position_axis(ax, ylabel: str) -> None:
    plain_ticks(ax, MIN_Y_SPAN)
    ax.set_xlabel("position in the trace k / K (0: question only, 1: whole trace)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)


def _save(fig, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_curves(summary: dict, path: str | Path, title: str = "") -> Path:
    """Mean ``H_k`` and ``log p(true answer)_k`` against normalized position ``k / K``
    with 95% bootstrap bands: correct vs incorrect when both exist, else all traces."""
    curves = summary["curves"]
    grid = np.asarray(curves["grid"])
    groups = ["correct", "incorrect"] if summary["n_correct"] and summary["n_incorrect"] else ["all"]
    if groups != ["all"] and "unjudged" in curves:  # every trace the title counts is drawn
        groups.append("unjudged")
    fig, axes = _figure(2)
    for ax, (field, ylabel) in zip(axes, PANELS):
        for group in groups:
            entry = curves.get(group, {})
            if field in entry:
                color, label = GROUP_STYLE[group]
                _band(ax, grid, entry[field], color, f"{label} (n={entry['n']})")
        _position_axis(ax, ylabel)
    return _save(fig, path, title)


def _signature_groups(records: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """(groups to plot, traces of known correctness): correct / incorrect (and unjudged,
    so that every trace is drawn), or all when none is judged."""
    known = [r for r in records if r.get("correct") is not None]
    if not known:
        return {"all": records}, known
    groups = {"correct": [r for r in known if r["correct"]],
              "incorrect": [r for r in known if not r["correct"]]}
    if len(known) < len(records):
        groups["unjudged"] = [r for r in records if r.get("correct") is None]
    return groups, known


def signature_panels(records: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """What each ``signatures.png`` panel shows: per signature, its ``title``,
    ``xlabel``, ``ylabel`` (trace counts), the ``values`` per group and the AUROC
    ``note`` (or why there is none)."""
    groups, known = _signature_groups(records)
    both = all(groups.get(g) for g in ("correct", "incorrect"))
    panels = {}
    for name, direction in SIGNATURES.items():
        values = {g: [r["signatures"][name] for r in rs if r["signatures"][name] is not None]
                  for g, rs in groups.items()}
        title, xlabel = SIGNATURE_TEXT.get(name, (name, name))
        if both:
            scores = [math.nan if r["signatures"][name] is None else r["signatures"][name] for r in known]
            a = auroc_with_interval(scores, [bool(r["correct"]) for r in known], direction,
                                    n_boot=n_boot, seed=seed)
            note = (f"AUROC {a['auroc']:.2f} {interval_text(a['lo'], a['hi'])}\n"
                    f"1 = {direction} on correct, 0.5 = chance"
                    if math.isfinite(a["auroc"]) else "AUROC undefined: no values in one class")
        elif known:
            note = (f"no AUROC: all {len(known)} traces {'correct' if groups['correct'] else 'incorrect'}\n"
                    f"(it needs correct and incorrect traces)")
        else:
            note = "no AUROC: correctness unknown"
        panels[name] = {"title": title, "xlabel": xlabel, "ylabel": COUNT_LABEL, "values": values,
                        "note": note}
    return panels


def plot_signatures(records: list[dict], path: str | Path, title: str = "", n_boot: int = 1000,
                    seed: int = 0) -> Path:
    """Histograms (trace counts) of each signature, correct vs incorrect (and unjudged), or
    all when correctness is unknown: translucent bars with an outline per group, so where
    two groups overlap both stay visible, and a legend entry for the overlap. The AUROC
    for correctness on each panel when both classes exist, a note saying why not otherwise."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    panels = signature_panels(records, n_boot=n_boot, seed=seed)
    fig, axes = _figure(len(panels), width=3.4, height=3.4)
    for ax, panel in zip(axes, panels.values()):
        every = [v for vs in panel["values"].values() for v in vs]
        bins = np.histogram_bin_edges(every, bins=min(15, max(5, len(every) // 2))) if every else 10
        drawn, counts = [], []
        for group, vs in panel["values"].items():
            if vs:
                color, label = GROUP_STYLE[group]
                n, _, _ = ax.hist(vs, bins=bins, alpha=HIST_ALPHA, color=color,
                                  label=f"{label} (n={len(vs)})")
                ax.hist(vs, bins=bins, histtype="step", color=color, linewidth=1.2)
                drawn.append(color)
                counts.append(np.asarray(n) > 0)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel["xlabel"], fontsize=7)
        ax.set_ylabel(panel["ylabel"], fontsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
        plain_ticks(ax)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.45)  # room above the bars for the note and the legend
        ax.text(0.02, 0.98, panel["note"], transform=ax.transAxes, fontsize=6.5, va="top")
        if every:
            handles, labels = ax.get_legend_handles_labels()
            if len(counts) >= 2 and np.any(np.sum(counts, axis=0) >= 2):
                # What two translucent bars on top of each other look like (on white).
                mixed = np.ones(3)
                for color in drawn[:2]:
                    mixed = HIST_ALPHA * np.asarray(to_rgb(color)) + (1 - HIST_ALPHA) * mixed
                handles.append(Patch(facecolor=mixed, edgecolor="none"))
                labels.append("overlap")
            ax.legend(handles, labels, fontsize=6.5, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no values (K = 0 or undefined)", transform=ax.transAxes, ha="center",
                    fontsize=7)
    return _save(fig, path, title)


def plot_compare(summaries: dict[str, dict], path: str | Path, title: str = "", group: str = "all") -> Path:
    """Mean curves of several runs (e.g. a trained model and its random twin) on one plot."""
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:gray"]
    fig, axes = _figure(2)
    for ax, (field, ylabel) in zip(axes, PANELS):
        for color, (label, summary) in zip(colors, summaries.items()):
            entry = summary["curves"].get(group, {})
            if field in entry:
                _band(ax, np.asarray(summary["curves"]["grid"]), entry[field], color,
                      f"{label} (n={entry['n']})")
        _position_axis(ax, ylabel)
    return _save(fig, path, title)
