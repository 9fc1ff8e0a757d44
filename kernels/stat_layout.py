"""Layout rules shared by the kernels and the torch API: the order of the statistics,
which moment accumulators they need, the partial-state width and how the vocabulary is
split across programs.

Plain Python (no Triton, no torch): ``entropy_gpu`` imports these rules from here so
that each is written once, the kernels stay importable on their own, and the torch
backend works where Triton is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

# Order of the statistics: rows of the output buffer, ``want`` flags, ``TokenStats`` fields.
STAT_NAMES = (
    "logsumexp", "entropy", "logprob", "sum_sq_probs",
    "nll_grad_norm", "varentropy", "entropy_grad_norm",
)
STATE_WIDTH = 8  # partial state per row and split: m, s0, s1, s2, q0, q1, q2, (pad or target logit)


def accumulators_needed(want: Sequence[bool]) -> tuple[bool, bool, bool, bool]:
    """(s1, s2, q0, q12) needed for ``want`` (flags in ``STAT_NAMES`` order); s0 always."""
    lse, ent, logprob, sumsq, nll, varent, ent_grad = want
    return (bool(ent or varent or ent_grad), bool(varent), bool(sumsq or nll or ent_grad), bool(ent_grad))


def vocab_splits(vocab: int, splits: int, block_v: int) -> tuple[int, int]:
    """(split_size, splits): ``splits`` requested parts of ``vocab`` columns rounded to whole
    blocks of ``block_v``; split ``j`` covers ``[j * split_size, (j + 1) * split_size)``."""
    per_split = -(-vocab // max(1, splits))
    split_size = -(-per_split // block_v) * block_v
    return split_size, -(-vocab // split_size)
