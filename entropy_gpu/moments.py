"""Single-pass softmax moments in plain PyTorch (docs/numerics.md, "One pass over a row").

``SoftmaxMoments`` summarises a set of logit columns of each row: the running
maximum ``max`` of the raw logits and, with ``d = (z - max) / t``,

    s_k = sum e^{d} d^k,    q_k = sum e^{2d} d^k  over non-target columns  (k = 0, 1, 2)

Two summaries of disjoint column sets of the same rows merge exactly
(``merge_moments``), so blocks, vocabulary slices and tensor-parallel shards all
combine the same way; ``finalize`` turns a summary into the statistics. This is
the torch twin of ``kernels/softmax_moments.py`` and must stay in step with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# The order of the statistics and which accumulators they need are shared with the
# kernels; they are written once, in kernels/stat_layout.py (plain Python).
from .kernels.stat_layout import STAT_NAMES, STATE_MOMENTS, accumulators_needed

TARGET_STATS = frozenset({"logprob", "nll_grad_norm", "entropy_change"})  # need targets
DEFAULT_STATS = ("logsumexp", "entropy", "logprob", "nll_grad_norm")  # stats=None (target ones need targets)
# Fields with a backward; the others come back with requires_grad=False (entropy_change's
# gradient would need Hessian-vector products of H and log p: another pass, not built).
DIFFERENTIABLE = frozenset({"entropy", "logprob"})
ENTROPY, LOGPROB, NLL_GRAD_NORM = (STAT_NAMES.index(n) for n in ("entropy", "logprob", "nll_grad_norm"))

__all__ = [
    "DEFAULT_STATS", "DIFFERENTIABLE", "ENTROPY", "LOGPROB", "NLL_GRAD_NORM", "STAT_NAMES", "TARGET_STATS",
    "SoftmaxMoments", "accumulators_needed", "backward_row_params", "block_moments", "finalize",
    "entropy_change", "logits_grad", "merge_moments", "reduce_moments", "target_masks", "unpack_moments",
]


class SoftmaxMoments(NamedTuple):
    max: Tensor
    s0: Tensor
    s1: Tensor
    s2: Tensor
    q0: Tensor
    q1: Tensor
    q2: Tensor


def target_masks(targets: Tensor, vocab: int, ignore_index: int,
                 vocab_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(flat int64 column, in_range, ignored) for the rows of ``targets`` over the columns
    ``[vocab_start, vocab_start + vocab)`` (a shard; the whole vocabulary by default).
    ``column`` is ``target - vocab_start``; ``in_range`` rows have a target in those columns
    that is not ``ignore_index``."""
    t = targets.reshape(-1).long()
    ignored = t == ignore_index
    column = t - vocab_start if vocab_start else t
    in_range = (column >= 0) & (column < vocab) & ~ignored
    return column, in_range, ignored


def block_moments(
    block: Tensor,
    inv_t: float,
    excluded: Tensor | None,
    need: tuple[bool, bool, bool, bool],
    dtype: torch.dtype = torch.float32,
    workspace: Tensor | None = None,
) -> SoftmaxMoments:
    """Moments of the rows of ``block`` [R, C].

    ``excluded`` [R] holds the column (in block coordinates) to leave out of the
    q-sums, or -1 for none. ``workspace`` ([3, >=R*C] of ``dtype``) is reused scratch:
    allocating fresh block-sized buffers each call costs page faults that, on CPU,
    take longer than the arithmetic.
    """
    need_s1, need_s2, need_q0, need_q12 = need
    rows, cols = block.shape
    if workspace is None:
        workspace = torch.empty((3, rows * cols), device=block.device, dtype=dtype)
    d, e, ed = (workspace[i, : rows * cols].view(rows, cols) for i in range(3))
    m = block.amax(dim=-1).to(dtype)
    centre = torch.where(m == float("-inf"), 0.0, m)  # an all -inf row keeps d = -inf
    torch.sub(block, centre.unsqueeze(-1), out=d)  # the one copy of the block, in dtype
    if inv_t != 1.0:
        d.mul_(inv_t)
    # -inf -> most negative finite: exp gives 0 and 0 * d stays 0 (no 0 * inf); NaN stays NaN.
    d.clamp_(min=torch.finfo(dtype).min)
    torch.exp(d, out=e)
    zeros = torch.zeros_like(m)
    # vecdot reduces pairwise like sum(): a BLAS dot accumulates sequentially and loses
    # ~1e-4 relative over 1e5 same-sign terms.
    s0 = e.sum(dim=-1)
    s1 = torch.linalg.vecdot(e, d) if need_s1 else zeros
    if need_s2 or need_q12:
        torch.mul(e, d, out=ed)
    s2 = torch.linalg.vecdot(ed, d) if need_s2 else zeros
    q0 = q1 = q2 = zeros
    if need_q0 or need_q12:
        if excluded is not None:
            has = (excluded >= 0).unsqueeze(-1)
            col = excluded.clamp(min=0).unsqueeze(-1)
            e.scatter_(1, col, torch.where(has, 0.0, e.gather(1, col)))
            if need_q12:
                ed.scatter_(1, col, torch.where(has, 0.0, ed.gather(1, col)))
        q0 = torch.linalg.vecdot(e, e)
        if need_q12:
            q1 = torch.linalg.vecdot(e, ed)
            q2 = torch.linalg.vecdot(ed, ed)
    return SoftmaxMoments(m, s0, s1, s2, q0, q1, q2)


def _recentre(a0: Tensor, a1: Tensor, a2: Tensor, scale: Tensor, delta: Tensor):
    return (scale * a0, scale * (a1 + delta * a0), scale * (a2 + delta * (2.0 * a1 + delta * a0)))


def merge_moments(a: SoftmaxMoments, b: SoftmaxMoments, inv_t: float) -> SoftmaxMoments:
    """Summary of the union of two disjoint column sets (same rows)."""
    return reduce_moments(SoftmaxMoments(*(torch.stack(pair) for pair in zip(a, b))), dim=0, inv_t=inv_t)


def finalize(
    mom: SoftmaxMoments,
    target_logit: Tensor | None,
    in_range: Tensor | None,
    ignored: Tensor | None,
    inv_t: float,
    want: Sequence[bool],
) -> list[Tensor | None]:
    """Statistics (``STAT_NAMES`` order, None where not wanted) from final moments.

    ``target_logit`` is the raw logit of each row's target, ``in_range`` marks rows
    whose target is a real column, ``ignored`` rows whose target is ``ignore_index``
    (their target-dependent outputs are 0; other out-of-range rows get NaN).
    """
    log_s0 = torch.log(mom.s0)
    mu = mom.s1 / mom.s0
    inv_s0_sq = 1.0 / (mom.s0 * mom.s0)
    if target_logit is None:
        e2_t = d_t_term = torch.zeros_like(mom.s0)
        logprob = None
    else:
        d_t = (target_logit - mom.max) * inv_t
        e_t = torch.where(in_range, torch.exp(d_t), 0.0)
        e2_t = e_t * e_t
        d_t_term = torch.where(e_t > 0, d_t, 0.0)  # avoid 0 * inf for a -inf target logit
        logprob = d_t - log_s0
    q0 = mom.q0 + e2_t
    lse, ent, want_logprob, sumsq, nll, varent, ent_grad, ent_change = want
    out: list[Tensor | None] = [None] * len(STAT_NAMES)

    def target_field(value: Tensor) -> Tensor:
        return torch.where(ignored, 0.0, torch.where(in_range, value, float("nan")))

    if lse:
        out[0] = mom.max * inv_t + log_s0
    if ent:
        out[1] = log_s0 - mu
    if want_logprob:
        out[2] = target_field(logprob)
    if sumsq:
        out[3] = q0 * inv_s0_sq
    if nll:
        # ||p - onehot(y)||^2 = (1 - p_y)^2 + sum_{i != y} p_i^2: no cancellation.
        one_minus_p = 1.0 - torch.exp(logprob)
        out[4] = target_field(inv_t * torch.sqrt(one_minus_p * one_minus_p + mom.q0 * inv_s0_sq))
    if varent:
        var = mom.s2 / mom.s0 - mu * mu
        out[5] = torch.where(var < 0, 0.0, var)  # rounding only; keeps NaN
    if ent_grad:
        q1 = mom.q1 + e2_t * d_t_term
        q2 = mom.q2 + e2_t * d_t_term * d_t_term
        sq = (q2 - 2.0 * mu * q1 + mu * mu * q0) * inv_s0_sq
        out[6] = inv_t * torch.sqrt(torch.where(sq < 0, 0.0, sq))
    if ent_change:
        out[7] = target_field(entropy_change(logprob, log_s0 - mu, mom.q0, mom.q1, mu, inv_s0_sq, inv_t))
    return out


def entropy_change(logprob: Tensor, entropy: Tensor, q0_others: Tensor, q1_others: Tensor, mu: Tensor,
                   inv_s0_sq: Tensor, inv_t: float) -> Tensor:
    """``grad_z H . grad_z log p_y`` from a row's moments (docs/numerics.md, "entropy_change").

    ``q0_others``, ``q1_others`` are the q-sums without the target's column, so that
    ``sum_i p_i^2 (log p_i + H) = p_y^2 (log p_y + H) + (q1 - mu q0) / s0^2`` and the
    target's terms combine into ``p_y (1 - p_y)(log p_y + H)`` (no ``p_y - p_y^2``
    cancellation for a confident target)."""
    p_y = torch.exp(logprob)
    target_term = p_y * (1.0 - p_y) * (logprob + entropy)
    target_term = torch.where(p_y > 0, target_term, 0.0)  # p_y = 0 with log p_y = -inf: the term is 0
    others = (q1_others - mu * q0_others) * inv_s0_sq
    return (others - target_term) * (inv_t * inv_t)


def reduce_moments(mom: SoftmaxMoments, dim: int, inv_t: float) -> SoftmaxMoments:
    """Merge summaries stacked along ``dim`` (vocabulary splits, tiles, ranks) into one:
    bring every part to the largest maximum, add. A part that saw no finite logit
    (maximum ``-inf``) holds zero sums and adds nothing."""
    m = mom.max.amax(dim=dim, keepdim=True)
    empty = mom.max == float("-inf")
    delta = torch.where(empty, 0.0, (mom.max - m) * inv_t)
    scale = torch.where(empty, 0.0, torch.exp(delta))
    sums = (_recentre(mom.s0, mom.s1, mom.s2, scale, delta)
            + _recentre(mom.q0, mom.q1, mom.q2, scale * scale, delta))
    return SoftmaxMoments(m.squeeze(dim), *(x.sum(dim) for x in sums))


def unpack_moments(state: Tensor) -> SoftmaxMoments:
    """A [..., >=STATE_MOMENTS] packed state (m, s0, s1, s2, q0, q1, q2, ...; ``stat_layout``) as
    ``SoftmaxMoments``."""
    return SoftmaxMoments(*state[..., :STATE_MOMENTS].unbind(-1))


# ---------------------------------------------------------------------------
# Backward. With x = z / t, p = softmax(x) and upstream gradients a (of logprob)
# and b (of entropy), per row:
#     d logprob / dz_j = (onehot_j - p_j) / t
#     d H / dz_j       = -p_j (log p_j + H) / t
#     grad_j = (a onehot_j - p_j (a + b (log p_j + H))) / t
# Everything a row needs is packed into five scalars (``BACKWARD_PARAMS``) and the
# column of its one-hot, so the kernel and this twin take the same inputs.

BACKWARD_PARAMS = ("row_max", "log_s0", "entropy", "coef_logprob", "coef_entropy")


def backward_row_params(
    row_max: Tensor,
    log_s0: Tensor,
    entropy: Tensor | None,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    target_in_range: Tensor | None,
    target_ignored: Tensor | None,
) -> Tensor:
    """[5, R] per-row backward parameters in ``BACKWARD_PARAMS`` order.

    ``target_in_range`` marks rows whose target is a real column, ``target_ignored``
    rows whose target is ``ignore_index`` (logprob is the constant 0 there: no
    gradient). Other rows (an unchecked out-of-range target) have a NaN logprob, so
    a logprob gradient makes their gradient NaN. Rows whose moments are not finite
    (all ``-inf``, ``+inf`` or NaN logits) have NaN statistics and get NaN
    gradients, as autograd through a float64 reference gives.
    """
    dtype = row_max.dtype
    zeros = torch.zeros_like(row_max)
    coef_logprob = zeros if grad_logprob is None else grad_logprob.reshape(-1).to(dtype)
    if grad_logprob is not None and target_in_range is not None:
        coef_logprob = torch.where(target_ignored, 0.0,
                                   torch.where(target_in_range, coef_logprob, float("nan")))
    coef_entropy = zeros if grad_entropy is None else grad_entropy.reshape(-1).to(dtype)
    entropy = zeros if grad_entropy is None else entropy.reshape(-1).to(dtype)
    bad = ~(torch.isfinite(row_max) & torch.isfinite(log_s0))
    coef_logprob = torch.where(bad, float("nan"), coef_logprob)
    coef_entropy = torch.where(bad, float("nan"), coef_entropy)
    return torch.stack([row_max, log_s0, entropy, coef_logprob, coef_entropy])


def logits_grad(z: Tensor, params: Tensor, target_cols: Tensor, inv_t: float, out: Tensor,
                entropy_term: bool = True) -> None:
    """Write the gradient of ``a logprob + b entropy`` w.r.t. the raw logits ``z`` [R, C]
    into ``out`` [R, C] (``out`` may be ``z`` itself: every element is read before it
    is written). ``params`` [5, R] from ``backward_row_params``; ``target_cols`` [R]
    int64 holds the one-hot column in ``z``'s coordinates, or -1 when the target is
    elsewhere (ignored, another vocabulary slice or rank). ``entropy_term=False`` promises
    that every ``coef_entropy`` is 0 (log-prob-only gradients) and skips that term.
    """
    row_max, log_s0, ent, coef_logprob, coef_entropy = (x.unsqueeze(1) for x in params)
    # grad = p (c0 + c1 log p) + onehot a / t with per-row c0 = -(a + b H) / t, c1 = -b / t:
    # few in-place passes over one block-sized temporary besides p (on CPU each pass costs
    # about as much as the exp, so the count matters).
    c0 = (coef_logprob + coef_entropy * ent).mul_(-inv_t)
    logp = torch.sub(z.to(params.dtype), row_max)
    if inv_t != 1.0:
        logp.mul_(inv_t)
    logp.sub_(log_s0)
    p = torch.exp(logp)
    if entropy_term:
        # Entries with p = 0 (-inf logits, underflow) must give 0, not 0 * -inf: clamp log p
        # below the smallest log a nonzero p can have. NaN survives clamp, so NaN rows stay NaN.
        info = torch.finfo(params.dtype)
        logp.clamp_(min=math.log(info.tiny * info.eps) - 1.0)
        grad = logp.mul_(coef_entropy * -inv_t).add_(c0).mul_(p)
    else:
        grad = torch.mul(p, c0, out=logp)
    has = (target_cols >= 0).unsqueeze(1)
    col = target_cols.clamp(min=0).unsqueeze(1)
    grad.scatter_add_(1, col, torch.where(has, coef_logprob * inv_t, 0.0))
    out.copy_(grad)
