"""Summary table and plots of a CorR-PO training experiment (``corrpo_training``).

Reads ``OUT/runs/ARM-sSEED/{steps,evals}.jsonl`` and writes ``OUT/summary.json`` (per arm:
start and end values with every seed's number, their mean and a 95 % interval across
seeds, and each arm's paired difference from ``grpo`` on the same seed), ``OUT/summary.md``
(the same as tables) and ``OUT/curves.png``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from entropy_gpu.analysis.intervals import bootstrap_allowed, interval_text

#: Per-step quantities averaged over the first / last ``WINDOW`` steps for "start" / "end".
WINDOW = 5
STEP_METRICS = ("task_reward", "corrpo_term", "rho_measure", "entropy", "length", "at_limit", "distinct2")
EVAL_METRICS = ("heldout_acc_greedy", "heldout_acc_sampled", "rho_exact", "inversion_rate_exact",
                "rho_measure", "kl", "heldout_length", "heldout_distinct2", "heldout_repeated_trigrams")
# Two-sided 95 % Student t quantiles by degrees of freedom (n seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _read(path: Path) -> list[dict]:
    from entropy_gpu.analysis.runs import read_records

    return list(read_records(path)) if path.is_file() else []


def load_runs(out: Path) -> dict[str, dict[int, dict[str, list[dict]]]]:
    """arm -> seed -> {"steps": [...], "evals": [...]} for every run folder with records."""
    runs: dict[str, dict[int, dict[str, list[dict]]]] = {}
    for run_dir in sorted((out / "runs").glob("*-s*")):
        arm, _, seed = run_dir.name.rpartition("-s")
        steps, evals = _read(run_dir / "steps.jsonl"), _read(run_dir / "evals.jsonl")
        if steps or evals:
            runs.setdefault(arm, {})[int(seed)] = {"steps": steps, "evals": evals,
                                                   "done": (run_dir / "done.json").is_file()}
    order = {arm: i for i, arm in enumerate(ARM_COLOURS)}  # grpo first, then the CorR-PO arms
    return {arm: dict(sorted(runs[arm].items())) for arm in sorted(runs, key=lambda a: (order.get(a, 99), a))}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def interval(values: list[float]) -> dict[str, Any]:
    """Mean across seeds with a 95 % t interval (None with fewer than two seeds)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "ci95": None, "per_seed": values}
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": m, "ci95": None, "per_seed": values}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = _T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return {"mean": m, "ci95": [m - half, m + half], "per_seed": values}


def bootstrap_mean(values: list[float], reps: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of the mean (over responses); None below
    ``MIN_BOOTSTRAP_N`` values (too few for an interval, ``analysis/intervals.py``)."""
    xs = [v for v in values if v is not None]
    if not bootstrap_allowed(len(xs)):
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(reps))
    return [means[int(0.025 * reps)], means[int(0.975 * reps) - 1]]


def _window(steps: list[dict], key: str, end: bool) -> float | None:
    rows = steps[-WINDOW:] if end else steps[:WINDOW]
    return _mean([r.get(key) for r in rows])


def _eval_at(evals: list[dict], end: bool) -> dict | None:
    if not evals:
        return None
    return max(evals, key=lambda r: r["step"]) if end else min(evals, key=lambda r: r["step"])


def summarize(runs: dict) -> dict[str, Any]:
    """The summary table: per arm, start and end of every metric across seeds."""
    table: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"seeds": seeds, "finished": [by_seed[s]["done"] for s in seeds],
                               "steps": [len(by_seed[s]["steps"]) for s in seeds]}
        for key in STEP_METRICS:
            row[f"{key}_start"] = interval([_window(by_seed[s]["steps"], key, False) for s in seeds])
            row[f"{key}_end"] = interval([_window(by_seed[s]["steps"], key, True) for s in seeds])
        for key in EVAL_METRICS:
            for end in (False, True):
                values = []
                for s in seeds:
                    ev = _eval_at(by_seed[s]["evals"], end)
                    values.append(ev.get(key) if ev else None)
                row[f"eval_{key}_{'end' if end else 'start'}"] = interval(values)
        end_rhos = [r["rho_exact"] for s in seeds if _eval_at(by_seed[s]["evals"], True)
                    for r in _eval_at(by_seed[s]["evals"], True)["probe_responses"]]
        row["eval_rho_exact_end_pooled"] = {"mean": _mean(end_rhos),
                                            "ci95_bootstrap": bootstrap_mean(end_rhos),
                                            "n_responses": len([r for r in end_rhos if r is not None])}
        row["eval_step_end"] = [(_eval_at(by_seed[s]["evals"], True) or {}).get("step") for s in seeds]
        table[arm] = row
    if "grpo" in runs:
        for arm, by_seed in runs.items():
            if arm == "grpo":
                continue
            paired = {}
            for key, getter in (("task_reward_end", lambda r: _window(r["steps"], "task_reward", True)),
                                ("heldout_acc_sampled_end",
                                 lambda r: (_eval_at(r["evals"], True) or {}).get("heldout_acc_sampled")),
                                ("rho_exact_end",
                                 lambda r: (_eval_at(r["evals"], True) or {}).get("rho_exact")),
                                ("entropy_end", lambda r: _window(r["steps"], "entropy", True)),
                                ("length_end", lambda r: _window(r["steps"], "length", True))):
                diffs = []
                for s in sorted(set(by_seed) & set(runs["grpo"])):
                    a, b = getter(by_seed[s]), getter(runs["grpo"][s])
                    diffs.append(None if a is None or b is None else a - b)
                paired[key] = interval(diffs)
            table[arm]["minus_grpo_same_seed"] = paired
    return table


ARM_COLOURS = {"grpo": "#444444", "corrpo": "#1f77b4", "corrpo_flipped": "#d62728",
               "entropy_bonus": "#2ca02c", "corrpo_logit": "#9467bd"}


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(xs)):
        window = [x for x in xs[max(0, i - k + 1):i + 1] if x is not None]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def plot(runs: dict, path: Path, title: str = "") -> None:
    """Six panels: per-step curves (mean over seeds, band = range over seeds, 5-step moving
    average) and checkpoint values (mean over seeds, bars = range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("steps", "task_reward", "task reward (train batch)"),
              ("steps", "rho_measure", "rho of the default measure (train batch)"),
              ("steps", "entropy", "mean token entropy (nats)"),
              ("steps", "length", "completion length (tokens)"),
              ("evals", "rho_exact", "exact rho (paper's measure), probe set"),
              ("evals", "heldout_acc_sampled", "held-out accuracy (sampled)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (kind, key, label) in zip(axes.flat, panels):
        for arm, by_seed in runs.items():
            colour = ARM_COLOURS.get(arm)
            series = []
            for s in sorted(by_seed):
                rows = by_seed[s][kind]
                xs = [r["step"] for r in rows]
                ys = [r.get(key) for r in rows]
                series.append((xs, _smooth(ys) if kind == "steps" else ys))
            length = min(len(x) for x, _ in series)
            if length == 0:
                continue
            xs = series[0][0][:length]
            columns = [[ys[i] for _, ys in series if ys[i] is not None and not math.isnan(ys[i])]
                       for i in range(length)]
            mean = [sum(c) / len(c) if c else float("nan") for c in columns]
            lo = [min(c) if c else float("nan") for c in columns]
            hi = [max(c) if c else float("nan") for c in columns]
            n = len(series)
            if kind == "steps":
                ax.plot(xs, mean, color=colour, label=f"{arm} (n={n} seeds)")
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, linewidth=0)
            else:
                yerr = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
                ax.errorbar(xs, mean, yerr=yerr, color=colour, marker="o", capsize=3, label=f"{arm} (n={n})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if key.startswith("rho"):
            ax.axhline(0, color="black", linewidth=0.6)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title or "CorR-PO training experiment: lines = mean over seeds, "
                 "band/bars = range over seeds;"
                 " per-step curves are 5-step moving averages", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}" if digits == 2 else f"{value:.{digits}f}"


def _cell(entry: dict, digits: int = 2) -> str:
    """``mean [lo, hi] (seed values)`` of an :func:`interval` entry."""
    seeds = ", ".join("n/a" if v is None else f"{v:.{digits}f}" for v in entry["per_seed"])
    if entry["mean"] is None:
        return "n/a"
    ci = f" [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]" if entry["ci95"] else ""
    return f"{entry['mean']:.{digits}f}{ci} ({seeds})"


MAIN_ROWS = (
    ("task reward, train batch (mean of first / last 5 steps)", "task_reward", "step"),
    ("held-out accuracy, greedy", "heldout_acc_greedy", "eval"),
    ("held-out accuracy, sampled", "heldout_acc_sampled", "eval"),
    ("exact rho (paper's measure), probe samples", "rho_exact", "eval"),
    ("exact-rho inversion rate (rho < 0)", "inversion_rate_exact", "eval"),
    ("rho of the default measure, probe samples", "rho_measure", "eval"),
    ("rho of the default measure, train batch", "rho_measure", "step"),
    ("mean token entropy (nats), train batch", "entropy", "step"),
    ("completion length (tokens), train batch", "length", "step"),
    ("fraction at the length limit, train batch", "at_limit", "step"),
    ("distinct-2, train batch", "distinct2", "step"),
    ("held-out repeated-trigram fraction", "heldout_repeated_trigrams", "eval"),
    ("KL to the starting policy (k1, probe samples)", "kl", "eval"),
)


def _seeds(entry: dict, digits: int = 2) -> str:
    """``mean (seed values)``."""
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} (" + ", ".join(
        "n/a" if v is None else f"{v:.{digits}f}" for v in entry["per_seed"]) + ")"


def main_table(summary: dict[str, Any]) -> str:
    """One line per arm, the end of training (last eval, last 5 steps): mean over seeds with
    every seed's value; the exact rho pooled over the seeds' probe responses with its 95 %
    bootstrap interval."""
    head = ("| arm | task reward, first -> last 5 steps | held-out acc. greedy / sampled | exact rho "
            "(pooled, 95 % CI) | inversion rate | entropy (nats) | length | at limit | KL to start |")
    lines = [head, "|---" * 9 + "|"]
    for arm, row in summary["arms"].items():
        pooled = row["eval_rho_exact_end_pooled"]
        ci = pooled["ci95_bootstrap"] or (None, None)
        lines.append(
            f"| {arm} | {_seeds(row['task_reward_start'])} -> {_seeds(row['task_reward_end'])} "
            f"| {_seeds(row['eval_heldout_acc_greedy_end'])} / "
            f"{_seeds(row['eval_heldout_acc_sampled_end'])} "
            f"| {_fmt(pooled['mean'])} {interval_text(*ci, '+.2f')} (n = {pooled['n_responses']}) "
            f"| {_seeds(row['eval_inversion_rate_exact_end'])} | {_seeds(row['entropy_end'])} "
            f"| {_seeds(row['length_end'], 1)} | {_seeds(row['at_limit_end'])} "
            f"| {_seeds(row['eval_kl_end'])} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables: the main table (:func:`main_table`), one table per
    arm (start -> end, mean [95 % t interval over seeds] (per-seed values)), then each arm's
    paired difference from ``grpo``."""
    lines = ["### End of training, per arm", "", main_table(summary)]
    for arm, row in summary["arms"].items():
        lines += [f"### {arm} (seeds {row['seeds']}, steps {row['steps']})", "",
                  "| quantity | start | end |", "|---|---|---|"]
        for label, key, kind in MAIN_ROWS:
            name = f"{key}" if kind == "step" else f"eval_{key}"
            lines.append(f"| {label} | {_cell(row[f'{name}_start'])} | {_cell(row[f'{name}_end'])} |")
        pooled = row["eval_rho_exact_end_pooled"]
        ci = pooled["ci95_bootstrap"] or (None, None)
        lines.append(f"| exact rho at the end, pooled over seeds' probe responses (bootstrap 95 %) | | "
                     f"{_fmt(pooled['mean'])} {interval_text(*ci, '+.2f')} (n = {pooled['n_responses']}) |")
        lines.append("")
    paired = {arm: row["minus_grpo_same_seed"] for arm, row in summary["arms"].items()
              if "minus_grpo_same_seed" in row}
    if paired:
        keys = next(iter(paired.values())).keys()
        lines += ["### Arm minus grpo, same seed (mean [95 % t interval over seeds] (per seed))", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, diffs in paired.items():
            lines.append(f"| {arm} | " + " | ".join(_cell(diffs[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict[str, Any]:
    """``OUT/summary.json``, ``OUT/summary.md`` and ``OUT/curves.png`` from the run folders;
    returns the summary."""
    from entropy_gpu.analysis.runs import write_json

    runs = load_runs(out)
    experiment = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    calibration = json.loads((out / "calibration.json").read_text()) \
        if (out / "calibration.json").is_file() else None
    walls = {p.parent.name: json.loads(p.read_text())["seconds"] for p in (out / "runs").glob("*/wall.json")}
    summary = {"config": experiment, "calibration": calibration, "wall_seconds": walls,
               "window_steps": WINDOW, "arms": summarize(runs)}
    write_json(out / "summary.json", summary)
    from entropy_gpu.analysis.runs import write_text_atomic

    write_text_atomic(out / "summary.md", markdown(summary))
    if runs:
        plot(runs, out / "curves.png")
    return summary
