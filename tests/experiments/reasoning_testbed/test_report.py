"""The testbed report's intervals and paired comparisons, from synthetic records."""

import json

import numpy as np
import pytest
from scipy import stats

from entropy_gpu.experiments.reasoning_testbed.report import MIN_N_FOR_INTERVAL, mean_ci, write_report


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
    assert corrpo["seeds_partial"] == {"9": 2} and corrpo["zero_gradient_steps"][0] == 1
    assert corrpo["by_step"]["4"]["acc_sampled"]["n"] == 4  # the partial seed never reached step 4
    assert "corrpo - grpo" in (tmp_path / "summary.md").read_text()
