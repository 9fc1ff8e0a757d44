"""What a reader sees (issue 20, item 6): --no-progress silences the libraries' loading
bars too, an interrupt says on its own line how to resume, unjudged traces are counted,
and the trainer libraries' known noise is filtered narrowly (other warnings still show)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from entropy_gpu.analysis.models import library_progress_bars
from entropy_gpu.analysis.sia.plots import signature_panels
from entropy_gpu.analysis.sia.run import format_summary
from entropy_gpu.analysis.sia.signatures import summarize, trace_signatures
from entropy_gpu.cli import main


def test_no_progress_silences_the_model_loading_bars(cli_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sia", "--model", cli_model, "--limit", "1", "--out", str(out), "--bootstrap", "10",
                 "--no-progress", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err, err


def test_library_progress_bars_off_and_restored():
    from tqdm.auto import tqdm as auto_tqdm
    from transformers.utils import logging as hf_logging

    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    before = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with library_progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm(range(3)).disable  # the GGUF conversion bar calls tqdm itself
    assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is before is auto_tqdm


@pytest.mark.parametrize("command,patch,hint", [
    (["sia", "--limit", "1"], "entropy_gpu.analysis.sia.run.run_sia", True),
    (["bench", "--shape", "4x8", "--no-memory", "--quiet"], "entropy_gpu.bench.suite.run_suite", False),
])
def test_interrupt_is_its_own_line_and_says_how_to_resume(command, patch, hint, tmp_path, monkeypatch,
                                                          capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patch, interrupted)
    extra = ["--out", str(tmp_path / "o")] if command[0] == "sia" else []
    assert main([*command, *extra, "--threads", "1"]) == 130
    err = capsys.readouterr().err
    line = f"entropy-gpu {command[0]}: interrupted" + ("; rerun the same command to resume" if hint else "")
    assert err.endswith("\n" + line + "\n"), err


def _record(i: int, correct):
    h = [2.0 - 0.1 * k + 0.01 * i for k in range(5)]
    return {"id": str(i), "correct": correct, "entropy": h, "answer_logprob": [-x for x in h],
            "steps": ["s"] * 4, "signatures": trace_signatures(h, 10)}


def test_unjudged_traces_are_counted_and_drawn():
    records = [_record(0, True), _record(1, None), _record(2, None), _record(3, False)]
    summary = summarize(records, n_boot=20)
    assert (summary["n_correct"], summary["n_incorrect"], summary["n_unjudged"]) == (1, 1, 2)
    assert "correct: 1  incorrect: 1  unjudged: 2" in format_summary(summary)
    assert summary["curves"]["unjudged"]["n"] == 2
    for panel in signature_panels(records, n_boot=20).values():  # the plot's n is every trace
        assert sum(len(v) for v in panel["values"].values()) == len(records)
    only_unjudged = summarize([_record(0, None)], n_boot=20)
    assert "unjudged: 1" in format_summary(only_unjudged)


def test_sia_summary_json_counts_unjudged(cli_model, tmp_path):
    rows = [{"id": f"r{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "answer_kind": "number",
             "trace": f"{i} plus {i}.\nThat makes {2 * i}.", **({"correct": True} if i == 0 else {})}
            for i in range(3)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["sia", "--model", cli_model, "--dataset", str(data), "--out", str(out), "--bootstrap", "10",
                 "--no-progress", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_traces"] == summary["n_correct"] + summary["n_incorrect"] + summary["n_unjudged"]


KNOWN = [
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("torchtitan engine is not available: ModuleNotFoundError()", UserWarning, "verl.workers.engine"),
    ("`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` "
     "instead.", FutureWarning, "transformers.training_args"),
]


def _shown(message, category, module) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module,
                               registry={})
    return bool(caught)


@pytest.mark.parametrize("message,category,module", KNOWN, ids=[m for _, _, m in KNOWN])
def test_known_library_noise_is_filtered_and_nothing_else(message, category, module):
    # Importing entropy_gpu.integrations installs them; pytest restores the filters after
    # every test, so install them again here.
    from entropy_gpu.integrations import quiet_known_library_noise

    quiet_known_library_noise()

    assert not _shown(message, category, module)
    assert _shown("something else went wrong", category, module)  # same module, other message
    assert _shown(message, category, "mypackage.module")  # same message, another module


def test_verl_import_is_quiet():
    pytest.importorskip("verl")
    code = "import entropy_gpu.integrations.verl\nimport verl.trainer.ppo.ray_trainer\n"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr
    for noise in ("Transformer Engine", "Apex is not installed", "engine is not available",
                  "No supported accelerator", "is registered but not available"):
        assert noise not in err, err
