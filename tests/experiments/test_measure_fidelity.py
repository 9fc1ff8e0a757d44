"""The fidelity experiment end to end on a tiny model: a grad-report fidelity run as the
tuning sample, the fit, collection in two shards with resume, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entropy_gpu.cli import main as cli_main
from entropy_gpu.experiments import measure_fidelity
from entropy_gpu.experiments.measure_fidelity import CANDIDATES, FidelityConfig, agreement, main


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_fit_collect_resume_and_report(tiny_model_dir, tmp_path, keep_threads):
    tuning = tmp_path / "tuning"
    grad_report = "grad-report --fidelity --prompts 2 --samples-per-prompt 2 --max-new-tokens 6 --ks 4"
    assert cli_main([*grad_report.split(), "--model", str(tiny_model_dir), "--out", str(tuning),
                     "--norms", "fro", "--threads", "1", "--quiet"]) == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": str(tiny_model_dir), "seed": 5, "sets": [
        {"dataset": "gsm8k", "first": 30, "count": 2, "max_new_tokens": 6},
        {"dataset": "math500", "first": 3, "count": 1, "max_new_tokens": 5}]}))
    out = tmp_path / "out"

    def run(*extra: str) -> int:
        return main(["--config", str(config), "--out", str(out), "--threads", "1", "--quiet", *extra])

    assert run("--fit", str(tuning / "partial.jsonl"), str(tuning / "fidelity.json")) == 0
    fitted = json.loads((out / "candidates.json").read_text())
    assert (
        len(fitted["calibrated"]["same_weights"]) == 2 and len(fitted["calibrated"]["attention_weights"]) == 2
    )
    tuned = json.loads((out / "tuning.json").read_text())
    assert tuned["n_responses"] == 4 and set(tuned["leave_one_question_out"]) == set(CANDIDATES)

    for shard in ("0/2", "1/2"):
        assert run("--shard", shard) == 0
    records = [
        json.loads(line) for f in sorted(out.glob("responses-*.jsonl")) for line in f.read_text().splitlines()
    ]
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert [r["question"] for r in sorted(records, key=lambda r: r["index"])] == [30, 31, 3]
    for r in records:
        assert len(r["exact_fro"]) == len(r["entropy"]) == r["n_tokens"] <= r["max_new_tokens"]
        per_param = np.load(out / "exact" / f"{r['index']}.npz")["per_param"]
        # the total is the parameters' norms in quadrature
        np.testing.assert_allclose(
            np.sqrt((per_param.astype(np.float64) ** 2).sum(1)), r["exact_fro"], rtol=1e-5
        )

    # Resume: a finished shard measures nothing again.
    before = (out / "responses-0-of-2.jsonl").read_text()
    assert run("--shard", "0/2") == 0
    assert (out / "responses-0-of-2.jsonl").read_text() == before

    assert run("--report", str(out / "candidates.json")) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["n_responses"] == 3 and result["datasets"] == {"gsm8k": 2, "math500": 1}
    assert set(result["measures"]) == set(CANDIDATES)
    exact_rho = np.array(result["rho_exact"])
    for r, rho in zip(sorted(records, key=lambda r: r["index"]), exact_rho):
        assert rho == pytest.approx(np.corrcoef(r["entropy"], r["exact_fro"])[0, 1], abs=1e-4)
    assert result["cost"]["same_position_pass_over_forward_backward"] > 0
    assert result["cost"]["one_hop_pass_over_forward_backward"] > 0
    assert "| `calibrated` |" in (out / "report.md").read_text()
    assert (out / "rho_scatter.png").stat().st_size > 0


def test_agreement_statistics_against_a_direct_computation():
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(10):
        h = rng.normal(size=30)
        exact = np.exp(rng.normal(size=30) - 0.3 * h)
        rows.append({"entropy": h, "exact_fro": exact, "m": exact * np.exp(0.2 * rng.normal(size=30))})
    a = agreement(rows, "m", resamples=200)
    e = np.array([np.corrcoef(r["entropy"], r["exact_fro"])[0, 1] for r in rows])
    m = np.array([np.corrcoef(r["entropy"], r["m"])[0, 1] for r in rows])
    assert a["rho_agreement"] == pytest.approx(np.corrcoef(e, m)[0, 1], abs=1e-4)
    assert a["bias"] == pytest.approx((m - e).mean(), abs=1e-4)
    assert a["sign_agreement"] == pytest.approx((np.sign(m) == np.sign(e)).mean())
    assert a["bias_ci95"][0] <= a["bias"] <= a["bias_ci95"][1]
    assert agreement(rows, "exact_fro", resamples=50)["rho_agreement"] == pytest.approx(1.0)


def test_too_few_responses_get_no_interval():
    from entropy_gpu.analysis.intervals import MIN_BOOTSTRAP_N

    rng = np.random.default_rng(2)
    rows = []
    for _ in range(MIN_BOOTSTRAP_N):
        h = rng.normal(size=12)
        exact = np.exp(rng.normal(size=12) - 0.3 * h)
        rows.append({"entropy": h, "exact_fro": exact, "m": exact * np.exp(0.2 * rng.normal(size=12))})
    few = agreement(rows[:4], "m", resamples=50)
    assert few["bias_ci95"] is few["rho_agreement_ci95"] is few["sign_agreement_ci95"] is None
    enough = agreement(rows, "m", resamples=50)
    assert enough["bias_ci95"] is not None
    table = measure_fidelity.report_table({"measures": {"m": few, "m2": enough}})
    assert table.count("[n too small]") == 3 and "| `m2` | " in table
    assert "[n too small]" not in table.split("`m2`")[1]


def test_bad_config_and_shard_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {"sets": [{"dataset": "gsm8k", "first": 0, "count": 1, "max_new_tokens": 4}], "temprature": 1.0}
        )
    )
    assert main(["--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config keys ['temprature']" in capsys.readouterr().err
    config.write_text(json.dumps({"sets": []}))
    assert main(["--config", str(config), "--out", str(tmp_path / "o")]) == 2
    config.write_text(
        json.dumps({"sets": [{"dataset": "gsm8k", "first": 0, "count": 1, "max_new_tokens": 4}]})
    )
    out = tmp_path / "o"
    capsys.readouterr()

    def error(*extra: str) -> str:
        assert main(["--config", str(config), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "0 <= I < N" in error("--shard", "2/2")
    assert "--shard takes I/N" in error("--shard", "x")
    assert "--threads must be >= 0" in error("--threads", "-1")
    assert "--fit: no such file" in error("--fit", str(tmp_path / "rows.jsonl"), str(tmp_path / "run.json"))
    assert "--report: no such file" in error("--report", str(tmp_path / "candidates.json"))
    (tmp_path / "candidates.json").write_text("{}")
    assert "no collected responses" in error("--report", str(tmp_path / "candidates.json"))
    assert not out.exists()  # nothing written by a refused run
    # a folder collected with another config is refused, naming what differs
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**json.loads(config.read_text()), "seed": 7}))
    assert "collected with another config (differs in: seed: 7 -> 1000)" in error()
    with pytest.raises(SystemExit) as stop:  # argparse: one stage at a time
        main(["--config", str(config), "--out", str(out), "--fit", "a", "b", "--report", "c"])
    assert stop.value.code == 2


def test_an_interrupted_run_says_how_to_resume(tmp_path, capsys, monkeypatch, keep_threads):
    config = tmp_path / "c.json"
    one_question = {"dataset": "gsm8k", "first": 0, "count": 1, "max_new_tokens": 4}
    config.write_text(json.dumps({"sets": [one_question]}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure_fidelity, "collect", interrupted)
    assert main(["--config", str(config), "--out", str(tmp_path / "o"), "--threads", "1"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to resume"


def test_the_committed_config_plans_the_fresh_sample_the_issue_asks_for():
    from pathlib import Path

    path = (
        Path(measure_fidelity.__file__).parents[2]
        / "examples"
        / "measure_fidelity"
        / "smollm2_fresh_sample.json"
    )
    config = FidelityConfig.from_dict(json.loads(path.read_text()))
    plan = measure_fidelity.planned_responses(config)
    assert len(plan) >= 48
    assert all(p["question"] >= 12 for p in plan if p["dataset"] == "gsm8k")  # none of the tuning questions
    assert {p["dataset"] for p in plan} == {"gsm8k", "math500"}
    assert sum(p["max_new_tokens"] >= 200 for p in plan) >= len(plan) / 3
