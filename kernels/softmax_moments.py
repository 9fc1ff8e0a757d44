"""Triton helpers for the single-pass softmax moments (docs/numerics.md, "One pass over a row").

A row (or a slice of a row) is summarised by its running maximum ``m`` of the raw
logits and, with centred values ``d = (z - m) / t``, the sums

    s_k = sum_i e^{d_i} d_i^k        (k = 0, 1, 2)
    q_k = sum_i e^{2 d_i} d_i^k      (k = 0, 1, 2), over every entry but the target

The q-sums leave the target out so that ``sum_{i != y} p_i^2`` (needed by
``nll_grad_norm``) is a sum of positive terms instead of the cancellation-prone
``S - p_y^2``; the target's own term is added back where a full sum is needed.

These helpers are shared by every kernel that produces or merges such states.
"""

import triton
import triton.language as tl


@triton.jit
def recentre_moments(a0, a1, a2, scale, delta, NEED_1: tl.constexpr, NEED_2: tl.constexpr):
    """Move sums of ``e^{k d} d^j`` (j = 0, 1, 2) to a new centre ``d' = d + delta``.

    ``scale`` is ``e^{k delta}``. With ``sum e^{k d'} d'^j = scale * sum e^{k d} (d + delta)^j``
    the update is exact; the order below uses each old value before it is replaced.
    """
    if NEED_2:
        a2 = scale * (a2 + delta * (2.0 * a1 + delta * a0))
    if NEED_1:
        a1 = scale * (a1 + delta * a0)
    a0 = scale * a0
    return a0, a1, a2


@triton.jit
def recentre_factors(m, m_new, inv_t):
    """(delta, scale) for :func:`recentre_moments` of the s-sums kept on the maximum ``m``,
    moved to the maximum ``m_new >= m`` (the q-sums take ``scale * scale``). A -inf ``m``
    means nothing finite was seen yet: the sums are zero and stay zero."""
    delta = tl.where(m == float("-inf"), 0.0, (m - m_new) * inv_t)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(delta))
    return delta, scale


@triton.jit
def recentre_on_max(m, m_new, inv_t, s0, s1, s2, q0, q1, q2,
                    NEED_S1: tl.constexpr, NEED_S2: tl.constexpr, NEED_Q0: tl.constexpr,
                    NEED_Q12: tl.constexpr):
    """The online-softmax step: move the s- and q-sums kept on the maximum ``m`` to the
    maximum ``m_new >= m`` (q-sums only when ``NEED_Q0 or NEED_Q12``)."""
    delta, scale = recentre_factors(m, m_new, inv_t)
    s0, s1, s2 = recentre_moments(s0, s1, s2, scale, delta, NEED_S1, NEED_S2)
    if NEED_Q0 or NEED_Q12:
        q0, q1, q2 = recentre_moments(q0, q1, q2, scale * scale, delta, NEED_Q12, NEED_Q12)
    return s0, s1, s2, q0, q1, q2


@triton.jit
def row_pointer(logits_ptr, row, inner_rows, stride_outer, stride_inner):
    """Address of row ``row`` of a [outer, inner, V] strided view (int64 offsets)."""
    return logits_ptr + (row // inner_rows) * stride_outer + (row % inner_rows) * stride_inner


@triton.jit
def load_target(targets_ptr, row, vocab, ignore_index, HAS_TARGETS: tl.constexpr):
    """Return (target, in_range, ignored) for one row; in_range excludes ignored rows."""
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row).to(tl.int64)
        ignored = target == ignore_index
    else:
        target = tl.full([], -1, tl.int64)
        ignored = tl.full([], 0, tl.int1)
    in_range = (target >= 0) & (target < vocab) & (ignored == 0)
    return target, in_range, ignored


@triton.jit
def store_token_stats(
    out_ptr, n_rows, row,
    m, s0, s1, s2, q0x, q1x, q2x,
    row_ptr, stride_vocab, target, in_range, ignored, inv_t,
    ACC: tl.constexpr,
    W_LSE: tl.constexpr, W_ENT: tl.constexpr, W_LOGPROB: tl.constexpr, W_SUMSQ: tl.constexpr,
    W_NLL_GRAD: tl.constexpr, W_VARENT: tl.constexpr, W_ENT_GRAD: tl.constexpr,
    W_ENT_CHANGE: tl.constexpr, W_STATE: tl.constexpr,
):
    """Turn one row's final moments into the requested statistics and store them.

    ``out_ptr`` is a [8, n_rows] buffer in the order logsumexp, entropy, logprob,
    sum_sq_probs, nll_grad_norm, varentropy, entropy_grad_norm, entropy_change; with ``W_STATE`` it
    has two more rows (``stat_layout.SAVED_ROW_MAX``, ``SAVED_LOG_S0``), the raw row
    maximum ``m`` and ``log s0``, which the backward
    needs to rebuild ``log p`` exactly (``(z - m) / t - log s0``; a rounded
    ``logsumexp`` would cost ~1e-3 at logit scale 1e4).
    """
    log_s0 = tl.log(s0)
    mu = s1 / s0
    # The target's own term of the q-sums (left out during the scan).
    z_t = tl.load(row_ptr + tl.where(in_range, target, 0) * stride_vocab, mask=in_range, other=0.0).to(ACC)
    d_t = (z_t - m) * inv_t
    e_t = tl.where(in_range, tl.exp(d_t), 0.0)
    e2_t = e_t * e_t
    d_t_term = tl.where(e_t > 0, d_t, 0.0)  # e_t == 0 when z_t == -inf: avoid 0 * inf
    q0 = q0x + e2_t
    inv_s0_sq = 1.0 / (s0 * s0)
    nan = float("nan")
    # One output row after another: pointer steps, so no int32 product k * n_rows.
    out = out_ptr + row
    if W_LSE:
        tl.store(out, m * inv_t + log_s0)
    out += n_rows
    if W_ENT:
        tl.store(out, log_s0 - mu)
    out += n_rows
    logprob = d_t - log_s0
    if W_LOGPROB:
        value = tl.where(in_range, logprob, nan)
        tl.store(out, tl.where(ignored, 0.0, value))
    out += n_rows
    if W_SUMSQ:
        tl.store(out, q0 * inv_s0_sq)
    out += n_rows
    if W_NLL_GRAD:
        # ||p - onehot(y)||^2 = (1 - p_y)^2 + sum_{i != y} p_i^2, both terms without cancellation.
        one_minus_p = 1.0 - tl.exp(logprob)
        norm = inv_t * tl.sqrt(one_minus_p * one_minus_p + q0x * inv_s0_sq)
        value = tl.where(in_range, norm, nan)
        tl.store(out, tl.where(ignored, 0.0, value))
    out += n_rows
    if W_VARENT:
        var = s2 / s0 - mu * mu
        tl.store(out, tl.where(var < 0.0, 0.0, var))  # keeps NaN
    out += n_rows
    if W_ENT_GRAD:
        q1 = q1x + e2_t * d_t_term
        q2 = q2x + e2_t * d_t_term * d_t_term
        sq = (q2 - 2.0 * mu * q1 + mu * mu * q0) * inv_s0_sq
        tl.store(out, inv_t * tl.sqrt(tl.where(sq < 0.0, 0.0, sq)))
    out += n_rows
    if W_ENT_CHANGE:
        # grad H . grad log p_y = ((q1 - mu q0)_{i != y} / s0^2 - p_y (1 - p_y)(log p_y + H)) / t^2
        # (moments.entropy_change, the torch twin).
        p_y = tl.exp(logprob)
        target_term = tl.where(p_y > 0.0, p_y * (1.0 - p_y) * (logprob + log_s0 - mu), 0.0)
        change = ((q1x - mu * q0x) * inv_s0_sq - target_term) * (inv_t * inv_t)
        value = tl.where(in_range, change, nan)
        tl.store(out, tl.where(ignored, 0.0, value))
    if W_STATE:
        out += n_rows
        tl.store(out, m)
        out += n_rows
        tl.store(out, log_s0)
