"""How faithfully CorR-PO's fast gradient measures track the exact one on a fresh sample.

Two stages, both resumable:

1. ``collect``: sample responses of chosen questions (any bundled dataset, any question
   range, a length limit per set) from the policy's full softmax, and for every response
   token store its entropy and the **exact** per-parameter Frobenius norm of
   ``d z_{t-1}[y_t] / d theta`` (:func:`entropy_gpu.param_grad.logit_param_grad_norms`, one
   backward per token: the slow part). One JSONL record per response, the per-parameter norms
   in ``exact/<index>.npz``. ``--shard I/N`` splits the responses over N processes.
2. ``report``: every candidate measure of :mod:`entropy_gpu.param_grad.candidates` on the
   stored responses (their cost timed against one no-grad forward of the same sequence),
   compared with the exact one per response: Pearson of the per-response ``rho(entropy,
   measure)`` with the exact ``rho`` (95 % bootstrap interval over responses), sign
   agreement, bias ``mean(rho) - mean(rho exact)`` (with its interval), per-token Pearson.

Run: ``python -m entropy_gpu.experiments.measure_fidelity --config CONFIG.json --out DIR``
(``--help``). Results: docs/results/param_grad_fidelity/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from entropy_gpu.analysis.intervals import bootstrap_allowed, interval_text


@dataclass
class QuestionSet:
    """Questions ``first .. first + count - 1`` (0-based) of a bundled dataset, one response each."""

    dataset: str
    first: int
    count: int
    max_new_tokens: int


@dataclass
class FidelityConfig:
    """One fidelity sample: the policy, its sampling, and the question sets."""

    model: str = "smollm2"
    temperature: float = 0.7
    seed: int = 1000                  #: response i is sampled with seed + i
    sets: list[QuestionSet] = field(default_factory=list)
    param_patterns: list[str] = field(default_factory=list)   #: empty: q/k/v/o of every layer

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FidelityConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        raw = dict(raw)
        raw["sets"] = [QuestionSet(**s) for s in raw.get("sets", [])]
        config = cls(**raw)
        if not config.sets:
            raise ValueError("config has no question sets")
        from ..analysis.sia.data import DATASETS

        for s in config.sets:
            if s.dataset not in DATASETS:
                raise ValueError(f"unknown dataset {s.dataset!r}: one of {DATASETS}")
            if s.first < 0 or s.count < 1 or s.max_new_tokens < 1:
                raise ValueError(f"bad question set {asdict(s)}: first >= 0, count >= 1, max_new_tokens >= 1")
        return config


def planned_responses(config: FidelityConfig) -> list[dict[str, Any]]:
    """(index, dataset, question index, limit) of every response, in order."""
    plan = []
    for s in config.sets:
        for q in range(s.first, s.first + s.count):
            plan.append({"index": len(plan), "dataset": s.dataset, "question": q,
                         "max_new_tokens": s.max_new_tokens})
    return plan


def _done(out: Path) -> set[int]:
    from ..analysis.runs import read_records

    done: set[int] = set()
    for path in sorted(out.glob("responses*.jsonl")):
        done.update(r["index"] for r in read_records(path))
    return done


def _append(log, record: dict[str, Any]) -> None:
    """One line, flushed and synced: a crash loses at most the response being measured."""
    import os

    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def collect(config: FidelityConfig, out: Path, shard: tuple[int, int] = (0, 1),
            progress: bool = True) -> None:
    """Stage 1: sample and measure exactly every planned response this shard owns and lacks."""
    import torch

    from .. import token_stats
    from ..analysis.grad_report import sample_responses
    from ..analysis.models import load_model
    from ..analysis.sia.data import load_dataset
    from ..param_grad.exact import logit_param_grad_norms
    from ..param_grad.model_parts import DEFAULT_PARAM_PATTERNS

    index, n_shards = shard
    plan = [p for p in planned_responses(config) if p["index"] % n_shards == index]
    todo = [p for p in plan if p["index"] not in _done(out)]
    if not todo:
        return
    model, tokenizer = load_model(config.model)
    patterns = config.param_patterns or list(DEFAULT_PARAM_PATTERNS)
    questions: dict[str, list] = {}
    (out / "exact").mkdir(parents=True, exist_ok=True)
    log = (out / f"responses-{index}-of-{n_shards}.jsonl").open("a", encoding="utf-8")
    started = time.perf_counter()
    for k, p in enumerate(todo):
        if p["dataset"] not in questions:
            last = max(q["question"] for q in plan if q["dataset"] == p["dataset"])
            questions[p["dataset"]] = load_dataset(p["dataset"], limit=last + 1)
        problem = questions[p["dataset"]][p["question"]]
        response = sample_responses(model, tokenizer, [problem.question], max_new_tokens=p["max_new_tokens"],
                                    temperature=config.temperature, seed=config.seed + p["index"])[0]
        ids, start = response.input_ids, response.response_start
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
        forward_s = time.perf_counter() - t0
        entropy = token_stats(logits[start - 1:-1], ids[start:], temperature=config.temperature).entropy
        t0 = time.perf_counter()
        exact = logit_param_grad_norms(model, ids, start, param_patterns=patterns, norms="fro")
        exact_s = time.perf_counter() - t0
        np.savez_compressed(out / "exact" / f"{p['index']}.npz", per_param=exact.per_param["fro"].numpy(),
                            param_names=np.array(exact.param_names))
        _append(log, {**p, "problem_id": problem.id, "prompt_tokens": start,
                      "n_tokens": int(ids.numel() - start),
                    "text": response.text, "input_ids": ids.tolist(),
                    "entropy": entropy.double().tolist(), "exact_fro": exact.total["fro"].double().tolist(),
                    "seconds": {"forward": forward_s, "exact_fro": exact_s}})
        if progress:
            print(f"response {p['index']} ({k + 1}/{len(todo)}): {p['dataset']} q{p['question']}, "
                  f"{ids.numel() - start} tokens, exact {exact_s:.0f} s, "
                  f"elapsed {time.perf_counter() - started:.0f} s",
                  flush=True)


# --------------------------------------------------------------------------------------
# Candidates: fitted on the tuning sample (the grad-report fidelity run, first 12 GSM8K
# questions), frozen in CANDIDATES_FILE, then evaluated on the fresh sample.

CANDIDATES = ("same_position", "one_hop", "calibrated", "calibrated_same_only", "one_hop_calibrated",
              "entropy_corrected")
CANDIDATE_TEXT = {
    "same_position": "same-position Frobenius norm (CorR-PO's default; nothing fitted)",
    "one_hop": "same-position, the value projections keeping the one-hop paths through earlier "
               "positions' values (nothing fitted)",
    "calibrated": "same-position per layer + attention entropy per layer, 60 weights fitted "
                  "(entropy_gpu.param_grad.calibrated)",
    "calibrated_same_only": "same-position per layer, 30 weights fitted (ablation: no attention entropy)",
    "one_hop_calibrated": "one-hop per layer + attention entropy per layer, 60 weights fitted",
    "entropy_corrected": "same-position x exp(g x token entropy), 2 constants fitted (uses the entropy "
                         "it is correlated with)",
}


def _features(model, ids, start: int) -> dict[str, Any]:
    """The candidates' inputs for one sequence, from a same-position pass and a one-hop pass:
    per-layer norms ``[n, L]`` of each, attention entropy ``[n, A]``, layer names, seconds."""
    import torch

    from ..param_grad.calibrated import calibration_features

    mask = torch.zeros(1, ids.numel(), dtype=torch.bool)
    mask[0, start:] = True
    out: dict[str, Any] = {}
    for key, one_hop in (("same_per_layer", False), ("one_hop_per_layer", True)):
        t0 = time.perf_counter()
        f = calibration_features(model, ids[None], mask, one_hop_values=one_hop)
        out[f"seconds_{key}"] = time.perf_counter() - t0
        out[key] = f.same_per_layer[0, start:].double().numpy()
    out["attention_entropy"] = f.attention_entropy[0, start:].double().numpy()
    out["layer_names"] = f.layer_names
    return out


def _fit_entropy_corrected(same: list[np.ndarray], entropy: list[np.ndarray], exact: list[np.ndarray]
                           ) -> list[float]:
    """Least squares of log exact on (log same, entropy), within-response centred."""
    x = np.concatenate([np.stack([np.log(s) - np.log(s).mean(), h - h.mean()], 1)
                        for s, h in zip(same, entropy)])
    y = np.concatenate([np.log(e) - np.log(e).mean() for e in exact])
    return [float(v) for v in np.linalg.lstsq(x, y, rcond=None)[0]]


def fit_candidates(tokens: list[dict[str, Any]], model, layer_names, *, ridge: float = 1e-3,
                   fitted_on: str = "") -> dict[str, Any]:
    """The fitted candidates' constants from tuning responses (each with ``same_per_layer``,
    ``one_hop_per_layer``, ``attention_entropy``, ``entropy``, ``exact_fro`` arrays)."""
    from ..param_grad.calibrated import fit_calibration

    attn = [t["attention_entropy"] for t in tokens]
    exact = [t["exact_fro"] for t in tokens]

    def calibration(key: str, attention: list[np.ndarray]) -> dict[str, Any]:
        return asdict(fit_calibration([t[key] for t in tokens], attention, exact, layer_names, ridge=ridge,
                                      one_hop_values=key == "one_hop_per_layer", model=model,
                                      fitted_on=fitted_on))

    same = [np.sqrt((t["same_per_layer"] ** 2).sum(1)) for t in tokens]
    return {"calibrated": calibration("same_per_layer", attn),
            "calibrated_same_only": calibration("same_per_layer", [np.zeros_like(a) for a in attn]),
            "one_hop_calibrated": calibration("one_hop_per_layer", attn),
            "entropy_corrected": _fit_entropy_corrected(same, [t["entropy"] for t in tokens], exact),
            "ridge": ridge, "fitted_on": fitted_on}


def candidate_values(t: dict[str, np.ndarray], fitted: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every candidate measure of one response's tokens, from its features."""
    import torch

    from ..param_grad.calibrated import CalibrationFeatures, MeasureCalibration, calibrated_scores

    same = np.sqrt((t["same_per_layer"] ** 2).sum(1))
    out = {"same_position": same, "one_hop": np.sqrt((t["one_hop_per_layer"] ** 2).sum(1))}
    n = same.size
    for name in ("calibrated", "calibrated_same_only", "one_hop_calibrated"):
        calibration = MeasureCalibration(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in fitted[name].items()})
        per_layer = t["one_hop_per_layer"] if calibration.one_hop_values else t["same_per_layer"]
        features = CalibrationFeatures(mask=torch.ones(1, n, dtype=torch.bool), logits=torch.zeros(1, n),
                                       same_per_layer=torch.as_tensor(per_layer)[None],
                                       attention_entropy=torch.as_tensor(t["attention_entropy"])[None],
                                       layer_names=calibration.layer_names)
        out[name] = calibrated_scores(features, calibration)[0].double().numpy()
    a, g = fitted["entropy_corrected"]
    log_score = a * np.log(same) + g * t["entropy"]
    out["entropy_corrected"] = np.exp(log_score - log_score.max())   # relative: the scale is arbitrary
    return out


def tuning_tokens(grad_report_rows: Path, run_json: Path, model, tokenizer) -> list[dict[str, Any]]:
    """The tuning sample: a ``grad-report --fidelity`` run's per-token rows (its
    ``partial.jsonl``: exact norms and response tokens) with the features recomputed from the
    prompts in its ``fidelity.json``."""
    import torch

    from ..analysis.grad_report import prompt_ids
    from ..analysis.runs import read_records

    run = json.loads(run_json.read_text())
    prompts = [r["prompt"] for r in run["responses"]]
    per_question = run["config"]["samples_per_prompt"]
    tokens = []
    for row in read_records(grad_report_rows):
        if row.get("model", "model") != "model":
            continue  # a random twin's rows
        prompt = prompt_ids(tokenizer, prompts[row["response"]])
        if prompt.numel() != row["position"][0]:
            raise ValueError(f"response {row['response']}: the prompt does not match the stored positions")
        ids = torch.cat([prompt, torch.tensor(row["token_id"])])
        tokens.append({"question": row["response"] // per_question, **_features(model, ids, prompt.numel()),
                       "entropy": np.array(row["entropy"]), "exact_fro": np.array(row["exact_fro"])})
    return tokens


def _rho(x, y) -> float | np.ndarray:
    """Pearson (``entropy_gpu.pearson``, float64) over the last axis; NaN where undefined
    (fewer than two values, or a constant side)."""
    import torch

    from entropy_gpu import pearson

    r = pearson(torch.as_tensor(np.asarray(x), dtype=torch.float64),
                torch.as_tensor(np.asarray(y), dtype=torch.float64))
    values = torch.where(r.valid, r.corr, torch.full_like(r.corr, float("nan"))).numpy()
    return float(values) if values.ndim == 0 else values


def agreement(rows: list[dict[str, np.ndarray]], measure: str, resamples: int = 2000, seed: int = 0
              ) -> dict[str, Any]:
    """Per-response rho(entropy, measure) against rho(entropy, exact): Pearson across responses,
    sign agreement, bias mean(rho - rho exact) and mean |difference|, with 95 % percentile
    bootstrap intervals over responses; per-token Pearson of the logarithms within each response
    (mean over responses). Responses
    where either rho is undefined (a constant column) are left out and counted."""
    exact = np.array([_rho(r["entropy"], r["exact_fro"]) for r in rows])
    ours = np.array([_rho(r["entropy"], r[measure]) for r in rows])
    ok = np.isfinite(exact) & np.isfinite(ours)
    exact, ours = exact[ok], ours[ok]
    idx = np.random.default_rng(seed).integers(0, ok.sum(), (resamples, ok.sum()))
    boot_r = _rho(exact[idx], ours[idx])
    boot_bias = (ours - exact)[idx].mean(1)
    boot_sign = (np.sign(ours) == np.sign(exact))[idx].mean(1)
    # Per token, within each response (a calibrated score's scale differs between responses).
    within = [_rho(np.log(r[measure][ok_t]), np.log(r["exact_fro"][ok_t]))
              for r in rows if (ok_t := (r[measure] > 0) & (r["exact_fro"] > 0)).sum() >= 2]

    def ci(values) -> list[float] | None:  # None: too few responses for an interval
        if not bootstrap_allowed(int(ok.sum())):
            return None
        return [round(float(v), 4) for v in np.nanpercentile(values, [2.5, 97.5])]

    return {"n_responses": int(ok.sum()), "n_undefined": int((~ok).sum()),
            "rho_agreement": round(_rho(exact, ours), 4), "rho_agreement_ci95": ci(boot_r),
            "sign_agreement": round(float((np.sign(ours) == np.sign(exact)).mean()), 4),
            "sign_agreement_ci95": ci(boot_sign),
            "bias": round(float((ours - exact).mean()), 4), "bias_ci95": ci(boot_bias),
            "mean_abs_diff": round(float(np.abs(ours - exact).mean()), 4),
            # what a group-normalized advantage sees: a bias shared by the group cancels
            "diff_sd": round(float((ours - exact).std(ddof=1)), 4) if ok.sum() > 1 else None,
            "rho_mean": round(float(ours.mean()), 4), "rho_exact_mean": round(float(exact.mean()), 4),
            "per_token_log_pearson": round(float(np.nanmean(within)), 4),
            "rho": [round(float(v), 5) for v in ours]}


def cross_validated(tuning: list[dict[str, Any]], model: str, layer_names) -> dict[str, Any]:
    """Leave-one-question-out on the tuning sample: each question's responses are scored
    with constants fitted on the other questions."""
    rows: list[dict[str, np.ndarray] | None] = [None] * len(tuning)
    for q in sorted({t["question"] for t in tuning}):
        fitted = fit_candidates([t for t in tuning if t["question"] != q], model, layer_names)
        for i, t in enumerate(tuning):
            if t["question"] == q:
                rows[i] = {**candidate_values(t, fitted), "entropy": t["entropy"],
                           "exact_fro": t["exact_fro"]}
    return {m: agreement(rows, m) for m in CANDIDATES}


def fit(rows: Path, run_json: Path, out: Path, model_name: str = "smollm2") -> dict[str, Any]:
    """Fit the candidates on a grad-report fidelity run (the tuning sample); write the frozen
    constants to ``OUT/candidates.json`` and their in-sample and cross-validated fidelity to
    ``OUT/tuning.json``."""
    from ..analysis.models import load_model

    model, tokenizer = load_model(model_name)
    tuning = tuning_tokens(rows, run_json, model, tokenizer)
    names = tuning[0]["layer_names"]
    fitted = fit_candidates(tuning, model_name, names, fitted_on=f"{rows} ({len(tuning)} responses)")
    in_sample = [{**candidate_values(t, fitted), "entropy": t["entropy"], "exact_fro": t["exact_fro"]}
                 for t in tuning]
    (out / "candidates.json").write_text(json.dumps(fitted, indent=1) + "\n")
    result = {"n_responses": len(tuning), "n_tokens": int(sum(t["exact_fro"].size for t in tuning)),
              "in_sample": {m: agreement(in_sample, m) for m in CANDIDATES},
              "leave_one_question_out": cross_validated(tuning, model_name, names)}
    (out / "tuning.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _timed_passes(model, ids, start: int, repeats: int = 2) -> dict[str, float]:
    """Seconds of one no-grad forward and of one training forward+backward (mean token NLL,
    every parameter) of the sequence: the cost units. Best of ``repeats``."""
    import torch

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)

    def forward_backward() -> None:
        logits = model(input_ids=ids[None], use_cache=False).logits[0, start - 1:-1]
        torch.nn.functional.cross_entropy(logits.float(), ids[start:]).backward()
        model.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def _cached_features(folder: Path, record: dict[str, Any], model) -> tuple[dict[str, Any], dict[str, float]]:
    """One response's candidate inputs and timings, computed once (``folder/<index>.npz``), so a
    report over a growing sample recomputes only the new responses."""
    import torch

    path = folder / f"{record['index']}.npz"
    if path.is_file():
        z = np.load(path)
        return ({k: z[k] for k in ("same_per_layer", "one_hop_per_layer", "attention_entropy")},
                json.loads(str(z["cost"])))
    ids, start = torch.tensor(record["input_ids"]), record["prompt_tokens"]
    t = _features(model, ids, start)
    cost = {**_timed_passes(model, ids, start), "same_position_pass": t["seconds_same_per_layer"],
            "one_hop_pass": t["seconds_one_hop_per_layer"], "exact_fro": record["seconds"]["exact_fro"],
            "n_tokens": record["n_tokens"]}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, same_per_layer=t["same_per_layer"], one_hop_per_layer=t["one_hop_per_layer"],
             attention_entropy=t["attention_entropy"], cost=json.dumps(cost))
    return t, cost


def report(out: Path, candidates: Path, config: FidelityConfig, progress: bool = True) -> dict[str, Any]:
    """Stage 2: every candidate on the collected responses; ``OUT/report.json`` and ``report.md``."""
    from ..analysis.models import load_model
    from ..analysis.runs import read_records

    fitted = json.loads(candidates.read_text())
    records = sorted((r for path in sorted(out.glob("responses*.jsonl")) for r in read_records(path)),
                     key=lambda r: r["index"])
    if not records:
        raise ValueError(f"no collected responses in {out}")
    model = None  # loaded when a response's features are not cached yet
    rows, costs = [], []
    for k, r in enumerate(records):
        if model is None and not (out / "features" / f"{r['index']}.npz").is_file():
            model, _ = load_model(config.model)
        t, cost = _cached_features(out / "features", r, model)
        t.update(entropy=np.array(r["entropy"]), exact_fro=np.array(r["exact_fro"]))
        rows.append({**candidate_values(t, fitted), "entropy": t["entropy"], "exact_fro": t["exact_fro"]})
        costs.append(cost)
        if progress:
            print(f"report: response {k + 1}/{len(records)}", flush=True)
    lengths = np.array([r["n_tokens"] for r in records])
    fwd = sum(c["forward"] for c in costs)
    fwd_bwd = sum(c["forward_backward"] for c in costs)
    result = {
        "config": asdict(config), "candidates_file": str(candidates),
        "n_responses": len(records), "n_questions": len({(r["dataset"], r["question"]) for r in records}),
        "datasets": {d: sum(r["dataset"] == d for r in records)
                     for d in sorted({r["dataset"] for r in records})},
        "n_tokens": int(lengths.sum()), "responses_200_plus": int((lengths >= 200).sum()),
        "length_min_median_max": [int(lengths.min()), float(np.median(lengths)), int(lengths.max())],
        "measures": {m: agreement(rows, m) for m in CANDIDATES},
        "cost": {**{f"{name}_over_forward_backward": round(sum(c[name] for c in costs) / fwd_bwd, 3)
                    for name in ("same_position_pass", "one_hop_pass")},
                 "forward_backward_forward_equivalents": round(fwd_bwd / fwd, 2),
                 "exact_seconds_per_token": round(sum(c["exact_fro"] for c in costs) / lengths.sum(), 3),
                 "exact_seconds_per_token_200_plus": round(
                     sum(c["exact_fro"] for c, n in zip(costs, lengths) if n >= 200)
                     / max(1, lengths[lengths >= 200].sum()), 3),
                 "exact_forward_equivalents": round(sum(c["exact_fro"] for c in costs) / fwd, 1)},
        "rho_exact": [round(_rho(r["entropy"], r["exact_fro"]), 5) for r in rows],
        "responses": [{k: r[k] for k in ("index", "dataset", "question", "n_tokens", "prompt_tokens", "text")}
                      for r in records],
        "per_response_cost": costs,
    }
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(report_table(result))
    rho_plot(result, out / "rho_scatter.png")
    return result


def rho_plot(result: dict[str, Any], path: Path) -> None:
    """One panel per candidate: its per-response rho against the exact one (the diagonal is
    perfect agreement), GSM8K and MATH-500 in two colours, responses of 200+ tokens filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = np.array(result["rho_exact"])
    datasets = [r["dataset"] for r in result["responses"]]
    long = np.array([r["n_tokens"] >= 200 for r in result["responses"]])
    names = list(result["measures"])
    cols = 3
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4 * cols, 4 * -(-len(names) // cols)),
                             squeeze=False, sharex=True, sharey=True)
    lo, hi = min(exact.min(), *(min(a["rho"]) for a in result["measures"].values())) - 0.05, \
        max(exact.max(), *(max(a["rho"]) for a in result["measures"].values())) + 0.05
    for ax, name in zip(axes.flat, names):
        a = result["measures"][name]
        rho = np.array(a["rho"])
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, label="measure = exact")
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        for d, colour in (("gsm8k", "tab:blue"), ("math500", "tab:orange")):
            pick = np.array([x == d for x in datasets])
            for filled in (True, False):
                sel = pick & (long == filled)
                ax.scatter(exact[sel], rho[sel], s=22, edgecolors=colour,
                           facecolors=colour if filled else "none",
                           label=f"{d}, {'200+' if filled else '< 200'} tokens")
        ax.set_title(f"{name}\nagreement {a['rho_agreement']:.2f}, bias {a['bias']:+.3f}, "
                     f"sign {a['sign_agreement']:.0%}", fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    for ax in axes[-1]:
        ax.set_xlabel("rho(entropy, exact gradient norm)")
    for ax in axes[:, 0]:
        ax.set_ylabel("rho(entropy, measure)")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Per-response rho, {result['n_responses']} responses ({result['n_tokens']} tokens), "
                 "fast measures vs the exact one", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_table(result: dict[str, Any]) -> str:
    """The fidelity table (markdown)."""
    lines = ["| measure | rho agreement [95 % CI] | sign right [95 % CI] "
             "| bias mean(rho - rho exact) [95 % CI] | mean abs diff "
             "| per-token log Pearson (within response) | mean rho (exact) |",
             "|---|---|---|---|---|---|---|"]
    for m, a in result["measures"].items():
        agree, sign, bias = (a[k] or (None, None) for k in ("rho_agreement_ci95", "sign_agreement_ci95",
                                                           "bias_ci95"))
        lines.append(f"| `{m}` | {a['rho_agreement']:.3f} {interval_text(*agree)} "
                     f"| {a['sign_agreement']:.2f} {interval_text(*sign)} "
                     f"| {a['bias']:+.3f} {interval_text(*bias, '+.3f')} | {a['mean_abs_diff']:.3f} "
                     f"| {a['per_token_log_pearson']:.3f} "
                     f"| {a['rho_mean']:+.3f} ({a['rho_exact_mean']:+.3f}) |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m entropy_gpu.experiments.measure_fidelity",
        description="Fidelity of CorR-PO's fast gradient measures against the exact one on a fresh sample.")
    parser.add_argument("--config", required=True, help="experiment config (JSON)")
    parser.add_argument("--out", required=True, help="folder for the records and the report")
    parser.add_argument("--shard", default="0/1", help="I/N: collect the responses with index %% N == I")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--fit", nargs=2, metavar=("ROWS_JSONL", "RUN_JSON"),
                        help="instead of collecting: fit the candidates on a grad-report fidelity run "
                             "(its partial.jsonl and fidelity.json); writes OUT/candidates.json and "
                             "OUT/tuning.json")
    stage.add_argument("--report", metavar="CANDIDATES_JSON",
                        help="instead of collecting: score the collected responses with these frozen "
                             "candidates; writes OUT/report.json and OUT/report.md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the idle cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text}")
    return i, n


def _check_before_work(args: argparse.Namespace, config: FidelityConfig) -> None:
    """The user errors a run would otherwise meet after loading the model (ValueError)."""
    from ..analysis.runs import config_differences

    out = Path(args.out)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    stored = out / "config.json"
    if not args.fit and stored.is_file():
        earlier = asdict(FidelityConfig.from_dict(json.loads(stored.read_text())))
        changes = config_differences(earlier, asdict(config))
        if changes:
            raise ValueError(f"{out} holds responses collected with another config (differs in: "
                             f"{'; '.join(changes)}); use another --out")
    for path in args.fit or ():
        if not Path(path).is_file():
            raise ValueError(f"--fit: no such file {path}")
    if args.report:
        if not Path(args.report).is_file():
            raise ValueError(f"--report: no such file {args.report}")
        if not any(out.glob("responses*.jsonl")):
            raise ValueError(f"--report: no collected responses in {out}; collect them first "
                             "(the same command without --report)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = FidelityConfig.from_dict(json.loads(Path(args.config).read_text()))
        shard = _shard(args.shard)
        _check_before_work(args, config)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    from ..cpu_threads import choose_cpu_threads

    torch.set_num_threads(choose_cpu_threads(args.threads or None)[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.fit:
            result = fit(Path(args.fit[0]), Path(args.fit[1]), out, config.model)
            print(json.dumps({m: {k: v for k, v in a.items() if k != "rho"}
                              for m, a in result["leave_one_question_out"].items()}, indent=1))
        elif args.report:
            print(report_table(report(out, Path(args.report), config, progress=not args.quiet)))
        else:
            (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
            collect(config, out, shard, progress=not args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
