"""Split a reasoning trace into steps, with character and token offsets.

A step boundary sits where a separator *starts*: the line break or the space after
a sentence begins the next step, so every prefix ends on content (``"... eggs."``)
and the answer probe (``"\\nThe answer is"``) reads naturally after it. Boundaries
are then moved forward to the nearest token boundary of the whole trace's
tokenization, so prefix ``k`` is exactly the first ``token_end`` tokens of the
trace: the one-pass computation and the naive re-encoding see the same tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENTATIONS = ("newline", "sentence", "regex", "tokens")
NEWLINE_PATTERN = r"\n\s*"
# End of a sentence: whitespace after . ! ? (decimals like 3.5 have no space), or a line break.
SENTENCE_PATTERN = r"(?<=[.!?])\s+|\n\s*"


@dataclass(frozen=True)
class Step:
    """One reasoning step: ``trace[char_start:char_end]`` = tokens ``[token_start, token_end)``."""

    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str


@dataclass(frozen=True)
class Segmentation:
    """A trace cut into ``K`` steps; offsets refer to ``trace`` (the stripped input)."""

    trace: str
    token_ids: list[int]
    steps: list[Step]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def prefix_lengths(self) -> list[int]:
        """Token length of prefix ``k`` for ``k = 0..K`` (``0`` = no reasoning yet)."""
        return [0] + [s.token_end for s in self.steps]


def _token_boundaries(offsets: list[tuple[int, int]], text_len: int) -> list[tuple[int, int]]:
    """Valid cut points as ``(token_index, char_position)``, in order.

    A cut between tokens ``j-1`` and ``j`` is valid when they share no character:
    byte-level tokenizers split some characters (emoji, CJK) over several tokens,
    whose offsets then overlap, and a step must never end inside a character.
    """
    n = len(offsets)
    cuts = [(0, 0)]
    for j in range(1, n):
        prev_end, start = offsets[j - 1][1], offsets[j][0]
        if prev_end <= start:
            cuts.append((j, prev_end))
    if n:
        cuts.append((n, text_len))
    return cuts


def segment_trace(
    trace: str,
    tokenizer,
    mode: str = "sentence",
    *,
    pattern: str | None = None,
    every: int | None = None,
) -> Segmentation:
    """Cut ``trace`` into reasoning steps.

    Args:
        trace: the reasoning text. Leading and trailing whitespace is dropped; the
            offsets refer to the stripped text (``Segmentation.trace``).
        tokenizer: a Hugging Face *fast* tokenizer (character offsets are needed).
        mode: ``"newline"`` (a step per line), ``"sentence"`` (after ``. ! ?``
            followed by whitespace, and at line breaks), ``"regex"`` (a step starts
            where each match of ``pattern`` starts, e.g. ``r"\\n(?=Step \\d)"``), or
            ``"tokens"`` (every ``every`` tokens).
        pattern: the separator regex for ``mode="regex"``.
        every: the step length in tokens for ``mode="tokens"``.

    Returns:
        ``Segmentation`` with ``K >= 1`` steps that cover the stripped trace exactly.
        Steps holding only whitespace are merged into the following step.

    Raises:
        ValueError: empty trace, unknown mode, missing/invalid ``pattern`` or ``every``,
            or a tokenizer without offset mapping.
    """
    if not isinstance(trace, str):
        raise TypeError(f"trace must be a str, got {type(trace).__name__}")
    if mode not in SEGMENTATIONS:
        raise ValueError(f"unknown segmentation {mode!r}; choose from {SEGMENTATIONS}")
    text = trace.strip()
    if not text:
        raise ValueError("trace is empty (or only whitespace): there are no reasoning steps to analyse")
    if mode == "regex":
        if not pattern:
            raise ValueError("segmentation 'regex' needs pattern=..., e.g. r'\\n(?=Step \\d)'")
        regex = re.compile(pattern)
    elif mode == "tokens":
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"segmentation 'tokens' needs every=<positive int>, got {every!r}")
    else:
        regex = re.compile(NEWLINE_PATTERN if mode == "newline" else SENTENCE_PATTERN)

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("segmentation needs a fast tokenizer (character offsets); "
                         "load it with use_fast=True")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    cuts = _token_boundaries([tuple(o) for o in enc["offset_mapping"]], len(text))
    n_tokens = len(ids)

    # Desired cut points, as a token index (tokens mode) or a character position.
    if mode == "tokens":
        wanted = [(j, None) for j in range(every, n_tokens, every)]
    else:
        wanted = [(None, m.start()) for m in regex.finditer(text) if 0 < m.start() < len(text)]
    token_cuts = set()
    for tok_index, char_pos in wanted:
        # Snap forward to the first valid token boundary at or after the wanted point.
        for j, pos in cuts:
            if (tok_index is not None and j >= tok_index) or (char_pos is not None and pos >= char_pos):
                if 0 < j < n_tokens:
                    token_cuts.add(j)
                break
    bounds = [0] + sorted(token_cuts) + [n_tokens]
    char_at = dict(cuts)
    # Merge whitespace-only steps into the step that follows them.
    kept = [0]
    for i in range(1, len(bounds) - 1):
        if text[char_at[kept[-1]]:char_at[bounds[i]]].strip():
            kept.append(bounds[i])
    kept.append(n_tokens)
    steps = [
        Step(char_at[a], char_at[b], a, b, text[char_at[a]:char_at[b]])
        for a, b in zip(kept[:-1], kept[1:])
    ]
    return Segmentation(trace=text, token_ids=ids, steps=steps)
