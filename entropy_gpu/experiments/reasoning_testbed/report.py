"""The testbed's report, from the raw records only: ``summary.json``, ``summary.md`` and plots.

Intervals: 95 % Student-t over seeds (the seed is the unit) for RL results, shown only with
3 or more seeds; paired by seed for differences between arms. Observation results (one
checkpoint, many responses) use a t interval over responses.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from entropy_gpu.analysis.runs import read_records, write_json, write_text_atomic

from .config import TestbedConfig

#: Two-sided 95 % Student-t quantiles by degrees of freedom (1..30); beyond 30, 1.96-ish.
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
#: One-sided 80 % Student-t quantiles by degrees of freedom (1..30); beyond 30, 0.84-ish.
_T80 = (
    1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879,
    0.876, 0.873, 0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860,
    0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854,
)  # fmt: skip
MIN_N_FOR_INTERVAL = 3
PRIMARY = "acc_sampled"
#: PLAN.md's decision rule: corrpo against each baseline, then the two readings built on them.
BASELINES = ("grpo", "null", "corrpo_flipped")


def _sd(values: list[float], mean: float) -> float:
    """Sample standard deviation (n - 1 in the denominator)."""
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_ci(values: list[float]) -> dict:
    """Mean, 95 % t interval (None below ``MIN_N_FOR_INTERVAL`` values) and n."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = sum(values) / n
    if n < MIN_N_FOR_INTERVAL:
        return {"mean": mean, "lo": None, "hi": None, "n": n}
    sd = _sd(values, mean)
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def detectable_difference(diffs: list[float]) -> float | None:
    """The smallest mean paired difference a two-sided 5 % t test over these seeds detects with
    80 % power, at their spread: (t_0.975 + t_0.80) x sd / sqrt(n). None below the minimum n."""
    diffs = [d for d in diffs if d is not None]
    n = len(diffs)
    if n < MIN_N_FOR_INTERVAL:
        return None
    sd = _sd(diffs, sum(diffs) / n)
    df = n - 1
    t95, t80 = (_T95[df - 1], _T80[df - 1]) if df <= len(_T95) else (1.96, 0.8416)
    return (t95 + t80) * sd / math.sqrt(n)


def _fmt(ci: dict, digits: int = 3) -> str:
    if ci["mean"] is None:
        return "–"
    text = f"{ci['mean']:+.{digits}f}" if ci.get("signed") else f"{ci['mean']:.{digits}f}"
    if ci["lo"] is not None:
        text += (
            f" [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"
            if ci.get("signed")
            else f" [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
        )
    return text + f" (n={ci['n']})"


def _runs(out: Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> {"evals": [...], "steps": [...], "done": bool, "record": done.json or None}."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in sorted((out / "runs").glob("*-s*")) if (out / "runs").is_dir() else []:
        arm, seed = folder.name.rsplit("-s", 1)
        evals = list(read_records(folder / "evals.jsonl")) if (folder / "evals.jsonl").is_file() else []
        steps = list(read_records(folder / "steps.jsonl")) if (folder / "steps.jsonl").is_file() else []
        done = folder / "done.json"
        runs.setdefault(arm, {})[int(seed)] = {
            "evals": evals,
            "steps": steps,
            "done": done.is_file(),
            "record": json.loads(done.read_text()) if done.is_file() else None,
        }
    return runs


def provenance(runs: dict[str, dict[int, dict]]) -> dict:
    """Per arm, from the finished runs' done.json: the commits and commands they ran, and the CPU
    minutes of the runs finished in one attempt (a resumed run records its last attempt only)."""
    table = {}
    for arm, seeds in runs.items():
        records = [s["record"] for s in seeds.values() if s["done"]]
        commits: dict[str, int] = {}
        for r in records:
            key = r["commit"][:7] if r.get("commit") else "unrecorded"
            key += " (dirty)" if r.get("dirty") else ""
            commits[key] = commits.get(key, 0) + 1
        table[arm] = {
            "finished": len(records),
            "commits": dict(sorted(commits.items())),
            "commands": sorted({r["command"] for r in records if r.get("command")}),
            "cpu_minutes_one_attempt": [
                r["cpu_seconds_last_attempt"] / 60
                for r in records
                if r.get("resumed_from_step") == 0 and r.get("cpu_seconds_last_attempt") is not None
            ],
        }
    return table


def _eval_value(record: dict, key: str):
    if key in record:
        return record[key]
    return record.get("probe", {}).get(key)


EVAL_KEYS = (
    "acc_sampled",
    "acc_greedy",
    "rho_exact",
    "inversion_rate_exact",
    "rho_same_position",
    "mean_entropy",
    "kl",
    "length_sampled",
    "at_limit_sampled",
    "distinct2_sampled",
    "repeated_trigrams_sampled",
    "agreement_same_position",
    "sign_agreement_same_position",
)


def _by_number(key: str) -> tuple[int, str]:
    """Order "2" < "10" and "0-39" < "40-59" < ">=80" by their first number."""
    digits = re.search(r"\d+", key)
    return (int(digits.group()) if digits else -1, key)


def _keyed(records: list[dict | None]) -> dict[str, dict]:
    """Seed-level mean and interval of each key of per-seed dicts (difficulty, length bucket)."""
    keys = sorted({k for r in records if r for k in r}, key=_by_number)
    return {k: mean_ci([r.get(k) for r in records if r]) for k in keys}


def rl_summary(config: dict, runs: dict[str, dict[int, dict]]) -> dict:
    """Per arm and evaluation step: seed-level means and intervals; paired differences at the
    final step against grpo (and corrpo against null, corrpo_flipped)."""
    arms = [a for a in config.get("arms", []) if a in runs] + sorted(
        a for a in runs if a not in config.get("arms", [])
    )
    final = config.get("rl_steps")
    summary: dict = {"arms": {}, "paired": {}}
    for arm in arms:
        seeds = runs[arm]
        steps = sorted({r["step"] for s in seeds.values() for r in s["evals"]})
        per_step = {}
        for step in steps:
            at = {seed: next((r for r in s["evals"] if r["step"] == step), None) for seed, s in seeds.items()}
            at = {seed: r for seed, r in at.items() if r is not None}
            per_step[str(step)] = {k: mean_ci([_eval_value(r, k) for r in at.values()]) for k in EVAL_KEYS}
            per_step[str(step)]["seeds"] = sorted(at)
            per_step[str(step)]["acc_sampled_by_difficulty"] = _keyed(
                [r.get("acc_sampled_by_difficulty") for r in at.values()]
            )
            per_step[str(step)]["rho_exact_by_length"] = _keyed(
                [
                    {b: v.get("rho_exact") for b, v in r.get("probe", {}).get("by_length", {}).items()}
                    for r in at.values()
                ]
            )
        # finished runs only, like the columns beside it in summary.md
        zero_grad = [
            sum(1 for r in s["steps"] if r.get("grad_norm") == 0) for s in seeds.values() if s["done"]
        ]
        summary["arms"][arm] = {
            "seeds_done": sorted(seed for seed, s in seeds.items() if s["done"]),
            "seeds_partial": {
                seed: max((r["step"] for r in s["steps"]), default=0)
                for seed, s in seeds.items()
                if not s["done"]
            },
            "zero_gradient_steps": zero_grad,
            "by_step": per_step,
        }
    comparisons = [
        ("corrpo", "grpo"),
        ("corrpo", "null"),
        ("corrpo", "corrpo_flipped"),
        ("corrpo", "entropy_bonus"),
        ("entropy_bonus", "grpo"),
        ("null", "grpo"),
        ("corrpo_flipped", "grpo"),
        ("corrpo_exact", "grpo"),
        ("corrpo_group", "grpo_group"),
    ]
    for a, b in comparisons:
        if a not in runs or b not in runs or final is None:
            continue
        common = sorted(set(runs[a]) & set(runs[b]))
        result = {}
        for key in (PRIMARY, "acc_greedy", "rho_exact", "mean_entropy", "kl", "length_sampled"):
            diffs = []
            for seed in common:
                ra = next((r for r in runs[a][seed]["evals"] if r["step"] == final), None)
                rb = next((r for r in runs[b][seed]["evals"] if r["step"] == final), None)
                if (
                    ra is not None
                    and rb is not None
                    and _eval_value(ra, key) is not None
                    and _eval_value(rb, key) is not None
                ):
                    diffs.append(_eval_value(ra, key) - _eval_value(rb, key))
            result[key] = {**mean_ci(diffs), "signed": True}
            if key == PRIMARY:
                result[key]["detectable_80"] = detectable_difference(diffs)
                result[key]["seeds"] = [
                    seed
                    for seed in common
                    if any(r["step"] == final for r in runs[a][seed]["evals"])
                    and any(r["step"] == final for r in runs[b][seed]["evals"])
                ]
        summary["paired"][f"{a} - {b}"] = result
    summary["decision"] = decision(summary["paired"], planned_seeds=len(config.get("seeds", [])))
    summary["provenance"] = provenance({arm: runs[arm] for arm in arms})
    return summary


def _side(paired: dict, name: str) -> str:
    """Where the primary endpoint's 95 % interval of ``name`` lies: "above 0", "below 0",
    "contains 0", or "undecided" (no interval: fewer than ``MIN_N_FOR_INTERVAL`` paired seeds)."""
    d = paired.get(name, {}).get(PRIMARY)
    if not d or d["lo"] is None:
        return "undecided"
    return "above 0" if d["lo"] > 0 else "below 0" if d["hi"] < 0 else "contains 0"


def decision(paired: dict, planned_seeds: int) -> dict:
    """PLAN.md's decision rule applied to the paired differences of the primary endpoint.

    ``helps``: corrpo beats grpo and null. ``through_correlation``: it also beats corrpo_flipped
    and entropy_bonus; "generic entropy term does as well" when corrpo - entropy_bonus contains 0
    while entropy_bonus beats grpo. Each reading is "yes", "no evidence" or "undecided" (some
    comparison has fewer than 3 paired seeds); ``provisional`` while fewer seeds than planned.
    """
    sides = {
        name: _side(paired, name)
        for name in (*(f"corrpo - {b}" for b in BASELINES), "corrpo - entropy_bonus", "entropy_bonus - grpo")
    }

    def reading(names: list[str]) -> str:
        if any(sides[n] == "undecided" for n in names):
            return "undecided"
        return "yes" if all(sides[n] == "above 0" for n in names) else "no evidence"

    helps = reading(["corrpo - grpo", "corrpo - null"])
    through = reading(["corrpo - grpo", "corrpo - null", "corrpo - corrpo_flipped", "corrpo - entropy_bonus"])
    if sides["corrpo - entropy_bonus"] == "contains 0" and sides["entropy_bonus - grpo"] == "above 0":
        through = "generic entropy term does as well"
    n_used = [len(paired.get(name, {}).get(PRIMARY, {}).get("seeds", [])) for name in sides]
    return {
        "endpoint": PRIMARY,
        "sides": sides,
        "helps": helps,
        "through_correlation": through,
        "seeds_paired_min": min(n_used) if n_used else 0,
        "seeds_planned": planned_seeds,
        "provisional": (min(n_used) if n_used else 0) < planned_seeds,
    }


def observe_summary(out: Path) -> list[dict]:
    path = out / "observe" / "records.jsonl"
    rows = []
    for r in sorted(read_records(path), key=lambda r: r["sft_step"]) if path.is_file() else []:
        responses = r.get("probe_responses", [])
        rho = mean_ci([x["rho_exact"] for x in responses])
        rows.append(
            {
                "sft_step": r["sft_step"],
                "acc_greedy": r["acc_greedy"],
                "acc_sampled": r["acc_sampled"],
                "acc_sampled_by_difficulty": r["acc_sampled_by_difficulty"],
                "rho_exact": {**rho, "signed": True},
                "probe": r["probe"],
                "sia": r["sia"],
            }
        )
    return rows


def _sft_summary(out: Path) -> dict:
    log = out / "sft" / "log.jsonl"
    records = list(read_records(log)) if log.is_file() else []
    if not records:
        return {}
    last = records[-1]
    return {
        "steps": last["step"],
        "final_loss": last["loss"],
        "cpu_seconds": last["cpu_s"],
        "wall_seconds": last["wall_s"],
        "quick_greedy": {r["step"]: r["greedy_acc_quick"] for r in records if "greedy_acc_quick" in r},
    }


def _markdown(summary: dict) -> str:
    lines = [
        "# Reasoning testbed: CorR-PO and SIA claims on a tiny Llama",
        "",
        "Generated by `python -m entropy_gpu.experiments.reasoning_testbed --report-only --out DIR` "
        "from the raw records; nothing here is edited by hand. Plan and decision rule: PLAN.md.",
        "",
    ]
    sft = summary.get("sft") or {}
    if sft:
        lines += [
            "## SFT",
            "",
            f"{sft['steps']} steps, final loss {sft['final_loss']:.3f}, "
            f"{sft['cpu_seconds'] / 60:.1f} CPU-minutes "
            f"({sft['wall_seconds'] / 60:.1f} min wall).",
            "",
        ]
    obs = summary.get("observe") or []
    if obs:
        lines += [
            "## Across SFT checkpoints (observation)",
            "",
            "Exact rho: Pearson over a response's tokens of entropy (T = 1) and the exact Frobenius norm "
            "of the sampled token's logit gradient over q/k/v/o of every layer; one fresh sample of each "
            "probe problem, 95 % t interval over responses. Agreement: Pearson across responses of the "
            "fast measure's rho with the exact rho. SIA: conditional answer entropy (100 answers) after "
            "each worked line of a sampled trace.",
            "",
            "| SFT step | greedy acc | sampled acc | exact rho | inversion rate | same_position agreement "
            "| one_hop agreement | SIA H_0 | SIA final H (correct / wrong) | AUROC final H |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in obs:
            p, s = r["probe"], r["sia"]

            def f(x, d=2):
                return "–" if x is None else f"{x:.{d}f}"

            lines.append(
                f"| {r['sft_step']} | {r['acc_greedy']:.3f} | {r['acc_sampled']:.3f} | "
                f"{_fmt(r['rho_exact'])} | {f(p.get('inversion_rate_exact'))} | "
                f"{f(p.get('agreement_same_position'))} | {f(p.get('agreement_one_hop'))} | "
                f"{f(s.get('initial_entropy'))} | {f(s.get('final_entropy_correct'))} / "
                f"{f(s.get('final_entropy_incorrect'))} | {f(s.get('auroc_final_entropy'))} |"
            )
        lines.append("")
    rl = summary.get("rl") or {}
    if rl.get("arms"):
        lines += [
            "## RL arms",
            "",
            "Seed-level means with 95 % t intervals (n = seeds; no interval below 3 "
            "seeds). Held-out accuracy over the `heldout_n` problems of evals.jsonl, sampled at T = 1.",
            "",
            "| arm | seeds done | partial (last step) | step | sampled acc | greedy acc | exact rho "
            "| entropy | KL to start | length | zero-gradient steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        finals = {arm: max(a["by_step"], key=int) for arm, a in rl["arms"].items() if a["by_step"]}
        for arm, step in finals.items():
            a = rl["arms"][arm]
            b = a["by_step"][step]
            lines.append(
                f"| {arm} | {len(a['seeds_done'])} | {a['seeds_partial'] or '–'} | {step} | "
                f"{_fmt(b['acc_sampled'])} | {_fmt(b['acc_greedy'])} | "
                f"{_fmt({**b['rho_exact'], 'signed': True})} | {_fmt(b['mean_entropy'])} | "
                f"{_fmt(b['kl'])} | {_fmt(b['length_sampled'], 1)} | "
                f"{_fmt(mean_ci(a['zero_gradient_steps']), 1)} |"
            )
        lines.append("")
        lines += _breakdown(
            "Sampled held-out accuracy by difficulty (number of operations) at each arm's last evaluation",
            {
                f"{arm} (step {step})": rl["arms"][arm]["by_step"][step]["acc_sampled_by_difficulty"]
                for arm, step in finals.items()
            },
        )
        lines += _breakdown(
            "Exact rho on the probe samples by response length (tokens) at each arm's last evaluation; "
            "seed means of each run's bucket mean",
            {
                f"{arm} (step {step})": {
                    k: {**v, "signed": True}
                    for k, v in rl["arms"][arm]["by_step"][step]["rho_exact_by_length"].items()
                }
                for arm, step in finals.items()
            },
        )
        lines += [
            "### How the fast measure tracks the exact one during RL (question c)",
            "",
            "Pearson across the probe responses of the `same_position` rho with the exact rho, and the "
            "fraction of responses where their signs agree; seed means at each arm's last evaluation.",
            "",
            "| arm | step | agreement (Pearson) | sign agreement |",
            "|---|---|---|---|",
        ]
        for arm, step in finals.items():
            b = rl["arms"][arm]["by_step"][step]
            lines.append(
                f"| {arm} | {step} | {_fmt(b['agreement_same_position'], 2)} | "
                f"{_fmt(b['sign_agreement_same_position'], 2)} |"
            )
        lines.append("")
        if rl.get("paired"):
            lines += [
                "### Paired differences at the final step (by seed)",
                "",
                "Figure: [rl_paired.png](rl_paired.png) (accuracy, exact rho, entropy).",
                "",
                "| comparison | sampled acc | greedy acc | exact rho | entropy | KL | length |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, d in rl["paired"].items():
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        _fmt(d[k])
                        for k in (
                            "acc_sampled",
                            "acc_greedy",
                            "rho_exact",
                            "mean_entropy",
                            "kl",
                            "length_sampled",
                        )
                    )
                    + " |"
                )
            lines.append("")
        lines += _decision_lines(rl)
    if rl.get("provenance"):
        lines += _provenance_lines(rl["provenance"], summary.get("config", {}), summary.get("sft") or {})
    return "\n".join(lines) + "\n"


def _planned_runs(config: dict) -> int:
    """How many (arm, seed) runs the stored config plans; 0 where it is not a whole config."""
    try:
        return len(TestbedConfig.from_json(json.dumps(config)).runs())
    except (TypeError, ValueError):
        return 0


def _provenance_lines(table: dict, config: dict, sft: dict) -> list[str]:
    lines = [
        "## Provenance and cost of the RL runs",
        "",
        "From each finished run's done.json. CPU minutes: runs finished in one attempt (a resumed "
        "run records its last attempt only); one thread per process.",
        "",
        "| arm | finished | CPU-min per run: median [min, max] (runs) | commits (runs) |",
        "|---|---|---|---|",
    ]
    every = []
    for arm, t in table.items():
        cpu = sorted(t["cpu_minutes_one_attempt"])
        every += cpu
        spread = f"{cpu[len(cpu) // 2]:.1f} [{cpu[0]:.1f}, {cpu[-1]:.1f}] ({len(cpu)})" if cpu else "–"
        commits = ", ".join(f"{c} ({k})" for c, k in t["commits"].items()) or "–"
        lines.append(f"| {arm} | {t['finished']} | {spread} | {commits} |")
    lines.append("")
    commands = sorted({c for t in table.values() for c in t["commands"]})
    if commands:
        lines += ["Commands:", "", *(f"- `{c}`" for c in commands), ""]
    if every:
        every.sort()
        median = every[len(every) // 2]
        planned = _planned_runs(config)
        text = (
            f"Runs finished in one attempt: {len(every)}, {sum(every) / 60:.1f} CPU-hours, median "
            f"{median:.1f} CPU-minutes per run."
        )
        if planned:
            text += f" At the median, the {planned} planned runs take {planned * median / 60:.1f} CPU-hours"
            if sft.get("cpu_seconds") is not None:
                text += f", plus {sft['cpu_seconds'] / 60:.1f} CPU-minutes of SFT"
            text += "."
        lines += [text, ""]
    return lines


def _breakdown(title: str, rows: dict[str, dict[str, dict]]) -> list[str]:
    """A table of one quantity by a key (difficulty, length bucket), one row per arm."""
    keys = sorted({k for r in rows.values() for k in r}, key=_by_number)
    if not keys:
        return []
    lines = [f"### {title}", "", "| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(r[k]) if k in r else "–" for k in keys) + " |")
    return [*lines, ""]


def _decision_lines(rl: dict) -> list[str]:
    d = rl.get("decision")
    if not d:
        return []
    status = (
        f"provisional: some comparison has {d['seeds_paired_min']} of the {d['seeds_planned']} planned seeds"
        if d["provisional"]
        else f"final: every comparison has the {d['seeds_planned']} planned seeds"
    )
    lines = [
        "## Decision (PLAN.md's rule, applied by this report)",
        "",
        f"Primary endpoint: held-out sampled accuracy at the final step, paired by seed, 95 % t "
        f'interval. Status: {status}. "Detectable": the smallest mean difference a 5 % test over '
        f"these seeds would find with 80 % power, at their spread.",
        "",
        "| comparison | seeds | difference [95 % CI] | detectable (80 % power) | interval |",
        "|---|---|---|---|---|",
    ]
    for name, side in d["sides"].items():
        p = rl["paired"].get(name, {}).get(PRIMARY)
        if p is None:
            lines.append(f"| {name} | 0 | – | – | {side} (no runs) |")
            continue
        det = "–" if p.get("detectable_80") is None else f"{p['detectable_80']:.3f}"
        lines.append(f"| {name} | {p['n']} | {_fmt(p)} | {det} | {side} |")
    mark = " (provisional)" if d["provisional"] else ""
    lines += [
        "",
        f"- CorR-PO helps this model reason (beats grpo and null): **{d['helps']}**{mark}.",
        f"- ...through the correlation (also beats corrpo_flipped and entropy_bonus): "
        f"**{d['through_correlation']}**{mark}.",
        "",
    ]
    return lines


def _plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    obs = summary.get("observe") or []
    if obs:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        steps = [r["sft_step"] for r in obs]
        axes[0].plot(steps, [r["acc_greedy"] for r in obs], "o-", label="greedy")
        axes[0].plot(steps, [r["acc_sampled"] for r in obs], "s-", label="sampled (T = 1)")
        axes[0].set(xlabel="SFT step", ylabel="held-out accuracy", title="Accuracy during SFT")
        axes[0].legend()
        rho = [r["rho_exact"] for r in obs]
        axes[1].errorbar(
            steps,
            [x["mean"] for x in rho],
            yerr=[
                [x["mean"] - x["lo"] if x["lo"] is not None else 0 for x in rho],
                [x["hi"] - x["mean"] if x["hi"] is not None else 0 for x in rho],
            ],
            fmt="o-",
            capsize=3,
        )
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set(
            xlabel="SFT step",
            ylabel="mean per-response rho (exact measure)",
            title="Entropy-gradient correlation (95 % CI)",
        )
        last = obs[-1]["sia"]
        xs = [(i + 0.5) / len(last["curve_correct"]) for i in range(len(last["curve_correct"]))]
        for r, style in ((obs[len(obs) // 2], "--"), (obs[-1], "-")):
            s = r["sia"]
            axes[2].plot(xs, s["curve_correct"], "g" + style, label=f"correct, SFT {r['sft_step']}")
            axes[2].plot(xs, s["curve_incorrect"], "r" + style, label=f"wrong, SFT {r['sft_step']}")
        axes[2].set(
            xlabel="position in trace (k / K)",
            ylabel="answer entropy H_k (nats)",
            title="SIA: answer entropy along sampled traces",
        )
        axes[2].legend(fontsize=8)
        fig.suptitle("Testbed observation across SFT checkpoints (tiny Llama, chained arithmetic)")
        fig.tight_layout()
        path = out / "observe.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    rl = summary.get("rl") or {}
    if rl.get("arms"):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for arm, a in rl["arms"].items():
            steps = sorted(a["by_step"], key=int)
            x = [int(s) for s in steps]
            for ax, key in zip(axes, ("acc_sampled", "rho_exact", "mean_entropy")):
                ci = [a["by_step"][s][key] for s in steps]
                ax.plot(x, [c["mean"] for c in ci], "o-", label=f"{arm} (n={ci[-1]['n']} at step {x[-1]})")
                if all(c["lo"] is not None for c in ci):
                    ax.fill_between(x, [c["lo"] for c in ci], [c["hi"] for c in ci], alpha=0.15)
        for ax, title in zip(
            axes,
            (
                "held-out accuracy, sampled (T = 1)",
                "exact rho on probe samples",
                "mean token entropy on probe samples",
            ),
        ):
            ax.set(xlabel="RL step", title=title)
        axes[0].legend(fontsize=8)
        fig.suptitle("RL arms from the same starting policy: seed means, 95 % CI over seeds")
        fig.tight_layout()
        path = out / "rl_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if rl.get("paired"):
        paths.append(_paired_plot(plt, rl, summary.get("config", {}).get("rl_steps"), out / "rl_paired.png"))
    return paths


PAIRED_PANELS = (
    (PRIMARY, "held-out accuracy, sampled (primary endpoint)"),
    ("rho_exact", "exact rho on probe samples"),
    ("mean_entropy", "mean token entropy on probe samples"),
)


def _paired_plot(plt, rl: dict, final: int | None, path: Path) -> Path:
    """The question (b) figure: each comparison's per-seed difference at the final step, its mean
    and 95 % t interval over seeds (a mean alone where fewer than MIN_N_FOR_INTERVAL seeds pair)."""
    names = list(rl["paired"])
    decided = set(rl.get("decision", {}).get("sides", {}))
    fig, axes = plt.subplots(1, len(PAIRED_PANELS), figsize=(15, 0.45 * len(names) + 1.8), sharey=True)
    ys = list(range(len(names)))[::-1]  # the first comparison on top
    for ax, (key, title) in zip(axes, PAIRED_PANELS):
        for y, name in zip(ys, names):
            d = rl["paired"][name].get(key) or {}
            if d.get("mean") is None:
                continue
            colour = "C0" if name in decided else "C7"
            if d.get("lo") is not None:
                ax.errorbar(
                    d["mean"],
                    y,
                    xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]],
                    fmt="o",
                    color=colour,
                    capsize=3,
                )
            else:
                ax.plot(d["mean"], y, "o", color=colour, mfc="none")
        ax.axvline(0, color="grey", lw=0.8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(6))  # 3-decimal ticks would overlap
        ax.set(title=title, xlabel="difference (arm minus comparator)")
    n = [rl["paired"][name].get(PRIMARY, {}).get("n", 0) for name in names]
    axes[0].set_yticks(ys, [f"{name} (n={k})" for name, k in zip(names, n)])
    step = f"step {final}" if final is not None else "the final step"
    fig.suptitle(
        f"Paired differences at {step}: same seed, 95 % CI over seeds "
        "(blue: in PLAN.md's decision rule; open circle: under 3 seeds, no interval)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path) -> list[Path]:
    """summary.json, summary.md and the plots of ``out``; returns their paths."""
    out = Path(out)
    config = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    summary = {
        "config": config,
        "sft": _sft_summary(out),
        "observe": observe_summary(out),
        "rl": rl_summary(config, _runs(out)),
    }
    calibration = out / "start" / "calibration.json"
    if calibration.is_file():
        summary["calibration"] = json.loads(calibration.read_text())
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", _markdown(summary))
    return [out / "summary.json", out / "summary.md", *_plots(summary, out)]
