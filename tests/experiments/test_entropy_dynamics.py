"""The entropy-dynamics experiment (entropy_gpu.experiments.entropy_dynamics): the per-step
measurement on a tiny random Llama (the JVP is the first-order change of a small real update,
the logit-space prediction is A * entropy_change), a real TRL run end to end, and the CLI's errors."""

from __future__ import annotations

import json

import pytest
import torch

from entropy_gpu import token_stats
from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.experiments.entropy_dynamics import main, step_record, summarize
from tests.reference import reference_stats


def _before(model, ids, attention, width, temperature, advantages, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=width + 1).logits[:, :-1]
    stats = token_stats(logits, ids[:, -width:], temperature=temperature, stats=("entropy", "entropy_change"))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {"input_ids": ids, "attention_mask": attention, "mask": mask, "width": width,
              "advantages": advantages, "entropy": stats.entropy, "entropy_change": stats.entropy_change,
              "params": params, "start": 0.0}
    return before, logits


def test_step_record_measures_a_real_update():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=97, hidden_size=32, layers=2, heads=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # peaked distributions: entropies well below log V
    ids = torch.randint(0, 97, (4, 9))
    attention = torch.ones_like(ids)
    width, temperature = 5, 0.9
    mask = torch.ones(4, width, dtype=torch.bool)
    mask[1, -2:] = False
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0])
    before, logits = _before(model, ids, attention, width, temperature, advantages, mask)
    with torch.no_grad():  # a small update: the first order must dominate
        for p in model.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    record, tokens = step_record(1, before, model, temperature, jvp=True)
    ref = reference_stats(logits, ids[:, -width:], temperature=temperature)
    want = (advantages[:, None].double() * ref["entropy_change"])[mask]
    torch.testing.assert_close(torch.tensor(tokens["predicted_logit"], dtype=torch.float64), want,
                               atol=1e-5, rtol=1e-4)
    assert record["tokens"] == int(mask.sum()) == len(tokens["observed"])
    assert record["nonzero_advantage_tokens"] == int(mask[[0, 1, 3]].sum())
    observed = torch.tensor(tokens["observed"], dtype=torch.float64)
    jvp = torch.tensor(tokens["predicted_jvp"], dtype=torch.float64)
    assert observed.abs().max() > 1e-5  # the update moved the entropies measurably
    torch.testing.assert_close(jvp, observed, atol=2e-5, rtol=0.1)
    assert record["jvp_spearman"] > 0.95 and record["jvp_sign_agreement"] > 0.9
    assert record["entropy_change/tokens"] == record["tokens"]


def test_tiny_grpo_run_writes_records_and_a_report(tmp_path):
    out = tmp_path / "run"
    code = main(["--out", str(out), "--model", "tiny", "--steps", "2", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-completion-length", "4", "--no-jvp"])
    assert code == 0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    tokens = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and [t["step"] for t in tokens] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 2
    assert summary["tokens"] == sum(s["tokens"] for s in steps) == sum(len(t["observed"]) for t in tokens)
    assert "jvp" not in summary and (out / "entropy_dynamics.png").stat().st_size > 0
    assert "python -m entropy_gpu.experiments.entropy_dynamics --out" in (out / "summary.md").read_text()
    # Not resumable: a second run into the folder refuses in one line; --report-only rebuilds the report.
    assert main(["--out", str(out), "--model", "tiny"]) == 2
    report = tmp_path / "report"
    assert main(["--out", str(out), "--report-only", "--report", str(report)]) == 0
    assert summarize(out) == json.loads((report / "summary.json").read_text())


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["--model", "gpt5"], "--model 'gpt5'"),
    (["--report-only"], "no such folder"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["--out", str(tmp_path / "missing"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
