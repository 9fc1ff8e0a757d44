"""``entropy-gpu sia`` / ``sia-bench`` end to end on a tiny random Llama saved to disk
with SmolLM2's tokenizer: every output is written and well formed."""

import json

import pytest

from entropy_gpu.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_outputs(out, n):
    records = read_jsonl(out / "curves.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == summary["n_traces"] == n
    for r in records:
        assert len(r["entropy"]) == len(r["answer_logprob"]) == len(r["steps"]) + 1
        assert len(r["gains"]) == len(r["steps"])
    for name in ("curves.png", "signatures.png"):
        assert (out / name).read_bytes()[:8] == PNG
    return records, summary


def test_sia_gold_gsm8k_with_random_twin(cli_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sia", "--model", cli_model, "--dataset", "gsm8k", "--limit", "3", "--out", str(out),
                 "--bootstrap", "50", "--grid-points", "11", "--random-twin", "--no-progress"]) == 0
    records, summary = check_outputs(out, 3)
    assert summary["config"]["estimator"] == "next_token" and summary["traces"] == "gold"
    assert len(summary["curves"]["grid"]) == 11 and summary["curves"]["all"]["n"] == 3
    assert [r["correct"] for r in records] == [True] * 3 and records[0]["answer"] == "18"
    twin_records, _ = check_outputs(out / "random_twin", 3)
    assert twin_records[0]["entropy"] != records[0]["entropy"]
    assert (out / "compare.png").read_bytes()[:8] == PNG
    assert "mean entropy" in capsys.readouterr().out


def test_sia_generated_arc_traces_with_choices(cli_model, tmp_path):
    out = tmp_path / "arc"
    assert main(["sia", "--model", cli_model, "--dataset", "arc_easy", "--limit", "4", "--traces", "greedy",
                 "--max-new-tokens", "12", "--batch-size", "2", "--out", str(out), "--bootstrap", "20",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records, _ = check_outputs(out, summary["n_traces"])
    assert summary["n_traces"] + len(summary["skipped_empty_traces"]) == 4
    assert summary["config"]["estimator"] == "choices" and summary["generation"]["max_new_tokens"] == 12
    for r in records:
        assert isinstance(r["correct"], bool) and r["source"] == "greedy"
        assert all(abs(sum(p) - 1) < 1e-6 for p in r["extras"]["choice_probs"])


def test_sia_user_jsonl_reports_auroc(cli_model, tmp_path):
    rows = [{"id": f"r{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "answer_kind": "number",
             "trace": f"{i} plus {i}.\nThat makes {2 * i + (i % 2)}.", "correct": i % 2 == 0}
            for i in range(6)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "user"
    assert main(["sia", "--model", cli_model, "--dataset", str(data), "--out", str(out),
                 "--estimator", "sampled",
                 "--num-samples", "4", "--max-answer-tokens", "2", "--segment", "newline",
                 "--bootstrap", "30",
                 "--no-progress"]) == 0
    records, summary = check_outputs(out, 6)
    assert [r["correct"] for r in records] == [r["correct"] for r in rows]
    final = summary["signatures"]["final_entropy"]
    assert final["n_correct"] == 3 and final["n_incorrect"] == 3 and 0 <= final["auroc"] <= 1
    assert all(len(r["extras"]["samples"][0]) == 4 for r in records)


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "arc_easy", "--traces", "gold"], "no reasoning trace"),
    (["--dataset", "gsm8k", "--estimator", "choices"], "needs a finite answer set"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--dataset", "gsm8k", "--segment", "regex"], "pattern"),
])
def test_sia_bad_input_is_a_clear_error(cli_model, tmp_path, capsys, argv, message):
    assert main(["sia", "--model", cli_model, "--limit", "2", "--out", str(tmp_path / "x"), "--no-progress"]
                + argv) == 2
    assert message in capsys.readouterr().err


def test_sia_rerun_refusal_names_the_differing_flags(cli_model, tmp_path, capsys):
    argv = ["sia", "--model", cli_model, "--limit", "1", "--out", str(tmp_path / "run"), "--bootstrap", "10",
            "--segment", "tokens", "--every", "4", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--estimator", "sampled", "--probe", "\\nSo:"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err, err
    assert "--estimator: next_token -> sampled" in err, err
    assert '--probe: "\\nThe answer is" -> "\\nSo:"' in err, err
    assert "config" not in err.replace("run.json", ""), err


def test_sia_bench_one_pass_vs_naive(cli_model, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["sia-bench", "--model", cli_model, "--dataset", "gsm8k", "--limit", "10", "--every", "4",
                 "--min-steps", "8", "--max-traces", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["traces"] == 2 and result["steps_min"] >= 8
    assert max(result["max_abs_diff"].values()) < 1e-4
    assert result["naive"]["tokens_processed"] > 3 * result["packed"]["tokens_processed"]
    assert result["packed"]["forward_passes"] == 2  # one per trace
