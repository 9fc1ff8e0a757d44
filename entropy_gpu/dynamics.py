"""Per-step entropy-dynamics metrics from ``entropy_change`` (docs/numerics.md, "entropy_change").

A policy-gradient step raises each sampled token's log-probability in proportion to its
advantage ``A``. On the token's own logits that step changes the token's entropy, to
first order, by ``A * entropy_change`` (times the step size): negative values push the
entropy down. :func:`entropy_change_metrics` summarises that predicted direction over the
completion tokens of a batch; the trainer integrations (TRL, verl) log it every step.
Tensors in, floats out; no trainer code here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ENTROPY_CHANGE_QUANTILES", "entropy_change_metrics"]

ENTROPY_CHANGE_QUANTILES = (0.1, 0.5, 0.9)


def entropy_change_metrics(entropy_change: Tensor, advantages: Tensor, mask: Tensor, *,
                           quantiles: Sequence[float] = ENTROPY_CHANGE_QUANTILES,
                           prefix: str = "entropy_change/") -> dict[str, float]:
    """Summary of the predicted entropy movement ``A * entropy_change`` over masked tokens.

    Args:
        entropy_change: ``[B, T]`` per-token ``entropy_change`` (``token_stats``).
        advantages: ``[B]`` (one per sequence, GRPO) or ``[B, T]`` (per token).
        mask: ``[B, T]``, true (or nonzero) on the tokens the loss trains.
        quantiles: levels in ``[0, 1]`` of the per-token ``A * entropy_change`` to report.
        prefix: prepended to every key.

    Returns:
        ``{prefix + key: float}`` with keys ``adv_weighted_mean`` (mean over tokens of
        ``A * entropy_change``: the logit-space predicted entropy change per unit step),
        ``frac_pushing_down`` (fraction of tokens with ``A * entropy_change < 0``), ``mean``
        (mean ``entropy_change`` itself), ``q<level>`` (e.g. ``q10``, ``q50``, ``q90``) and
        ``tokens`` (how many tokens entered). Computed in float64; tokens whose
        ``entropy_change`` or advantage is not finite are left out. With no tokens every
        value but ``tokens`` is NaN.
    """
    if entropy_change.dim() != 2:
        raise ValueError(f"entropy_change must be [B, T], got shape {tuple(entropy_change.shape)}")
    if mask.shape != entropy_change.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the entropy_change shape "
                         f"{tuple(entropy_change.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != entropy_change.shape[0]:
            raise ValueError(f"advantages [B] has {advantages.shape[0]} rows, entropy_change "
                             f"{entropy_change.shape[0]}")
        advantages = advantages.unsqueeze(1).expand_as(entropy_change)
    elif advantages.shape != entropy_change.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(entropy_change.shape)}, "
                         f"got {tuple(advantages.shape)}")
    levels = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in levels):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    change = entropy_change.detach().double()
    adv = advantages.detach().to(change.device, torch.float64)
    keep = mask.to(change.device).bool() & torch.isfinite(change) & torch.isfinite(adv)
    predicted = (adv * change)[keep]
    n = predicted.numel()
    nan = float("nan")
    out = {
        "adv_weighted_mean": float(predicted.mean()) if n else nan,
        "frac_pushing_down": float((predicted < 0).double().mean()) if n else nan,
        "mean": float(change[keep].mean()) if n else nan,
    }
    if levels:
        at = torch.tensor(levels, dtype=torch.float64, device=predicted.device)
        values = torch.quantile(predicted, at) if n else torch.full((len(levels),), nan)
        for q, v in zip(levels, values.tolist()):
            out[f"q{round(100 * q):g}"] = float(v)
    out["tokens"] = float(n)
    return {prefix + k: v for k, v in out.items()}
