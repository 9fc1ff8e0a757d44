"""Trace segmentation: modes, offsets, edge cases (empty, one step, trailing
whitespace, unicode split across byte-level tokens)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from entropy_gpu.analysis.sia import segment_trace
from tests.sia_helpers import smollm2_tokenizer


def check_invariants(seg):
    """Steps tile the stripped trace; each step's tokens decode to exactly its text."""
    tok = smollm2_tokenizer()
    assert seg.steps, "at least one step"
    assert "".join(s.text for s in seg.steps) == seg.trace
    assert seg.steps[0].char_start == 0 and seg.steps[-1].char_end == len(seg.trace)
    assert seg.steps[0].token_start == 0 and seg.steps[-1].token_end == len(seg.token_ids)
    for a, b in zip(seg.steps, seg.steps[1:]):
        assert a.char_end == b.char_start and a.token_end == b.token_start
    for s in seg.steps:
        assert s.text == seg.trace[s.char_start:s.char_end]
        assert s.text.strip(), "no whitespace-only step"
        assert tok.decode(seg.token_ids[s.token_start:s.token_end]) == s.text
    assert seg.token_ids == tok(seg.trace, add_special_tokens=False)["input_ids"]
    assert seg.prefix_lengths == [0] + [s.token_end for s in seg.steps]


def texts(seg):
    return [s.text for s in seg.steps]


def test_newline_mode_separator_starts_the_next_step():
    seg = segment_trace("a b.\nc d.\n\ne f.", smollm2_tokenizer(), "newline")
    check_invariants(seg)
    assert texts(seg) == ["a b.", "\nc d.", "\n\ne f."]


def test_sentence_mode_splits_sentences_and_lines_not_decimals():
    seg = segment_trace("It costs 3.5 dollars. Then two more! Why? Because\nso", smollm2_tokenizer(),
                        "sentence")
    check_invariants(seg)
    assert texts(seg) == ["It costs 3.5 dollars.", " Then two more!", " Why?", " Because", "\nso"]


def test_regex_mode_steps_start_at_matches():
    trace = "Step 1: add. Step 2: multiply. Step 3: done"
    seg = segment_trace(trace, smollm2_tokenizer(), "regex", pattern=r" (?=Step \d)")
    check_invariants(seg)
    assert texts(seg) == ["Step 1: add.", " Step 2: multiply.", " Step 3: done"]


def test_tokens_mode_every_n_tokens():
    tok = smollm2_tokenizer()
    trace = "one two three four five six seven eight nine ten"
    n = len(tok(trace, add_special_tokens=False)["input_ids"])
    seg = segment_trace(trace, tok, "tokens", every=3)
    check_invariants(seg)
    assert [s.token_end - s.token_start for s in seg.steps] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert segment_trace(trace, tok, "tokens", every=n + 5).num_steps == 1


def test_one_step_and_trailing_whitespace():
    tok = smollm2_tokenizer()
    seg = segment_trace("  just one step without separators  \n\n ", tok, "newline")
    check_invariants(seg)
    assert texts(seg) == ["just one step without separators"]
    seg = segment_trace("first.\nsecond.\n  \n\t\n", tok, "newline")
    assert texts(seg) == ["first.", "\nsecond."]


def test_whitespace_only_lines_merge_into_the_next_step():
    seg = segment_trace("a.\n \n\t\nb.", smollm2_tokenizer(), "regex", pattern=r"\n")
    check_invariants(seg)
    assert texts(seg) == ["a.", "\n \n\t\nb."]


def test_unicode_never_cut_inside_a_character():
    tok = smollm2_tokenizer()
    trace = "Ça coûte 5 €.\nPuis 😀🎉 fin. 数学很有趣。\nΩ≈ç√"
    for mode, kw in [("newline", {}), ("sentence", {}), ("tokens", {"every": 1}), ("tokens", {"every": 2})]:
        seg = segment_trace(trace, tok, mode, **kw)
        check_invariants(seg)
        assert all("\ufffd" not in s.text for s in seg.steps)
    # The emoji spans several byte-level tokens, so "every token" gives fewer steps than tokens.
    seg = segment_trace("😀", tok, "tokens", every=1)
    assert len(seg.token_ids) > 1 and texts(seg) == ["😀"]


@pytest.mark.parametrize("trace", ["", "   \n\t "])
def test_empty_trace_is_an_error(trace):
    with pytest.raises(ValueError, match="empty"):
        segment_trace(trace, smollm2_tokenizer(), "newline")


def test_bad_arguments():
    tok = smollm2_tokenizer()
    with pytest.raises(ValueError, match="unknown segmentation"):
        segment_trace("a", tok, "paragraph")
    with pytest.raises(ValueError, match="pattern"):
        segment_trace("a", tok, "regex")
    with pytest.raises(ValueError, match="every"):
        segment_trace("a", tok, "tokens", every=0)
    with pytest.raises(TypeError, match="str"):
        segment_trace(None, tok)


@given(st.lists(st.sampled_from(["word", " ", "\n", ". ", "3.5", "!", "😀", "é", "\t", "数", "  \n"]),
                min_size=1, max_size=25))
def test_invariants_hold_for_any_text(parts):
    trace = "".join(parts)
    if not trace.strip():
        return
    for mode, kw in [("newline", {}), ("sentence", {}), ("tokens", {"every": 2})]:
        check_invariants(segment_trace(trace, smollm2_tokenizer(), mode, **kw))
