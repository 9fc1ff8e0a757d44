"""The testbed report's intervals and paired comparisons, from synthetic records."""

import json

import numpy as np
import pytest
from scipy import stats

from entropy_gpu.experiments.reasoning_testbed.report import (
    MIN_N_FOR_INTERVAL,
    detectable_difference,
    mean_ci,
    write_report,
)


@pytest.mark.parametrize("n", [3, 4, 8, 12, 31])
def test_t_interval_matches_scipy(n):
    values = list(np.random.default_rng(n).normal(0.3, 0.1, n))
    ci = mean_ci(values)
    lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (
        ci["n"] == n and ci["lo"] == pytest.approx(lo, rel=1e-3) and ci["hi"] == pytest.approx(hi, rel=1e-3)
    )


def test_no_interval_below_the_minimum():
    ci = mean_ci([0.1] * (MIN_N_FOR_INTERVAL - 1) + [None])
    assert ci["lo"] is None and ci["hi"] is None and ci["n"] == MIN_N_FOR_INTERVAL - 1


def _run(folder, seed, acc, partial=False):
    folder.mkdir(parents=True)
    evals = [
        {"step": 0, "acc_sampled": 0.2, "acc_greedy": 0.3, "probe": {"rho_exact": 0.1}},
        {"step": 4, "acc_sampled": acc, "acc_greedy": acc + 0.1, "probe": {"rho_exact": -acc}},
    ]
    (folder / "evals.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in (evals[:1] if partial else evals))
    )
    steps = [{"step": s, "grad_norm": 0.0 if s == 1 else 1.0} for s in range(1, 3 if partial else 5)]
    (folder / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    if not partial:
        (folder / "done.json").write_text("{}")


def test_paired_differences_by_seed_and_partial_runs(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"arms": ["grpo", "corrpo"], "rl_steps": 4}))
    accs = {"grpo": [0.20, 0.30, 0.25, 0.40], "corrpo": [0.25, 0.32, 0.30, 0.41]}
    for arm, values in accs.items():
        for seed, acc in enumerate(values):
            _run(tmp_path / "runs" / f"{arm}-s{seed}", seed, acc)
    _run(tmp_path / "runs" / "corrpo-s9", 9, 0.9, partial=True)  # no grpo-s9: not paired; partial
    write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    diff = summary["rl"]["paired"]["corrpo - grpo"]["acc_sampled"]
    expected = np.subtract(accs["corrpo"], accs["grpo"])
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(expected.mean())
    lo, _ = stats.t.interval(0.95, 3, loc=expected.mean(), scale=stats.sem(expected))
    assert diff["lo"] == pytest.approx(lo, abs=1e-4)  # the t table has 3 decimals
    corrpo = summary["rl"]["arms"]["corrpo"]
    assert corrpo["seeds_partial"] == {"9": 2}
    assert corrpo["zero_gradient_steps"] == [1] * 4  # finished seeds only
    assert corrpo["by_step"]["4"]["acc_sampled"]["n"] == 4  # the partial seed never reached step 4
    assert "corrpo - grpo" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("n", [3, 5, 8, 40])
def test_detectable_difference_is_the_t_test_power_formula(n):
    diffs = list(np.random.default_rng(n).normal(0.02, 0.03, n))
    df = n - 1
    expected = (stats.t.ppf(0.975, df) + stats.t.ppf(0.80, df)) * np.std(diffs, ddof=1) / np.sqrt(n)
    tolerance = 1e-3 if df <= 30 else 0.03  # 3-decimal tables; the normal quantiles beyond 30
    assert detectable_difference(diffs) == pytest.approx(expected, rel=tolerance)
    assert detectable_difference(diffs[:2]) is None


def _arms(tmp_path, accs: dict[str, list[float]], seeds: int = 4):
    arms = list(accs)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "run.json").write_text(json.dumps({"arms": arms, "rl_steps": 4, "seeds": list(range(seeds))}))
    for arm, values in accs.items():
        for seed, acc in enumerate(values):
            _run(tmp_path / "runs" / f"{arm}-s{seed}", seed, acc)
    write_report(tmp_path)
    return json.loads((tmp_path / "summary.json").read_text())["rl"]["decision"]


BASE = [0.20, 0.30, 0.25, 0.40]


def _shift(values, by, wobble=(0.0, 0.004, -0.003, 0.002)):
    return [v + by + w for v, w in zip(values, wobble)]


def test_decision_helps_through_the_correlation(tmp_path):
    accs = {
        "grpo": BASE,
        "corrpo": _shift(BASE, 0.10),
        "corrpo_flipped": _shift(BASE, -0.01, (0.003, 0.0, 0.001, -0.002)),
        "entropy_bonus": _shift(BASE, 0.0, (0.001, -0.002, 0.0, 0.003)),
        "null": _shift(BASE, 0.005, (-0.002, 0.001, 0.003, 0.0)),
    }
    d = _arms(tmp_path, accs)
    assert d["helps"] == "yes" and d["through_correlation"] == "yes" and not d["provisional"]
    assert set(d["sides"].values()) == {"above 0", "contains 0"}  # entropy_bonus - grpo contains 0
    text = (tmp_path / "summary.md").read_text()
    assert "beats grpo and null): **yes**" in text and "Status: final" in text


def test_decision_generic_entropy_term_and_no_evidence(tmp_path):
    generic = {
        "grpo": BASE,
        "corrpo": _shift(BASE, 0.10),
        "corrpo_flipped": _shift(BASE, 0.0),
        "entropy_bonus": _shift(BASE, 0.10, (0.002, -0.001, 0.0, 0.003)),
        "null": _shift(BASE, 0.0),
    }
    d = _arms(tmp_path / "a", generic)
    assert d["helps"] == "yes" and d["through_correlation"] == "generic entropy term does as well"
    no_effect = {**generic, "corrpo": _shift(BASE, 0.0, (0.01, -0.012, 0.008, -0.009))}
    d = _arms(tmp_path / "b", no_effect)
    assert d["sides"]["corrpo - grpo"] == "contains 0" and d["helps"] == "no evidence"


def test_decision_undecided_below_three_seeds_and_provisional(tmp_path):
    accs = {arm: _shift(BASE[:2], 0.1 if arm == "corrpo" else 0.0) for arm in ("grpo", "corrpo", "null")}
    d = _arms(tmp_path, accs, seeds=8)
    assert d["helps"] == "undecided" and d["provisional"] and d["seeds_paired_min"] == 0
    assert d["sides"]["corrpo - grpo"] == "undecided"
    assert "beats grpo and null): **undecided** (provisional)." in (tmp_path / "summary.md").read_text()


def test_breakdowns_by_difficulty_and_length_in_numeric_order(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"arms": ["grpo"], "rl_steps": 4}))
    for seed, scale in enumerate((1.0, 0.5, 0.0)):
        folder = tmp_path / "runs" / f"grpo-s{seed}"
        _run(folder, seed, 0.3)
        evals = [json.loads(x) for x in (folder / "evals.jsonl").read_text().splitlines()]
        evals[-1]["acc_sampled_by_difficulty"] = {"2": 0.8 * scale, "10": 0.1}
        evals[-1]["probe"]["by_length"] = {
            ">=80": {"n": 2, "rho_exact": -scale},
            "0-39": {"n": 5, "rho_exact": 0.2},
        }
        (folder / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    write_report(tmp_path)
    at = json.loads((tmp_path / "summary.json").read_text())["rl"]["arms"]["grpo"]["by_step"]["4"]
    assert list(at["acc_sampled_by_difficulty"]) == ["2", "10"]
    assert at["acc_sampled_by_difficulty"]["2"]["mean"] == pytest.approx(0.4)
    assert list(at["rho_exact_by_length"]) == ["0-39", ">=80"]
    assert (
        at["rho_exact_by_length"][">=80"]["mean"] == pytest.approx(-0.5)
        and at["rho_exact_by_length"][">=80"]["n"] == 3
    )
    assert "| grpo (step 4) | 0.400" in (tmp_path / "summary.md").read_text()


def test_paired_figure_shows_each_comparison_with_its_seed_interval(tmp_path, saved_figures):
    accs = {"grpo": BASE, "corrpo": _shift(BASE, 0.05), "null": _shift(BASE[:2], 0.0)}
    _arms(tmp_path, accs)
    paired = json.loads((tmp_path / "summary.json").read_text())["rl"]["paired"]
    figure = next(f for f in saved_figures if "Paired differences at step 4" in f._suptitle.get_text())
    accuracy = figure.axes[0]
    labels = [t.get_text() for t in accuracy.get_yticklabels()]
    assert labels == [f"{name} (n={paired[name]['acc_sampled']['n']})" for name in paired]
    assert labels[:2] == ["corrpo - grpo (n=4)", "corrpo - null (n=2)"]
    (bar,) = accuracy.containers  # corrpo - null has 2 seeds: a mean only, no interval
    (segment,) = bar.lines[2][0].get_segments()
    want = paired["corrpo - grpo"]["acc_sampled"]
    assert segment[:, 0] == pytest.approx([want["lo"], want["hi"]])
    assert bar.lines[0].get_xdata()[0] == pytest.approx(want["mean"])
    assert (tmp_path / "rl_paired.png").stat().st_size > 10_000


def test_provenance_counts_commits_and_one_attempt_cpu_time(tmp_path):
    from entropy_gpu.experiments.reasoning_testbed.config import TestbedConfig

    config = TestbedConfig(arms=["grpo", "corrpo"], seeds=[0, 1, 2], rl_steps=4).to_dict()
    (tmp_path / "run.json").write_text(json.dumps(config))
    records = {  # (commit, dirty, resumed_from_step, CPU seconds of the last attempt)
        "grpo": [("a" * 40, False, 0, 600.0), ("a" * 40, False, 0, 720.0), ("b" * 40, True, 0, 660.0)],
        "corrpo": [("a" * 40, False, 40, 120.0), (None, False, 0, 900.0), ("b" * 40, False, 0, 840.0)],
    }
    for arm, rows in records.items():
        for seed, (commit, dirty, resumed, cpu) in enumerate(rows):
            folder = tmp_path / "runs" / f"{arm}-s{seed}"
            _run(folder, seed, 0.3)
            record = {"resumed_from_step": resumed, "cpu_seconds_last_attempt": cpu, "command": "python -m x"}
            if commit:
                record |= {"commit": commit, "dirty": dirty}
            (folder / "done.json").write_text(json.dumps(record))
    write_report(tmp_path)
    table = json.loads((tmp_path / "summary.json").read_text())["rl"]["provenance"]
    assert table["grpo"]["commits"] == {"aaaaaaa": 2, "bbbbbbb (dirty)": 1}
    assert table["corrpo"]["commits"] == {"aaaaaaa": 1, "bbbbbbb": 1, "unrecorded": 1}
    assert table["corrpo"]["cpu_minutes_one_attempt"] == [15.0, 14.0]  # the resumed run left out
    text = (tmp_path / "summary.md").read_text()
    assert "| grpo | 3 | 11.0 [10.0, 12.0] (3) | aaaaaaa (2), bbbbbbb (dirty) (1) |" in text
    # 5 one-attempt runs, median 12 CPU-min: 6 planned runs take 1.2 CPU-hours.
    assert "Runs finished in one attempt: 5, 1.0 CPU-hours, median 12.0 CPU-minutes" in text
    assert "the 6 planned runs take 1.2 CPU-hours" in text
