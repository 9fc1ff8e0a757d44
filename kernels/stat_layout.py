"""Layout rules shared by the kernels and the torch API: the order of the statistics,
which moment accumulators they need, the layout of the partial state (named offsets) and
of the saved backward state, and how the vocabulary is split across programs.

Plain Python (no Triton, no torch): ``entropy_gpu`` imports these rules from here so
that each is written once, the kernels stay importable on their own, and the torch
backend works where Triton is not installed. A kernel reads the offsets as attributes of
this module (``stat_layout.STATE_S0``), which Triton folds into constants.
"""

from __future__ import annotations

from collections.abc import Sequence

# Order of the statistics: rows of the output buffer, ``want`` flags, ``TokenStats`` fields.
STAT_NAMES = (
    "logsumexp", "entropy", "logprob", "sum_sq_probs",
    "nll_grad_norm", "varentropy", "entropy_grad_norm", "entropy_change",
)

# The partial state of one row and vocabulary split: the last axis of a [rows, splits,
# STATE_WIDTH] tensor, written by the kernels and merged on the torch side. Its first
# STATE_MOMENTS entries are the softmax moments, in ``SoftmaxMoments`` order.
STATE_MAX = 0           # m, the running maximum of the raw logits
STATE_S0 = 1
STATE_S1 = 2
STATE_S2 = 3
STATE_Q0 = 4
STATE_Q1 = 5
STATE_Q2 = 6
STATE_TARGET_LOGIT = 7  # the fused LM head's target logit (0 in splits without the target); unused elsewhere
STATE_MOMENTS = 7
STATE_WIDTH = 8

# With ``save_state`` the statistics buffer has two rows after the ``STAT_NAMES`` rows, what
# the backward needs to rebuild ``log p`` exactly.
SAVED_ROW_MAX = len(STAT_NAMES)      # the raw row maximum m
SAVED_LOG_S0 = len(STAT_NAMES) + 1   # log s0
ROWS_WITH_SAVED_STATE = len(STAT_NAMES) + 2


def accumulators_needed(want: Sequence[bool]) -> tuple[bool, bool, bool, bool]:
    """(s1, s2, q0, q12) needed for ``want`` (flags in ``STAT_NAMES`` order); s0 always."""
    lse, ent, logprob, sumsq, nll, varent, ent_grad, ent_change = want
    # entropy_change = (p_y (1 - p_y)(log p_y + H) - (q1 - mu q0) / s0^2) * -1/t^2: s1 (for H),
    # q0 and q1 (the q12 pair; q2 rides along, one more sum in the same pass).
    return (bool(ent or varent or ent_grad or ent_change), bool(varent),
            bool(sumsq or nll or ent_grad or ent_change), bool(ent_grad or ent_change))


def vocab_splits(vocab: int, splits: int, block_v: int) -> tuple[int, int]:
    """(split_size, splits): ``splits`` requested parts of ``vocab`` columns rounded to whole
    blocks of ``block_v``; split ``j`` covers ``[j * split_size, (j + 1) * split_size)``."""
    per_split = -(-vocab // max(1, splits))
    split_size = -(-per_split // block_v) * block_v
    return split_size, -(-vocab // split_size)
