"""Inputs at scale: JSONL traces stream line by line; the vLLM trace engine's sampling
parameters and records (what CPU allows: the pure functions; the GPU command is in the
docs/usage/scale.md); progress bars on rank 0 only."""

from __future__ import annotations

import importlib.util
import json

import pytest

from entropy_gpu.analysis.runs import Ranks, progress
from entropy_gpu.analysis.sia.data import Problem, iter_dataset, iter_jsonl, load_jsonl
from entropy_gpu.analysis.sia.generate import check_engine, trace_from_tokens, vllm_sampling_kwargs
from entropy_gpu.cli import main
from tests.sia_helpers import smollm2_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    rows = [{"id": f"p{i}", "question": f"{i}+{i}?", "answer": 2 * i, "trace": f"{i}+{i}={2 * i}"}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    stream = iter_dataset(str(path))
    # The first problems arrive before the bad line further down is ever read.
    assert [next(stream).id, next(stream).id, next(stream).id] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match=r"traces.jsonl:4: not valid JSON"):
        next(stream)
    assert [p.id for p in iter_jsonl(path, limit=2)] == ["p0", "p1"]
    assert [p.answer for p in load_jsonl(path, limit=3)] == ["0", "2", "4"]


def test_vllm_sampling_kwargs_match_the_hf_engine():
    greedy = vllm_sampling_kwargs("greedy", max_new_tokens=64, temperature=0.7, seed=3, eos_token_id=2)
    sampled = vllm_sampling_kwargs("sampled", max_new_tokens=64, temperature=0.7, seed=3, eos_token_id=2)
    # Greedy: temperature 0 (vLLM's argmax). Sampled: the temperature, over the full vocabulary.
    assert greedy["temperature"] == 0.0 and sampled["temperature"] == 0.7
    for kw in (greedy, sampled):
        assert kw["max_tokens"] == 64 and kw["n"] == 1 and kw["seed"] == 3 and kw["stop_token_ids"] == [2]
        assert (kw["top_k"], kw["top_p"], kw["min_p"], kw["repetition_penalty"]) == (-1, 1.0, 0.0, 1.0)
        assert kw["presence_penalty"] == kw["frequency_penalty"] == 0.0
    with pytest.raises(ValueError, match="generation mode"):
        vllm_sampling_kwargs("beam", max_new_tokens=8, temperature=1.0, seed=0, eos_token_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vllm_sampling_kwargs("greedy", max_new_tokens=0, temperature=1.0, seed=0, eos_token_id=2)
    with pytest.raises(ValueError, match="temperature"):
        vllm_sampling_kwargs("sampled", max_new_tokens=8, temperature=0.0, seed=0, eos_token_id=2)


def test_vllm_kwargs_build_sampling_params():
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU machines)")
    for mode in ("greedy", "sampled"):
        params = vllm.SamplingParams(**vllm_sampling_kwargs(mode, max_new_tokens=16, temperature=0.7, seed=1,
                                                            eos_token_id=2))
        assert params.max_tokens == 16 and params.top_p == 1.0


def test_trace_records_equal_between_engines():
    """HF returns the padded row after the prompt (EOS, then padding); vLLM returns the
    ids up to and including EOS. Both give the same record."""
    tok = smollm2_tokenizer()
    problem = Problem(id="q1", question="What is 9 + 9?", answer="18", answer_kind="number")
    body = tok("9 + 9 = 18.\nThe answer is 18", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hf = trace_from_tokens(tok, problem, body + [tok.eos_token_id] + [pad] * 3, "greedy")
    vllm = trace_from_tokens(tok, problem, body + [tok.eos_token_id], "greedy")
    assert hf == vllm
    assert (hf.text, hf.predicted, hf.correct, hf.source) == ("9 + 9 = 18.\nThe answer is 18", "18", True,
                                                              "greedy")
    ids = tok(" It is 17 ", add_special_tokens=False)["input_ids"]
    wrong = trace_from_tokens(tok, problem, ids, "sampled")
    assert (wrong.text, wrong.predicted, wrong.correct) == ("It is 17", "17", False)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_engine_vllm_without_vllm_is_one_clear_line(capsys, tmp_path):
    with pytest.raises(ModuleNotFoundError, match="pip install vllm"):
        check_engine("vllm")
    with pytest.raises(ValueError, match="engine must be one of"):
        check_engine("sglang")
    assert main(["sia", "--dataset", "gsm8k", "--limit", "1", "--traces", "greedy", "--engine", "vllm",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("entropy-gpu sia: error: --engine vllm needs vLLM") and err.count("\n") == 1


def test_progress_bar_only_on_rank_zero():
    assert not progress(10, "SIA", Ranks(rank=0, world_size=2)).disable
    assert progress(10, "SIA", Ranks(rank=1, world_size=2)).disable
    assert progress(10, "SIA", Ranks(), enabled=False).disable
    bar = progress(10, "SIA", Ranks())
    assert bar.total == 10 and bar.unit == "trace"  # tqdm: traces/s and the ETA from total
