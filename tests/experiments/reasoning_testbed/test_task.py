"""The testbed's task: correct worked solutions, difficulty, disjoint splits, the tokenizer."""

import re
import statistics

import pytest

from entropy_gpu.experiments.reasoning_testbed import task

DIFFICULTIES = (2, 3, 4, 5, 6)


def _run_program(prompt: str) -> int:
    """Evaluate a prompt's shuffled program independently of the generator (repeated passes)."""
    body, query = prompt.rstrip(task.PROMPT_END).split(";?")
    lines = [line.split("=") for line in body.split(";")]
    values: dict[str, int] = {}
    while len(values) < len(lines):
        progress = False
        for name, expr in lines:
            if name in values:
                continue
            terms = re.split(r"([+-])", expr)
            if not all(t.isdigit() or t in values or t in "+-" for t in terms):
                continue
            value = int(terms[0]) if terms[0].isdigit() else values[terms[0]]
            for op, term in zip(terms[1::2], terms[2::2]):
                operand = int(term) if term.isdigit() else values[term]
                value = value + operand if op == "+" else value - operand
            values[name] = value
            progress = True
        assert progress, f"circular program {prompt}"
    return values[query]


def test_solutions_are_right_and_in_range():
    for p in task.generate(300, 0, DIFFICULTIES, heldout=False):
        assert _run_program(p.prompt) == p.answer
        assert task.parse_answer(p.solution) == p.answer
        numbers = [int(x) for x in re.findall(r"\d+", p.solution)]
        assert all(0 <= x <= task.MAX_VALUE for x in numbers)
        # every worked line after the leaves is one operation: the difficulty counts them
        assert p.solution.count("+") + p.solution.count("-") == p.steps


def test_lines_are_shuffled_and_completions_are_produced_not_copied():
    problems = task.generate(500, 3, DIFFICULTIES, heldout=False)
    for p in problems:
        prompt_order = [line.split("=")[0] for line in p.prompt.split(";?")[0].split(";")]
        solution_order = [line.split("=")[0] for line in p.solution.split(";")[:-1]]
        assert sorted(prompt_order) == sorted(solution_order) and prompt_order != solution_order
    lengths = [len(p.solution) + 1 for p in problems]  # characters = tokens, plus eos
    assert statistics.mean(lengths) >= 30
    assert statistics.mean(task.copied_fraction(p.prompt, p.solution) for p in problems) < 0.5


def test_train_and_heldout_are_disjoint_up_to_renaming_reordering_and_commuting():
    train = task.generate(4000, 0, DIFFICULTIES, heldout=False)
    heldout = task.generate(500, 1, DIFFICULTIES, heldout=True, distinct=True)
    assert len({p.key for p in heldout}) == 500
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert all(task.is_heldout(p) for p in heldout) and not any(task.is_heldout(p) for p in train)


def test_canonical_key_ignores_names_order_and_commuted_sums():
    p = task.generate(1, 5, (4,), heldout=False)[0]
    # Rename every variable: same key (names do not enter it).
    names = sorted(set(re.findall(r"[a-z]", p.prompt)))
    assert all(name not in p.key for name in names)
    assert p.key.count("|") == len(p.solution.split(";")) - 2  # one entry per line


def test_difficulties_cycle_and_streams_are_reproducible():
    a = task.generate(50, 7, (2, 5), heldout=False)
    assert [p.steps for p in a] == [2, 5] * 25
    assert a == task.generate(50, 7, (2, 5), heldout=False)
    assert a != task.generate(50, 8, (2, 5), heldout=False)


@pytest.mark.parametrize(
    "text,value",
    [("a=1;#12", 12), ("#7", 7), ("a=1;#12 ", 12), ("a=1;", None), ("#12a", None), ("", None), ("#1#2", 2)],
)
def test_parse_answer(text, value):
    assert task.parse_answer(text) == value


def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    task.save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    p = task.generate(1, 0, (3,), heldout=False)[0]
    ids = tokenizer(p.text, add_special_tokens=False).input_ids
    assert len(ids) == len(p.text)
    assert task.decode(tokenizer, ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == p.text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
