"""Summary tables and plots of a CorR-PO training experiment (``corrpo_training``).

Reads ``OUT/runs/ARM-sSEED/{steps,evals}.jsonl``, ``OUT/run.json`` (the config, as stored by
the run), ``OUT/calibration.json`` and, when present, ``OUT/provenance.json`` (what the
records' config does not say: the addition split they used, the commit each arm ran at).
Writes ``OUT/summary.json``, ``OUT/summary.md`` and ``OUT/curves.png``, nothing by hand:

- **runs**: per arm, finished (``done.json``) or *partial* with the last step each seed
  reached, and the steps with zero gradient (``grad_norm == 0`` in steps.jsonl: every GRPO
  group tied, so no update; under TRL's ``scale_rewards="group"`` a small extra reward
  term breaks such ties and becomes the whole advantage);
- **comparisons at every evaluation step**, each using only the seeds that reached that
  step (the others are named): every quantity as the mean over seeds with a 95 % Student t
  interval over seeds (the seed is the unit; with 2 seeds t has 1 degree of freedom, 12.71,
  and the interval is wide) and every seed's value, and each arm's paired difference from
  ``grpo`` on the same seed;
- the exact-rho probe **counted in distinct responses**: identical samples of the same probe
  prompt count once. evals.jsonl does not hold the completion tokens, so a response is
  identified by its prompt (position // ``probe_samples``), length, exact rho, the fast
  measure's rho and KL (floats compared exactly; two different completions agreeing on all
  four would be merged, and undefined-rho responses of equal length are merged too);
- the held-out split and how many held-out questions have their commuted form in training.

Arms are reported in the order of the config's ``arms`` (names this module does not know
included), then any other run folders by name.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from entropy_gpu.analysis.intervals import TOO_SMALL, bootstrap_allowed

#: Training-batch quantities are averaged over the ``WINDOW`` steps ending at a comparison step
#: (and over the first ``WINDOW`` steps for "start").
WINDOW = 5
STEP_METRICS = ("task_reward", "corrpo_term", "rho_measure", "entropy", "length", "at_limit", "distinct2")
EVAL_METRICS = ("heldout_acc_greedy", "heldout_acc_sampled", "heldout_length", "heldout_at_limit",
                "heldout_distinct2", "heldout_repeated_trigrams")
PROBE_METRICS = ("rho_exact", "inversion_rate_exact", "rho_measure", "kl")
PAIRED = ("task_reward", "heldout_acc_greedy", "heldout_acc_sampled", "probe_rho_exact", "entropy", "length",
          "probe_kl")
# Two-sided 95 % Student t quantiles by degrees of freedom (n seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def _read(path: Path) -> list[dict]:
    from entropy_gpu.analysis.runs import read_records

    return list(read_records(path)) if path.is_file() else []


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def load_runs(out: Path, arm_order: list[str] | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> {"steps", "evals", "done"} for every run folder with records; arms in
    ``arm_order`` (the config's order, unknown names included) first, then the others by name."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for run_dir in sorted((out / "runs").glob("*-s*")):
        arm, _, seed = run_dir.name.rpartition("-s")
        if not seed.isdigit():
            continue
        steps, evals = _read(run_dir / "steps.jsonl"), _read(run_dir / "evals.jsonl")
        if steps or evals:
            runs.setdefault(arm, {})[int(seed)] = {
                "steps": sorted(steps, key=lambda r: r["step"]),
                "evals": sorted(evals, key=lambda r: r["step"]),
                "done": (run_dir / "done.json").is_file()}
    order = {arm: i for i, arm in enumerate(arm_order or [])}
    return {arm: dict(sorted(runs[arm].items()))
            for arm in sorted(runs, key=lambda a: (order.get(a, len(order)), a))}


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def interval(values: list[float | None]) -> dict[str, Any]:
    """Mean across seeds with a 95 % Student t interval (None with fewer than two seeds)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0, "per_seed": values}
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": m, "ci95": None, "n": 1, "per_seed": values}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = _T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return {"mean": m, "ci95": [m - half, m + half], "n": len(xs), "per_seed": values}


def bootstrap_mean(values: list[float | None], reps: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of the mean (the values as the unit); None below
    ``MIN_BOOTSTRAP_N`` values (too few for an interval, ``analysis/intervals.py``)."""
    xs = [v for v in values if v is not None]
    if not bootstrap_allowed(len(xs)):
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(reps))
    return [means[int(0.025 * reps)], means[int(0.975 * reps) - 1]]


# -- the probe in distinct responses -----------------------------------------------------------------

def _signature(position: int, row: dict, probe_samples: int | None) -> tuple:
    prompt = position // probe_samples if probe_samples else None
    return (prompt, row.get("length"), row.get("rho_exact"), row.get("rho_measure"), row.get("kl"))


def distinct_responses(groups: list[list[dict]], probe_samples: int | None) -> list[dict]:
    """The probe responses of one or more evaluations (one list per run, in recorded order)
    with identical samples counted once (see the module docstring for the signature)."""
    seen: dict[tuple, dict] = {}
    for rows in groups:
        for i, row in enumerate(rows):
            seen.setdefault(_signature(i, row, probe_samples), row)
    return list(seen.values())


def probe_stats(groups: list[list[dict]], probe_samples: int | None) -> dict[str, Any]:
    """n, n_distinct and the probe statistics over distinct responses."""
    distinct = distinct_responses(groups, probe_samples)
    exact = [r["rho_exact"] for r in distinct if r.get("rho_exact") is not None]
    return {"n": sum(len(rows) for rows in groups), "n_distinct": len(distinct),
            "n_distinct_defined": len(exact),
            "rho_exact": _mean(exact),
            "inversion_rate_exact": sum(r < 0 for r in exact) / len(exact) if exact else None,
            "rho_measure": _mean([r.get("rho_measure") for r in distinct]),
            "kl": _mean([r.get("kl") for r in distinct])}


# -- per run at a step -------------------------------------------------------------------------------

def _eval(run: dict, step: int) -> dict | None:
    return next((e for e in run["evals"] if e["step"] == step), None)


def last_step(run: dict) -> int:
    """The last training step a run logged (0 if none)."""
    return max((r["step"] for r in run["steps"]), default=0)


def reached(run: dict, step: int) -> bool:
    """The run has the evaluation at ``step`` and (after step 0) logged training through it."""
    return _eval(run, step) is not None and (step == 0 or last_step(run) >= step)


def zero_gradient_steps(run: dict, through: int | None = None) -> dict[str, int]:
    """Logged steps (through ``through``) with ``grad_norm == 0``, out of those with a grad norm."""
    rows = [r for r in run["steps"]
            if (through is None or r["step"] <= through) and r.get("grad_norm") is not None]
    return {"zero": sum(r["grad_norm"] == 0 for r in rows), "of": len(rows)}


def seed_values(run: dict, step: int, probe_samples: int | None) -> dict[str, Any]:
    """One run's quantities at ``step``: training-batch means over the ``WINDOW`` steps
    ending there, the evaluation's held-out numbers, the probe over distinct responses."""
    window = [r for r in run["steps"] if step - WINDOW < r["step"] <= step]
    values: dict[str, Any] = {key: _mean([r.get(key) for r in window]) for key in STEP_METRICS}
    ev = _eval(run, step) or {}
    values.update({key: ev.get(key) for key in EVAL_METRICS})
    probe = probe_stats([ev.get("probe_responses", [])], probe_samples)
    values.update({f"probe_{key}": probe[key] for key in (*PROBE_METRICS, "n", "n_distinct")})
    values["zero_gradient_steps"] = zero_gradient_steps(run, step)["zero"] if step else None
    return values


def compare_at(runs: dict, step: int, probe_samples: int | None) -> dict[str, Any]:
    """Every arm at ``step`` over the seeds that reached it; paired differences from grpo."""
    arms: dict[str, Any] = {}
    per_seed: dict[str, dict[int, dict]] = {}
    for arm, by_seed in runs.items():
        seeds = [s for s in by_seed if reached(by_seed[s], step)]
        missing = {str(s): last_step(by_seed[s]) for s in by_seed if s not in seeds}
        if not seeds:
            arms[arm] = {"seeds": [], "not_reached": missing}
            continue
        values = {s: seed_values(by_seed[s], step, probe_samples) for s in seeds}
        per_seed[arm] = values
        row: dict[str, Any] = {"seeds": seeds, "not_reached": missing}
        for key in values[seeds[0]]:
            row[key] = interval([values[s][key] for s in seeds])
        groups = [_eval(by_seed[s], step)["probe_responses"] for s in seeds]
        pooled = probe_stats(groups, probe_samples)
        distinct = distinct_responses(groups, probe_samples)
        pooled["rho_exact_ci95_bootstrap"] = bootstrap_mean([r.get("rho_exact") for r in distinct])
        row["probe_pooled_distinct"] = pooled
        arms[arm] = row
    paired: dict[str, Any] = {}
    if "grpo" in per_seed:
        for arm, values in per_seed.items():
            if arm == "grpo":
                continue
            seeds = [s for s in values if s in per_seed["grpo"]]
            diffs = {}
            for key in PAIRED:
                diffs[key] = interval([None if values[s][key] is None or per_seed["grpo"][s][key] is None
                                       else values[s][key] - per_seed["grpo"][s][key] for s in seeds])
            paired[arm] = {"seeds": seeds, **diffs}
    return {"arms": arms, "minus_grpo_same_seed": paired}


def length_buckets(limit: int | None) -> list[tuple[str, int, int]]:
    """(label, lowest, highest) completion lengths of the buckets the exact rho is reported by."""
    top = (limit or 10**6) - 1
    buckets = [(lo, min(hi, top)) for lo, hi in ((0, 9), (10, 12), (13, top)) if lo <= min(hi, top)]
    labels = [f"<= {hi} tokens" if lo == 0 else f"{lo}-{hi}" for lo, hi in buckets]
    return ([(label, lo, hi) for label, (lo, hi) in zip(labels, buckets)]
            + ([(f"{limit} (the limit)", limit, limit)] if limit else []))


def rho_by_length(runs: dict, config: dict) -> dict[str, Any]:
    """Exact rho of the distinct probe responses by completion length, per arm and over all
    arms, pooled over seeds and the evaluations after step 0 (step 0 once, as "start")."""
    probe_samples = config.get("probe_samples")
    buckets = length_buckets(config.get("max_completion_length"))

    def table(groups: list[list[dict]]) -> dict[str, Any]:
        rows = [r for group in groups for r in distinct_responses([group], probe_samples)]
        out = {}
        for label, lo, hi in buckets:
            rhos = [r["rho_exact"] for r in rows if lo <= (r.get("length") or 0) <= hi
                    and r.get("rho_exact") is not None]
            out[label] = {"mean": _mean(rhos), "n_distinct": len(rhos)}
        return out

    trained = {arm: [e.get("probe_responses", []) for run in by_seed.values() for e in run["evals"]
                     if e["step"]] for arm, by_seed in runs.items()}
    starts = [e.get("probe_responses", []) for by_seed in runs.values() for run in by_seed.values()
              for e in run["evals"] if e["step"] == 0]
    result = {"start": table([starts[0]] if starts else [])}
    result.update({arm: table(groups) for arm, groups in trained.items()})
    result["all arms"] = table([g for groups in trained.values() for g in groups])
    return result


def measure_agreement(runs: dict, config: dict) -> dict[str, Any]:
    """How the default fast measure's per-response rho tracks the exact one on the same
    distinct probe responses (every run and evaluation, step 0 once): Pearson r, mean
    absolute difference, sign agreement and bias (fast minus exact)."""
    import torch

    from entropy_gpu import pearson

    probe_samples = config.get("probe_samples")
    groups, start_seen = [], False
    for by_seed in runs.values():
        for run in by_seed.values():
            for e in run["evals"]:
                if e["step"] == 0 and start_seen:
                    continue
                start_seen |= e["step"] == 0
                groups.append(e.get("probe_responses", []))
    pairs = [(r["rho_exact"], r["rho_measure"]) for group in groups
             for r in distinct_responses([group], probe_samples)
             if r.get("rho_exact") is not None and r.get("rho_measure") is not None]
    if len(pairs) < 3:
        return {"n_distinct": len(pairs)}
    exact = torch.tensor([e for e, _ in pairs], dtype=torch.float64)
    fast = torch.tensor([f for _, f in pairs], dtype=torch.float64)
    r = pearson(exact, fast)
    return {"n_distinct": len(pairs), "pearson_r": float(r.corr) if bool(r.valid) else None,
            "mean_abs_difference": float((fast - exact).abs().mean()),
            "sign_agreement": float(((fast < 0) == (exact < 0)).double().mean()),
            "bias_fast_minus_exact": float((fast - exact).mean())}


# -- the held-out split ---------------------------------------------------------------------------

def split_summary(config: dict, provenance: dict) -> dict[str, Any] | None:
    """For the addition task: which split the records used and how many held-out (and probe)
    questions have their commuted form ``b + a`` among the training prompts."""
    if config.get("task") != "addition" or "heldout" not in config:
        return None
    from entropy_gpu.experiments.corrpo_design import addition_problems

    def leaks(split: str) -> dict[str, Any]:
        train, heldout = addition_problems(config["heldout"], split=split)
        operands = lambda p: tuple(p["question"].removeprefix("What is ").split("?")[0].split(" + "))
        trained = {operands(p) for p in train}
        leaked = [operands(p)[::-1] in trained for p in heldout]
        probe = leaked[:config.get("probe_prompts", 0)]
        return {"split": split, "heldout": len(heldout), "heldout_commuted_in_training": sum(leaked),
                "probe": len(probe), "probe_commuted_in_training": sum(probe)}

    split = config.get("addition_split") or provenance.get("addition_split")
    if split:
        return {"recorded": True, **leaks(split)}
    return {"recorded": False, "by_split": [leaks("ordered"), leaks("pair")]}


# -- the summary -----------------------------------------------------------------------------------

def summarize(runs: dict, config: dict, provenance: dict | None = None) -> dict[str, Any]:
    """Run status per arm and the comparison at every evaluation step."""
    provenance = provenance or {}
    planned = config.get("steps")
    probe_samples = config.get("probe_samples")
    status: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        seeds = list(by_seed)
        finished = [by_seed[s]["done"] for s in seeds]
        start = {key: interval([_mean([r.get(key) for r in by_seed[s]["steps"][:WINDOW]]) for s in seeds])
                 for key in ("task_reward", "entropy", "length")}
        status[arm] = {
            "status": "finished" if all(finished) else "partial", "in_config": arm in config.get("arms", []),
            "seeds": seeds, "finished": finished, "last_step": [last_step(by_seed[s]) for s in seeds],
            "planned_steps": planned, "eval_steps": [[e["step"] for e in by_seed[s]["evals"]] for s in seeds],
            "zero_gradient_steps": [zero_gradient_steps(by_seed[s]) for s in seeds],
            "first_steps": start, "commit": (provenance.get("commits") or {}).get(arm)}
    steps = sorted({e["step"] for by_seed in runs.values() for run in by_seed.values() for e in run["evals"]})
    return {"runs": status, "rho_exact_by_length": rho_by_length(runs, config),
            "fast_measure_vs_exact": measure_agreement(runs, config),
            "greedy_examples_last_eval": {
                f"{arm}-s{s}": {"step": by_seed[s]["evals"][-1]["step"],
                                "examples": by_seed[s]["evals"][-1].get("greedy_examples", [])}
                for arm, by_seed in runs.items() for s in by_seed if by_seed[s]["evals"]},
            "at_step": {str(step): compare_at(runs, step, probe_samples)
                        for step in sorted(steps, reverse=True)}}


# -- Markdown ------------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _cell(entry: dict | None, digits: int = 2, sign: bool = False) -> str:
    """``mean [t interval] (seed values)`` of an :func:`interval` entry; one seed: no interval."""
    if not entry or entry["mean"] is None:
        return "n/a"
    seeds = ", ".join(_num(v, digits, sign) for v in entry["per_seed"])
    ci = (f" [{_num(entry['ci95'][0], digits, sign)}, {_num(entry['ci95'][1], digits, sign)}]"
          if entry["ci95"] else "")
    return f"{_num(entry['mean'], digits, sign)}{ci} ({seeds})"


def _arm_label(arm: str, info: dict) -> str:
    if info["status"] == "finished":
        return arm
    return f"{arm} (partial: steps {', '.join(str(s) for s in info['last_step'])} of {info['planned_steps']})"


def _runs_table(summary: dict) -> list[str]:
    lines = ["| arm | status | seeds | last step reached (per seed) | evaluations at | zero-gradient steps "
             "(grad_norm = 0) / steps logged | task reward, first 5 steps | wall (s) | commit |",
             "|---" * 9 + "|"]
    walls = summary["wall_seconds"]
    for arm, info in summary["runs"].items():
        zero = ", ".join(f"{z['zero']}/{z['of']}" for z in info["zero_gradient_steps"])
        wall = ", ".join(f"{walls[f'{arm}-s{s}']:.0f}" if f"{arm}-s{s}" in walls else "n/a"
                         for s in info["seeds"])
        lines.append(f"| {arm} | {info['status']} | {', '.join(map(str, info['seeds']))} "
                     f"| {', '.join(map(str, info['last_step']))} of {info['planned_steps']} "
                     f"| {', '.join(map(str, info['eval_steps'][0])) if info['eval_steps'] else ''} "
                     f"| {zero} | {_cell(info['first_steps']['task_reward'])} | {wall} "
                     f"| {info['commit'] or 'n/a'} |")
    return lines


def _split_lines(split: dict | None) -> list[str]:
    if split is None:
        return []
    lines = ["## Held-out split", ""]
    describe = lambda s: (f"split `{s['split']}`: {s['heldout_commuted_in_training']} of {s['heldout']} "
                          f"held-out questions (and {s['probe_commuted_in_training']} of the {s['probe']} "
                          "probe questions) have their commuted form b + a among the training prompts")
    if split["recorded"]:
        lines.append(f"These records used the {describe(split)}.")
    else:
        lines.append("The records do not say which split they used (neither the config nor provenance.json): "
                     + "; ".join(describe(s) for s in split["by_split"]) + ".")
    return lines + [""]


COLUMNS = (
    ("task reward, train batch", "task_reward", 2, False),
    ("held-out acc. greedy", "heldout_acc_greedy", 2, False),
    ("held-out acc. sampled", "heldout_acc_sampled", 2, False),
    ("exact rho, distinct probe responses", "probe_rho_exact", 2, True),
    ("exact-rho inversion rate", "probe_inversion_rate_exact", 2, False),
    ("probe responses: distinct / n", None, 0, False),
    ("mean token entropy (nats), train batch", "entropy", 2, False),
    ("length (tokens), train batch", "length", 1, False),
    ("at length limit, train batch", "at_limit", 2, False),
    ("KL to start (k1, distinct probe responses)", "probe_kl", 2, False),
    ("zero-gradient steps through this step", "zero_gradient_steps", 0, False),
)


def _comparison(step: str, block: dict, summary: dict) -> list[str]:
    runs = summary["runs"]
    present = {arm: row for arm, row in block["arms"].items() if row["seeds"]}
    absent = [f"{arm} seed {s} ("
              + (f"stopped at step {last})" if last < int(step) else "no evaluation there)")
              for arm, row in block["arms"].items() for s, last in row["not_reached"].items()]
    window = f"steps {max(1, int(step) - WINDOW + 1)}-{step}" if int(step) else "none (not trained yet)"
    lines = [f"## At step {step}", "",
             f"Only the seeds that reached step {step}: "
             + ("every seed of every arm." if not absent else "not reached: " + "; ".join(absent) + ".")
             + f" Training-batch columns: mean over {window}. Each cell: mean over seeds "
             "[95 % t interval over seeds; with 2 seeds t(1) = 12.71] (each seed's value). The probe is "
             "counted in distinct responses (identical samples once).", ""]
    head = ("| arm | seeds | " + " | ".join(c[0] for c in COLUMNS) + " | exact rho pooled over seeds' "
            "distinct responses [bootstrap 95 %, responses as unit: ignores seed-to-seed variation] |")
    lines += [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for arm, row in present.items():
        cells = []
        for _, key, digits, sign in COLUMNS:
            if key is None:
                cells.append(", ".join(f"{d}/{n}" for d, n in zip(row["probe_n_distinct"]["per_seed"],
                                                                   row["probe_n"]["per_seed"])))
            elif key == "zero_gradient_steps":
                cells.append("n/a" if row[key]["mean"] is None else
                             ", ".join(str(v) for v in row[key]["per_seed"]) + f" of {step}")
            else:
                cells.append(_cell(row[key], digits, sign))
        pooled = row["probe_pooled_distinct"]
        ci = pooled["rho_exact_ci95_bootstrap"]
        pooled_cell = (f"{_num(pooled['rho_exact'], 2, True)}"
                       + (f" [{_num(ci[0], 2, True)}, {_num(ci[1], 2, True)}]" if ci else f" [{TOO_SMALL}]")
                       + f" (n distinct {pooled['n_distinct']} of {pooled['n']})")
        lines.append(f"| {_arm_label(arm, runs[arm])} | {', '.join(map(str, row['seeds']))} | "
                     + " | ".join(cells) + f" | {pooled_cell} |")
    paired = block["minus_grpo_same_seed"]
    if paired and int(step):
        lines += ["", f"Arm minus `grpo` on the same seed at step {step} (seeds where both reached it):", "",
                  "| arm | seeds | " + " | ".join(PAIRED) + " |", "|---|---|" + "---|" * len(PAIRED)]
        for arm, diffs in paired.items():
            lines.append(f"| {arm} | {', '.join(map(str, diffs['seeds']))} | "
                         + " | ".join(_cell(diffs[k], 2, True) for k in PAIRED) + " |")
    return lines + [""]


def _placement_lines(config: dict) -> list[str]:
    """Where the reward terms enter the advantage (TRL's ``scale_rewards``), when run.json says
    (records written before the field existed ran TRL's default, "group", and get no section)."""
    if "scale_rewards" not in config:
        return []
    from entropy_gpu.experiments.corrpo_design import GROUP_ARMS

    group = [arm for arm in config.get("arms", []) if arm in GROUP_ARMS]
    others = [arm for arm in config.get("arms", []) if arm not in GROUP_ARMS]
    text = f"TRL's `scale_rewards`: `{config['scale_rewards']}` for {', '.join(others) or 'no arm'}"
    if group:
        text += f"; `group` for {', '.join(group)}"
    return ["## Reward placement", "", text + ".", ""]


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: runs, split, then one comparison per evaluation step."""
    lines = ["# CorR-PO training experiment: summary", "",
             "Generated by `entropy_gpu.experiments.corrpo_report` from the raw records in `runs/` "
             "(do not edit; rerun "
             "`python -m entropy_gpu.experiments.corrpo_training --report-only --out DIR`).",
             "", "## Runs", "",
             "A run without `done.json` is *partial*: it is reported up to the last step it reached, and "
             "compared with the others only at steps it reached. A zero-gradient step is one whose "
             "`grad_norm` is 0: every group's rewards tied, so no update.", ""]
    lines += _runs_table(summary) + [""]
    lines += _placement_lines(summary.get("config") or {})
    lines += _split_lines(summary.get("split"))
    by_length = summary["rho_exact_by_length"]
    labels = list(next(iter(by_length.values())))
    lines += ["## Exact rho by completion length", "",
              "Distinct probe responses, pooled over seeds and the evaluations after step 0 (start: step 0, "
              "the same policy in every run). Each cell: mean exact rho (n distinct responses).", "",
              "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, cells in by_length.items():
        lines.append(f"| {name} | " + " | ".join(f"{_num(c['mean'], 2, True)} ({c['n_distinct']})"
                                                 for c in cells.values()) + " |")
    agree = summary["fast_measure_vs_exact"]
    if agree.get("pearson_r") is not None:
        lines += ["", "## The default fast measure against the exact one", "",
                  f"Per-response rho on the same {agree['n_distinct']} distinct probe responses "
                  "(every run and "
                  f"evaluation, step 0 once): Pearson r {agree['pearson_r']:.3f}, mean absolute difference "
                  f"{agree['mean_abs_difference']:.3f}, same sign in {100 * agree['sign_agreement']:.0f} %, "
                  f"bias (fast minus exact) {agree['bias_fast_minus_exact']:+.3f}."]
    lines += ["", "## Greedy answers at each run's last evaluation (first held-out question)", "",
              "| run | step | greedy completion |", "|---|---|---|"]
    for run, rec in summary["greedy_examples_last_eval"].items():
        text = json.dumps(rec["examples"][0] if rec["examples"] else "")[1:-1].replace("|", "\\|")
        lines.append(f"| {run} | {rec['step']} | `{text}` |")
    lines.append("")
    for step, block in summary["at_step"].items():
        lines += _comparison(step, block, summary)
    return "\n".join(lines).rstrip() + "\n"


# -- plots ---------------------------------------------------------------------------------------

ARM_COLOURS = {"grpo": "#444444", "corrpo": "#1f77b4", "corrpo_flipped": "#d62728",
               "entropy_bonus": "#2ca02c", "corrpo_logit": "#9467bd"}
_MORE_COLOURS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _colours(arms: list[str]) -> dict[str, str]:
    others = iter(_MORE_COLOURS * (len(arms) // len(_MORE_COLOURS) + 1))
    return {arm: ARM_COLOURS.get(arm) or next(others) for arm in arms}


def _smooth(xs: list[float | None], k: int = 5) -> list[float]:
    out = []
    for i in range(len(xs)):
        window = [x for x in xs[max(0, i - k + 1):i + 1] if x is not None]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def plot(runs: dict, path: Path, summary: dict, title: str = "") -> None:
    """Six panels: per-step curves (mean over the seeds that reached each step, band = range,
    5-step moving average) and checkpoint values (mean over seeds, bars = range); a partial
    arm's curve stops where its runs stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe_samples = summary["config"].get("probe_samples")
    panels = [("steps", "task_reward", "task reward (train batch)"),
              ("steps", "rho_measure", "rho of the default measure (train batch)"),
              ("steps", "entropy", "mean token entropy (nats)"),
              ("steps", "length", "completion length (tokens)"),
              ("evals", "rho_exact", "exact rho, distinct probe responses"),
              ("evals", "heldout_acc_sampled", "held-out accuracy (sampled)")]
    colours = _colours(list(runs))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (kind, key, label) in zip(axes.flat, panels):
        for arm, by_seed in runs.items():
            by_step: dict[int, list[float]] = {}
            for run in by_seed.values():
                rows = run[kind]
                if kind == "steps":
                    ys = _smooth([r.get(key) for r in rows])
                elif key == "rho_exact":
                    ys = [probe_stats([r.get("probe_responses", [])], probe_samples)["rho_exact"]
                          for r in rows]
                else:
                    ys = [r.get(key) for r in rows]
                for r, y in zip(rows, ys):
                    if y is not None and not math.isnan(y):
                        by_step.setdefault(r["step"], []).append(y)
            if not by_step:
                continue
            xs = sorted(by_step)
            mean = [sum(by_step[x]) / len(by_step[x]) for x in xs]
            lo, hi = [min(by_step[x]) for x in xs], [max(by_step[x]) for x in xs]
            info = summary["runs"][arm]
            name = f"{arm} (n={len(by_seed)} seeds" + (
                f", partial: to step {max(info['last_step'])})" if info["status"] == "partial" else ")")
            if kind == "steps":
                ax.plot(xs, mean, color=colours[arm], label=name)
                ax.fill_between(xs, lo, hi, color=colours[arm], alpha=0.15, linewidth=0)
            else:
                yerr = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
                ax.errorbar(xs, mean, yerr=yerr, color=colours[arm], marker="o", capsize=3, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if key.startswith("rho"):
            ax.axhline(0, color="black", linewidth=0.6)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle(title or "CorR-PO training experiment: lines = mean over seeds, band/bars = range over "
                 "seeds; per-step curves are 5-step moving averages", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, plots: bool = True) -> dict[str, Any]:
    """``OUT/summary.json``, ``OUT/summary.md`` and (``plots``) ``OUT/curves.png`` from the
    run folders; returns the summary."""
    from entropy_gpu.analysis.runs import write_json, write_text_atomic

    out = Path(out)
    config = _read_json(out / "run.json") or {}
    provenance = _read_json(out / "provenance.json") or {}
    runs = load_runs(out, config.get("arms"))
    walls = {p.parent.name: json.loads(p.read_text())["seconds"]
             for p in sorted((out / "runs").glob("*/wall.json"))}
    summary = {"config": config, "provenance": provenance,
               "calibration": _read_json(out / "calibration.json"),
               "wall_seconds": walls, "window_steps": WINDOW, "split": split_summary(config, provenance),
               **summarize(runs, config, provenance)}
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", markdown(summary))
    if plots and runs:
        plot(runs, out / "curves.png", summary)
    return summary
