"""PNG plots of SIA results (matplotlib's Agg canvas; pyplot's global state is not used)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .signatures import SIGNATURES

PANELS = (("entropy", "H_k (nats)"), ("answer_logprob", "log p(true answer)_k"))
GROUP_STYLE = {"all": ("tab:blue", "all traces"), "correct": ("tab:green", "correct"),
               "incorrect": ("tab:red", "incorrect")}


def _figure(ncols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _band(ax, grid, stats: dict, color: str, label: str) -> None:
    ax.plot(grid, stats["mean"], color=color, label=label)
    ax.fill_between(grid, stats["lo"], stats["hi"], color=color, alpha=0.2, linewidth=0)


def _position_axis(ax, ylabel: str) -> None:
    ax.set_xlabel("normalized position k / K")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


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
    fig, axes = _figure(2)
    for ax, (field, ylabel) in zip(axes, PANELS):
        for group in groups:
            entry = curves.get(group, {})
            if field in entry:
                color, label = GROUP_STYLE[group]
                _band(ax, grid, entry[field], color, f"{label} (n={entry['n']})")
        _position_axis(ax, ylabel)
    return _save(fig, path, title)


def plot_signatures(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Histograms of each signature (densities, so groups of different sizes compare),
    correct vs incorrect (or all when correctness is unknown)."""
    fig, axes = _figure(len(SIGNATURES), width=3.2, height=3.0)
    known = any(r.get("correct") is not None for r in records)
    split = {"correct": [r for r in records if r.get("correct")],
             "incorrect": [r for r in records if r.get("correct") is False]} if known else {"all": records}
    for ax, name in zip(axes, SIGNATURES):
        values = {g: [r["signatures"][name] for r in rs if r["signatures"][name] is not None]
                  for g, rs in split.items()}
        every = [v for vs in values.values() for v in vs]
        bins = np.histogram_bin_edges(every, bins=15) if every else 10
        for group, vs in values.items():
            if vs:
                color, label = GROUP_STYLE[group]
                ax.hist(vs, bins=bins, density=True, alpha=0.5, color=color, label=f"{label} ({len(vs)})")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("density", fontsize=7)
        ax.tick_params(labelsize=7)
        if every:
            ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_compare(summaries: dict[str, dict], path: str | Path, title: str = "", group: str = "all") -> Path:
    """Mean curves of several runs (e.g. a trained model and its random twin) on one plot."""
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:gray"]
    fig, axes = _figure(2)
    for ax, (field, ylabel) in zip(axes, PANELS):
        for color, (label, summary) in zip(colors, summaries.items()):
            entry = summary["curves"].get(group, {})
            if field in entry:
                _band(ax, np.asarray(summary["curves"]["grid"]), entry[field], color, f"{label} (n={entry['n']})")
        _position_axis(ax, ylabel)
    return _save(fig, path, title)
