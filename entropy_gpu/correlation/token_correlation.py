"""Public API: token statistics plus their per-sequence Pearson correlation.

The logits are read once, by ``token_stats``; the correlation then runs over two
of its per-token outputs (N floats each), which is negligible next to the N x V
logits. On GPU that is two launches: the token-statistics kernel and one
segment co-moment kernel for all sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._validation import check_logits, check_mask, plan_call
from ..moments import STAT_NAMES, TARGET_STATS
from ..stats import TokenStats, run_token_stats
from .comoments import Correlation, correlation
from .pearson import check_segments, segment_comoments


def _check_pair_names(pair: object, has_targets: bool) -> tuple[str, str]:
    if isinstance(pair, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"pair must be two statistic names, e.g. ('entropy', 'nll_grad_norm'), got {pair!r}")
    unknown = [p for p in pair if p not in STAT_NAMES]
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown} in pair; choose from {STAT_NAMES}")
    if pair[0] == pair[1]:
        raise ValueError(f"pair must name two different statistics, got {pair!r}")
    needing = [p for p in pair if p in TARGET_STATS]
    if needing and not has_targets:
        raise ValueError(f"{needing} need targets: pass targets=...")
    return pair[0], pair[1]


def token_stats_with_correlation(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    pair: tuple[str, str] = ("entropy", "nll_grad_norm"),
    temperature: float = 1.0,
    ignore_index: int = -100,
    stats: str | Iterable[str] | None = None,
    backend: str = "auto",
    check_targets_range: bool = True,
    check_cu_seqlens: bool = True,
) -> tuple[TokenStats, Correlation]:
    """``token_stats`` and, per sequence, the Pearson correlation of two of its fields.

    Sequences are the rows of the last leading dimension (logits ``[..., T, V]`` give a
    ``Correlation`` of shape ``[...]``), or, with ``cu_seqlens``, the packed segments of
    the flattened tokens (logits ``[N, V]`` or ``[1, N, V]``; shape ``[S]``).

    A token is used when ``mask`` is True there (default: everywhere) and, when
    ``targets`` are given, its target is not ``ignore_index`` (prompt and padding
    tokens, whose target-dependent fields are 0, stay out).

    Args:
        logits, targets, temperature, ignore_index, backend: as in ``token_stats``.
        mask: bool, shape ``logits.shape[:-1]``; True = the token counts.
        cu_seqlens: int32/int64 ``[S + 1]`` offsets of packed sequences.
        pair: the two statistics to correlate (default entropy vs nll_grad_norm,
            the CorR-PO pair).
        stats: as in ``token_stats``; the two ``pair`` fields are always computed too.
        check_targets_range, check_cu_seqlens: the two input checks that need a host
            sync (see ``token_stats`` and ``segment_pearson``); False skips them.

    Returns:
        ``(TokenStats, Correlation)``; the logits are read once.
    """
    check_logits(logits)
    first, second = _check_pair_names(pair, targets is not None)
    lead = logits.shape[:-1]
    if mask is not None:
        check_mask(mask, logits[..., 0])  # shape logits.shape[:-1], same device
    if cu_seqlens is None and len(lead) == 0:
        raise ValueError(
            "logits must have shape [..., T, V] (a sequence dimension) or cu_seqlens must be given"
        )
    if cu_seqlens is not None:
        if len(lead) != 1 and not (len(lead) == 2 and lead[0] == 1):
            raise ValueError(f"with cu_seqlens, logits must be [N, V] or [1, N, V], "
                             f"got {tuple(logits.shape)}")
        max_length = check_segments(cu_seqlens, lead.numel(), logits.device, check_cu_seqlens)
    plan = plan_call(device=logits.device, lead_shape=tuple(lead), vocab=logits.shape[-1], targets=targets,
                     temperature=temperature, ignore_index=ignore_index, stats=stats, backend=backend,
                     check_targets_range=check_targets_range)
    plan = plan._replace(want=tuple(w or s in (first, second) for s, w in zip(STAT_NAMES, plan.want)))
    name = plan.backend
    out = run_token_stats(logits, targets, plan, int(ignore_index))

    x = getattr(out, first).reshape(-1)
    y = getattr(out, second).reshape(-1)
    used = torch.ones(lead, dtype=torch.bool, device=logits.device) if mask is None else mask
    if targets is not None:
        used = used & (targets != ignore_index)
    weight = used.reshape(-1).to(x.dtype)
    if cu_seqlens is None:
        length = lead[-1]
        offsets = torch.arange(lead[:-1].numel() + 1, device=logits.device, dtype=torch.int64) * length
        moments = segment_comoments(x, y, weight, offsets, length, name)
        result = Correlation(*(t.view(lead[:-1]) for t in correlation(moments, x.dtype)))
    else:
        result = correlation(segment_comoments(x, y, weight, cu_seqlens, max_length, name), x.dtype)
    return out, result
