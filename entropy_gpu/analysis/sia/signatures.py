"""Per-trace signatures of an SIA curve and dataset summaries: mean curves over
normalized position, and AUROC of each signature for correctness with a bootstrap
interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..intervals import auroc_interval_allowed, bootstrap_allowed

# Signature -> the direction SIA predicts for *correct* traces.
SIGNATURES = {
    "final_entropy": "lower",        # H_K
    "slope": "lower",                # least-squares slope of H_k against k / K
    "frac_non_increasing": "higher", # fraction of steps with H_k <= H_{k-1}
    "largest_spike": "lower",        # max(0, max_k H_k - H_{k-1})
    "fano_bound": "lower",           # max(0, (H_K - log 2) / log(|A| - 1)), capped at 1
}


def fano_bound(entropy: float, answer_set_size: int | None) -> float:
    """Fano lower bound on the error probability, ``(H - log 2) / log(|A| - 1)`` clipped
    to [0, 1]; NaN when ``|A|`` is unknown or below 3 (the bound needs ``log(|A|-1) > 0``)."""
    if answer_set_size is None or answer_set_size < 3 or not math.isfinite(entropy):
        return math.nan
    return min(1.0, max(0.0, (entropy - math.log(2)) / math.log(answer_set_size - 1)))


def trace_signatures(entropy: Sequence[float], answer_set_size: int | None = None) -> dict[str, float]:
    """Signatures of one curve ``H_0..H_K``. Slope, fraction non-increasing and largest
    spike need ``K >= 1`` and are NaN otherwise."""
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError("entropy must be a non-empty 1-D sequence H_0..H_K")
    out = {"final_entropy": float(h[-1]), "slope": math.nan, "frac_non_increasing": math.nan,
           "largest_spike": math.nan, "fano_bound": fano_bound(float(h[-1]), answer_set_size)}
    if h.size >= 2:
        x = np.linspace(0.0, 1.0, h.size)
        xc = x - x.mean()
        diffs = np.diff(h)
        out["slope"] = float((xc * (h - h.mean())).sum() / (xc * xc).sum())
        out["frac_non_increasing"] = float((diffs <= 0).mean())
        out["largest_spike"] = float(max(0.0, diffs.max()))
    return out


def resample_curve(values: Sequence[float], grid: np.ndarray) -> np.ndarray:
    """A curve over ``k = 0..K`` placed at ``k / K`` and linearly interpolated on ``grid``."""
    v = np.asarray(values, dtype=np.float64)
    return np.interp(grid, np.linspace(0.0, 1.0, v.size), v)


def bootstrap_mean(rows: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``rows`` [n, G] over n, with a percentile bootstrap interval per column (NaN
    below ``MIN_BOOTSTRAP_N`` rows: too few for an interval, see ``analysis/intervals.py``)."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(0)
    if not bootstrap_allowed(rows.shape[0]):
        nan = np.full_like(mean, np.nan)
        return {"mean": mean.tolist(), "lo": nan.tolist(), "hi": nan.tolist()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, rows.shape[0], size=(n_boot, rows.shape[0]))
    means = rows[idx].mean(1)
    alpha = (1 - level) / 2
    return {"mean": mean.tolist(), "lo": np.quantile(means, alpha, axis=0).tolist(),
            "hi": np.quantile(means, 1 - alpha, axis=0).tolist()}


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    p = np.asarray(positive, dtype=np.float64)[:, None]
    n = np.asarray(negative, dtype=np.float64)[None, :]
    if p.size == 0 or n.size == 0:
        return math.nan
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def auroc_with_interval(values: Sequence[float], correct: Sequence[bool], direction: str = "lower",
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUROC of a signature for correctness, oriented so that 1 means the SIA direction
    (``lower`` or ``higher`` values for correct traces) separates perfectly and 0.5 is
    chance; stratified percentile bootstrap interval, NaN with fewer than ``MIN_AUROC_CLASS_N``
    traces in a class (too few for one, see ``analysis/intervals.py``). NaN values are dropped."""
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    keep = np.isfinite(v)
    score = -v[keep] if direction == "lower" else v[keep]
    pos, neg = score[y[keep]], score[~y[keep]]
    out = {"auroc": auroc(pos, neg), "lo": math.nan, "hi": math.nan,
           "n_correct": int(pos.size), "n_incorrect": int(neg.size)}
    if auroc_interval_allowed(pos.size, neg.size):
        rng = np.random.default_rng(seed)
        boots = [auroc(rng.choice(pos, pos.size), rng.choice(neg, neg.size)) for _ in range(n_boot)]
        alpha = (1 - level) / 2
        out["lo"], out["hi"] = float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))
    return out


def json_ready(x):
    """``x`` (nested lists and dicts) with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    return x


def summarize(curves, grid_points: int = 21, n_boot: int = 1000, seed: int = 0) -> dict:
    """Dataset summary of ``AnswerCurve`` objects (or their dicts).

    Returns a JSON-ready dict: counts and accuracy; ``curves``: mean ``entropy`` and
    ``answer_logprob`` on a grid of normalized positions ``k / K`` for ``all``,
    ``correct`` and ``incorrect`` traces (95% bootstrap intervals; traces with
    ``K = 0`` left out); ``signatures``: per signature, its mean per group and the
    oriented AUROC for correctness (traces of unknown correctness left out).
    """
    records = [c if isinstance(c, dict) else c.to_dict() for c in curves]
    grid = np.linspace(0.0, 1.0, grid_points)
    known = [r for r in records if r.get("correct") is not None]
    groups = {"all": records,
              "correct": [r for r in known if r["correct"]],
              "incorrect": [r for r in known if not r["correct"]]}
    if known and len(known) < len(records):  # judged and unjudged traces: the unjudged get a group
        groups["unjudged"] = [r for r in records if r.get("correct") is None]
    summary: dict = {
        "n_traces": len(records),
        "n_correct": len(groups["correct"]),
        "n_incorrect": len(groups["incorrect"]),
        "n_unjudged": len(records) - len(known),  # no judged answer (correct is None)
        "accuracy": len(groups["correct"]) / len(known) if known else None,
        "mean_steps": float(np.mean([len(r["steps"]) for r in records])) if records else None,
        "curves": {"grid": grid.tolist()},
        "signatures": {},
    }
    for name, members in groups.items():
        usable = [r for r in members if len(r["steps"]) >= 1 and len(r["entropy"]) >= 2]
        entry = {"n": len(usable)}
        for field in ("entropy", "answer_logprob"):
            rows = [resample_curve([math.nan if v is None else v for v in r[field]], grid) for r in usable]
            rows = [row for row in rows if np.all(np.isfinite(row))]
            if rows:
                entry[field] = bootstrap_mean(np.stack(rows), n_boot=n_boot, seed=seed)
        summary["curves"][name] = entry
    for name, direction in SIGNATURES.items():
        entry = {"direction_if_correct": direction}
        for group, members in groups.items():
            vals = [r["signatures"][name] for r in members if r["signatures"][name] is not None]
            entry[f"mean_{group}"] = float(np.mean(vals)) if vals else None
        if groups["correct"] and groups["incorrect"]:
            vals = [math.nan if r["signatures"][name] is None else r["signatures"][name] for r in known]
            entry.update(auroc_with_interval(vals, [r["correct"] for r in known], direction,
                                             n_boot=n_boot, seed=seed))
        summary["signatures"][name] = entry
    return json_ready(summary)
