"""The CorR-PO experiment's records and their reading: the addition split without commuted
leaks, and the report (entropy_gpu.experiments.corrpo_report) on small synthetic records:
partial runs, distinct probe responses, zero-gradient steps, seed-level intervals, unknown
arms; and the committed summary regenerated from the committed records."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from entropy_gpu.experiments import corrpo_report
from entropy_gpu.experiments.corrpo_design import addition_problems
from entropy_gpu.experiments.corrpo_training import main

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "corrpo_training"


def _operands(problems: list[dict]) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in re.fullmatch(r"What is (\d) \+ (\d)\? Answer with the number\.",
                                               p["question"]).groups()) for p in problems]


# -- the split

@pytest.mark.parametrize("seed", [1234, 0, 7])
def test_no_heldout_question_has_its_commuted_pair_in_training(seed):
    for heldout in range(1, 61):
        train, held = addition_problems(heldout, seed=seed)
        train_pairs, held_pairs = _operands(train), _operands(held)
        assert len(held_pairs) == heldout and len(train_pairs) == 81 - heldout
        assert sorted(train_pairs + held_pairs) == [(a, b) for a in range(1, 10) for b in range(1, 10)]
        assert not {(b, a) for a, b in held_pairs} & set(train_pairs)
        for p in train + held:
            a, b = _operands([p])[0]
            assert p["answer"] == str(a + b)
        # The first questions (the probe set) are distinct unordered pairs.
        firsts = held_pairs[:len({frozenset(p) for p in held_pairs})]
        assert len({frozenset(p) for p in firsts}) == len(firsts)
    assert addition_problems(16, seed=seed) == addition_problems(16, seed=seed)


def test_ordered_split_reproduces_the_committed_records_split_and_its_leak():
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(1234).shuffle(pairs)  # the split before the fix, written out independently
    train, held = addition_problems(16, split="ordered")
    assert _operands(held) == pairs[:16] and _operands(train) == pairs[16:]
    leaked = [(b, a) in set(pairs[16:]) for a, b in pairs[:16]]
    assert sum(leaked) == 13 and sum(leaked[:8]) == 7
    with pytest.raises(ValueError, match="split"):
        addition_problems(16, split="random")


# -- the report on synthetic records

def _probe(length: int, rho: float | None, kl: float = 0.1) -> dict:
    return {"length": length, "rho_exact": rho, "rho_measure": None if rho is None else rho / 2, "kl": kl}


def _write_run(out: Path, arm: str, seed: int, steps: int, grad_norms: list, probes: dict[int, list[dict]],
               done: bool, acc: float) -> None:
    run = out / "runs" / f"{arm}-s{seed}"
    run.mkdir(parents=True)
    with (run / "steps.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "task_reward": acc + step / 100, "entropy": 0.5, "length": 9.0,
                                "at_limit": 0.0, "grad_norm": grad_norms[step - 1]}) + "\n")
    with (run / "evals.jsonl").open("w") as f:
        for step, rows in probes.items():
            f.write(json.dumps({"step": step, "heldout_acc_greedy": acc,
                                "heldout_acc_sampled": acc + 0.01 * step, "probe_responses": rows}) + "\n")
    if done:
        (run / "done.json").write_text("{}")


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    out = tmp_path / "exp"
    out.mkdir()
    config = {"task": "addition", "arms": ["grpo", "zeta_arm", "corrpo"], "seeds": [0, 1], "steps": 4,
              "heldout": 16, "probe_prompts": 2, "probe_samples": 2}
    (out / "run.json").write_text(json.dumps(config))
    start = [_probe(5, -0.5), _probe(6, -0.3), _probe(7, -0.2), _probe(8, -0.1)]
    # grpo seed 0 at step 4: prompt 0's two samples identical (counted once); prompt 1's two
    # samples differ. Seed 1: all four distinct.
    g0 = [_probe(9, 0.4), _probe(9, 0.4), _probe(9, 0.1), _probe(10, 0.2)]
    g1 = [_probe(9, 0.3), _probe(11, 0.5), _probe(9, -0.1), _probe(12, 0.0)]
    _write_run(out, "grpo", 0, 4, [1.0, 0.0, 0.0, 2.0], {0: start, 2: start, 4: g0}, True, 0.5)
    _write_run(out, "grpo", 1, 4, [0.0, 1.0, None, 0.0], {0: start, 2: start, 4: g1}, True, 0.6)
    # corrpo: seed 0 partial (stopped after step 2), seed 1 finished. Prompt 0 and prompt 1 of
    # seed 1 share length and values: different prompts, so both count.
    c1 = [_probe(9, -0.2), _probe(9, -0.4), _probe(9, -0.2), _probe(9, None)]
    _write_run(out, "corrpo", 0, 2, [1.0, 1.0], {0: start, 2: start}, False, 0.4)
    _write_run(out, "corrpo", 1, 4, [1.0, 1.0, 1.0, 1.0], {0: start, 2: start, 4: c1}, True, 0.7)
    _write_run(out, "zeta_arm", 0, 4, [3.0] * 4, {0: start, 4: start}, True, 0.2)
    _write_run(out, "another", 0, 1, [1.0], {0: start}, False, 0.1)  # not in the config
    return out


def test_report_orders_arms_by_config_and_marks_partial_runs(synthetic):
    summary = corrpo_report.write_report(synthetic, plots=False)
    assert list(summary["runs"]) == ["grpo", "zeta_arm", "corrpo", "another"]
    assert summary["runs"]["corrpo"]["status"] == "partial"
    assert summary["runs"]["corrpo"]["last_step"] == [2, 4]
    assert summary["runs"]["grpo"]["status"] == "finished"
    assert summary["runs"]["another"]["in_config"] is False
    at4 = summary["at_step"]["4"]["arms"]
    assert at4["corrpo"]["seeds"] == [1] and at4["corrpo"]["not_reached"] == {"0": 2}
    assert at4["grpo"]["seeds"] == [0, 1] and at4["another"]["seeds"] == []
    assert summary["at_step"]["2"]["arms"]["corrpo"]["seeds"] == [0, 1]
    # zeta_arm has no evaluation at step 2: not reached there, though it trained past it.
    assert summary["at_step"]["2"]["arms"]["zeta_arm"]["not_reached"] == {"0": 4}
    assert "zeta_arm seed 0 (no evaluation there)" in (synthetic / "summary.md").read_text()
    # The paired difference uses only the seeds both arms reached.
    assert summary["at_step"]["4"]["minus_grpo_same_seed"]["corrpo"]["seeds"] == [1]
    md = (synthetic / "summary.md").read_text()
    section = md.split("## At step 4")[1].split("## At step")[0]
    assert "not reached: corrpo seed 0 (stopped at step 2); another seed 0 (stopped at step 1)" in section
    rows = [line.split(" | ")[0] for line in section.splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows == ["| arm", "| grpo", "| zeta_arm", "| corrpo (partial: steps 2, 4 of 4)", "| arm",
                    "| zeta_arm", "| corrpo"]


def test_probe_counted_in_distinct_responses(synthetic):
    summary = corrpo_report.write_report(synthetic, plots=False)
    grpo = summary["at_step"]["4"]["arms"]["grpo"]
    assert grpo["probe_n"]["per_seed"] == [4, 4] and grpo["probe_n_distinct"]["per_seed"] == [3, 4]
    seed0, seed1 = np.mean([0.4, 0.1, 0.2]), np.mean([0.3, 0.5, -0.1, 0.0])
    assert grpo["probe_rho_exact"]["per_seed"] == pytest.approx([seed0, seed1], abs=1e-12)
    assert grpo["probe_inversion_rate_exact"]["per_seed"] == pytest.approx([0.0, 0.25])
    pooled = grpo["probe_pooled_distinct"]
    assert (pooled["n"], pooled["n_distinct"]) == (8, 7)
    assert pooled["rho_exact"] == pytest.approx(np.mean([0.4, 0.1, 0.2, 0.3, 0.5, -0.1, 0.0]), abs=1e-12)
    # 7 distinct responses: too few for a bootstrap interval (analysis/intervals.py), and the table says so.
    assert pooled["rho_exact_ci95_bootstrap"] is None
    assert "(n distinct 7 of 8)" in (synthetic / "summary.md").read_text()
    assert "[n too small] (n distinct 7 of 8)" in (synthetic / "summary.md").read_text()
    # Same values under different prompts are different responses; undefined rho is not counted.
    corrpo = summary["at_step"]["4"]["arms"]["corrpo"]
    assert corrpo["probe_n_distinct"]["per_seed"] == [4]
    assert corrpo["probe_rho_exact"]["per_seed"] == pytest.approx([np.mean([-0.2, -0.4, -0.2])], abs=1e-12)
    # Step 0: the same starting samples in every run count once when pooled over seeds.
    assert summary["at_step"]["0"]["arms"]["grpo"]["probe_pooled_distinct"]["n_distinct"] == 4
    assert "3/4, 4/4" in (synthetic / "summary.md").read_text().split("## At step 4")[1]


def test_exact_rho_by_length_bucket(synthetic):
    config = json.loads((synthetic / "run.json").read_text())
    (synthetic / "run.json").write_text(json.dumps({**config, "max_completion_length": 11}))
    by_length = corrpo_report.write_report(synthetic, plots=False)["rho_exact_by_length"]
    assert list(by_length["grpo"]) == ["<= 9 tokens", "10-10", "11 (the limit)"]
    # grpo after step 0: step 2 (the start samples, both seeds), step 4 (g0 distinct, g1).
    short = [-0.5, -0.3, -0.2, -0.1] * 2 + [0.4, 0.1] + [0.3, -0.1]
    assert by_length["grpo"]["<= 9 tokens"]["n_distinct"] == len(short)
    assert by_length["grpo"]["<= 9 tokens"]["mean"] == pytest.approx(np.mean(short), abs=1e-12)
    assert by_length["grpo"]["10-10"] == {"mean": pytest.approx(0.2), "n_distinct": 1}
    assert by_length["grpo"]["11 (the limit)"] == {"mean": pytest.approx(0.5), "n_distinct": 1}
    assert by_length["start"]["<= 9 tokens"]["n_distinct"] == 4
    assert by_length["all arms"]["<= 9 tokens"]["n_distinct"] == sum(
        by_length[arm]["<= 9 tokens"]["n_distinct"] for arm in ("grpo", "zeta_arm", "corrpo", "another"))


def test_zero_gradient_steps_and_seed_level_intervals(synthetic):
    summary = corrpo_report.write_report(synthetic, plots=False)
    assert summary["runs"]["grpo"]["zero_gradient_steps"] == [{"zero": 2, "of": 4}, {"zero": 2, "of": 3}]
    assert summary["runs"]["corrpo"]["zero_gradient_steps"] == [{"zero": 0, "of": 2}, {"zero": 0, "of": 4}]
    at2 = summary["at_step"]["2"]["arms"]["grpo"]
    assert at2["zero_gradient_steps"]["per_seed"] == [1, 1]
    assert summary["at_step"]["4"]["arms"]["grpo"]["zero_gradient_steps"]["per_seed"] == [2, 2]
    # Seed-level 95 % t interval (the seed is the unit), against scipy.
    acc = summary["at_step"]["4"]["arms"]["grpo"]["heldout_acc_sampled"]
    values = np.array([0.5 + 0.04, 0.6 + 0.04])
    half = stats.t.ppf(0.975, 1) * values.std(ddof=1) / np.sqrt(2)
    assert acc["per_seed"] == pytest.approx(values.tolist())
    assert sum(acc["ci95"]) / 2 == pytest.approx(values.mean(), abs=1e-12)
    assert (acc["ci95"][1] - acc["ci95"][0]) / 2 == pytest.approx(half, rel=1e-4)
    # Training-batch values: the mean over the WINDOW steps ending at the step.
    reward = summary["at_step"]["2"]["arms"]["grpo"]["task_reward"]["per_seed"]
    assert reward == pytest.approx([0.5 + 0.015, 0.6 + 0.015])
    assert corrpo_report.interval([0.3])["ci95"] is None
    for n in (3, 5, 10):
        xs = np.linspace(0.0, 1.0, n) ** 2
        iv = corrpo_report.interval(xs.tolist())
        half = stats.t.ppf(0.975, n - 1) * xs.std(ddof=1) / np.sqrt(n)
        assert sum(iv["ci95"]) / 2 == pytest.approx(xs.mean(), abs=1e-12)
        assert (iv["ci95"][1] - iv["ci95"][0]) / 2 == pytest.approx(half, rel=1e-3)


def test_fast_measure_agreement_over_distinct_responses(synthetic):
    agree = corrpo_report.write_report(synthetic, plots=False)["fast_measure_vs_exact"]
    exact, fast = [], []
    for arm, seed, step in [("grpo", 0, 0), ("grpo", 0, 2), ("grpo", 0, 4), ("grpo", 1, 2), ("grpo", 1, 4),
                            ("zeta_arm", 0, 4), ("corrpo", 0, 2), ("corrpo", 1, 2), ("corrpo", 1, 4)]:
        rows = next(e for e in map(json.loads, (synthetic / "runs" / f"{arm}-s{seed}" / "evals.jsonl")
                                   .read_text().splitlines()) if e["step"] == step)["probe_responses"]
        if (arm, seed, step) == ("grpo", 0, 4):
            rows = rows[1:]  # its first two samples are one response
        exact += [r["rho_exact"] for r in rows if r["rho_exact"] is not None]
        fast += [r["rho_measure"] for r in rows if r["rho_measure"] is not None]
    exact, fast = np.array(exact), np.array(fast)
    assert agree["n_distinct"] == len(exact)
    assert agree["pearson_r"] == pytest.approx(np.corrcoef(exact, fast)[0, 1], abs=1e-9)
    assert agree["bias_fast_minus_exact"] == pytest.approx((fast - exact).mean(), abs=1e-12)
    assert agree["mean_abs_difference"] == pytest.approx(np.abs(fast - exact).mean(), abs=1e-12)
    assert agree["sign_agreement"] == pytest.approx(((fast < 0) == (exact < 0)).mean())


def test_split_in_summary_follows_provenance(synthetic):
    summary = corrpo_report.write_report(synthetic, plots=False)
    assert summary["split"]["recorded"] is False
    by = {s["split"]: s for s in summary["split"]["by_split"]}
    assert by["ordered"]["heldout_commuted_in_training"] == 13
    assert by["pair"]["heldout_commuted_in_training"] == 0
    (synthetic / "provenance.json").write_text(json.dumps({"addition_split": "ordered"}))
    summary = corrpo_report.write_report(synthetic, plots=False)
    assert summary["split"]["recorded"] and summary["split"]["probe_commuted_in_training"] == 2
    assert "13 of 16 held-out questions" in (synthetic / "summary.md").read_text()


def test_placement_in_summary_when_run_json_names_it(synthetic):
    corrpo_report.write_report(synthetic, plots=False)
    assert "## Reward placement" not in (synthetic / "summary.md").read_text()  # older records: none
    config = json.loads((synthetic / "run.json").read_text())
    config.update(scale_rewards="none", arms=["grpo", "corrpo", "grpo_group", "corrpo_group"])
    (synthetic / "run.json").write_text(json.dumps(config))
    corrpo_report.write_report(synthetic, plots=False)
    text = (synthetic / "summary.md").read_text()
    assert "TRL's `scale_rewards`: `none` for grpo, corrpo; `group` for grpo_group, corrpo_group." in text


def test_report_only_cli_writes_plots_for_partial_and_unknown_arms(synthetic):
    assert main(["--report-only", "--out", str(synthetic)]) == 0
    assert (synthetic / "curves.png").stat().st_size > 10_000
    assert json.loads((synthetic / "summary.json").read_text())["runs"]["corrpo"]["status"] == "partial"


# -- the committed records

def test_committed_summary_is_regenerated_exactly_from_the_committed_records(tmp_path):
    out = tmp_path / "corrpo_training"
    shutil.copytree(RESULTS / "runs", out / "runs")
    for name in ("run.json", "calibration.json", "provenance.json"):
        shutil.copy(RESULTS / name, out / name)
    corrpo_report.write_report(out, plots=False)
    assert (out / "summary.json").read_text() == (RESULTS / "summary.json").read_text()
    assert (out / "summary.md").read_text() == (RESULTS / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["entropy_bonus"]["status"] == "partial"
    assert summary["runs"]["entropy_bonus"]["last_step"] == [20, 20]
    assert summary["split"]["heldout_commuted_in_training"] == 13
