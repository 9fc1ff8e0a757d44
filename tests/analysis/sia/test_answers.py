"""Answer extraction and normalization (GSM8K numbers, MATH boxed, ARC letters)."""

import pytest

from entropy_gpu.analysis.sia import (
    answers_match,
    extract_answer,
    extract_boxed,
    extract_letter,
    extract_number,
    normalize_math,
    normalize_number,
    normalize_short_answer,
)


@pytest.mark.parametrize("text,want", [
    ("18", "18"), ("$1,234.50", "1234.5"), ("18.00", "18"), ("-3", "-3"), (" 0.50 dollars", "0.5"),
    ("no number", None), (".5", "0.5"), ("1,000,000", "1000000"),
])
def test_normalize_number(text, want):
    assert normalize_number(text) == want


@pytest.mark.parametrize("text,want", [
    ("She has 5 apples, then 7.\n#### 12", "12"),
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,200. Later 5 more.", "1200"),
    ("first 3 then 4 finally 10 dollars", "10"),
    ("The answer is unclear, but 42", "42"),
    ("nothing here", None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_extract_boxed_balanced_braces_and_last_box():
    assert extract_boxed(r"so \boxed{1} or \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("a,b", [
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("$5.00$", "5"), (r"\text{Evelyn}", "Evelyn"), (r"90^\circ", "90"),
    (r"\frac43", r"\frac{4}{3}"), (r"\frac{270}7", r"\frac{270}{7}"), (r"11\sqrt2", r"11\sqrt{2}"),
    (r"864 \mbox{inches}^2", "864"), (r"x = 5", "5"), (r"\$32,348", "32348"), (r"10\%", "10"),
    (r"\boxed{\sqrt[3]{x}}", r"\sqrt[3]{x}"),
])
def test_normalize_math_equal(a, b):
    assert normalize_math(a) == normalize_math(b)


def test_normalize_math_keeps_different_answers_apart():
    assert normalize_math(r"\frac{1}{2}") != normalize_math(r"\frac{2}{1}")


@pytest.mark.parametrize("text,want", [
    ("Plants need light. The answer is B.", "B"),
    ("Answer: (C)", "C"),
    ("A. one\nB. two\nD. four", None),   # an echoed option list commits to nothing
    ("Let me think.\nD) is right. The answer: B", "B"),
    ("Both (A) and (B) look plausible; I pick (B)", "B"),
    ("A plant needs water.", None),     # the article "A" is not an answer
    ("The answer is E", None),          # not an option
    ("c", None),
    ("C", "C"), ("(C).", "C"),
])
def test_extract_letter(text, want):
    assert extract_letter(text, ["A", "B", "C", "D"]) == want


def test_extract_answer_by_kind_and_matching():
    assert extract_answer(r"thus \boxed{\dfrac{1}{2}}", "boxed") == r"\frac{1}{2}"
    assert extract_answer("So the answer is Paris.\nDone", "text") == "paris"
    assert answers_match("1,200", "1200", "number")
    assert not answers_match(None, "3", "number")
    assert not answers_match("12", "1200", "number")
    assert answers_match("B", "B", "letter")
    with pytest.raises(ValueError, match="labels"):
        extract_answer("B", "letter")
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("B", "date")


@pytest.mark.parametrize("text,kind,want", [
    (" 18 dollars.", "number", "18"), (" $18.00", "number", "18"), (" eighteen", "number", "eighteen"),
    (" (B).", "letter", "B"), (" B because", "letter", "B"), (" Paris.", "text", "paris"),
    (r" \boxed{\dfrac{1}{2}}", "boxed", r"\frac{1}{2}"),
])
def test_normalize_short_answer(text, kind, want):
    assert normalize_short_answer(text, kind) == want
