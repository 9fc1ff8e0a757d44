"""CorR-PO: a GRPO reward regularizer from the entropy-gradient correlation (docs/corrpo.md).

For completion ``i`` of a group, over its completion tokens::

    rho_i  = Pearson(entropy_t, g_t)                 g: a per-token gradient measure
    r'_i   = r_i + coef * clip(phi(rho_i))           phi(rho) = -rho by default: rewards inversion
    A_i    = (r'_i - mean_group r') / (std_group r' + eps)

An undefined ``rho_i`` (fewer than two tokens, constant entropy or measure) contributes 0
to the reward and is counted in the metrics; it never turns into NaN. Trainer-independent:
the TRL integration (``entropy_gpu.integrations.trl``) feeds it TRL's completions.
Defaults and their reasons: docs/corrpo.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from entropy_gpu import (
    Correlation,
    pearson,
    segment_pearson,
    spearman,
    token_stats,
    token_stats_with_correlation,
)
from entropy_gpu.param_grad.calibrated import MeasureCalibration

#: Logit-space measures: exact, from the same pass over the logits as the entropy.
GRADIENT_MEASURES = ("nll_grad_norm", "entropy_grad_norm")
#: The paper's measure, estimated with forward-mode JVPs (``ParamGradMeasure``).
PARAM_GRAD_MEASURE = "param_grad_fro"
PARAM_GRAD_METHODS = ("forward_mode", "same_position", "one_hop", "calibrated", "exact")
PHI_NAMES = ("negate", "negative_part", "identity")
Phi = Literal["negate", "negative_part", "identity"] | Callable[[Tensor], Tensor]
_ATTENTION_PROJECTIONS = ("*.self_attn.q_proj.weight", "*.self_attn.k_proj.weight",
                          "*.self_attn.v_proj.weight", "*.self_attn.o_proj.weight")


@dataclass(frozen=True)
class ParamGradMeasure:
    """The CorR-PO paper's gradient measure: the Frobenius norm of the gradient of the sampled
    token's raw logit w.r.t. the selected parameters, for every token of a batch at once.

    Attributes:
        method: ``"same_position"`` (default): exact gradients with the cross-position
            attention paths dropped, from one forward and one backward for the whole batch
            (``entropy_gpu.param_grad.estimate.same_position_grad_norms``); an
            approximation, the one that tracked the exact measure best per unit of cost.
            ``"forward_mode"``: unbiased estimate from ``k`` forward-mode passes (JVPs,
            ``entropy_gpu.estimate_logit_param_grad_norms``), noisier per response. Fidelity
            and cost of both: docs/corrpo.md. ``"one_hop"``: same-position, but the value
            projections keep the paths through every earlier position's value in the token's
            own attention read (``one_hop_values``); same cost. ``"calibrated"``: the
            same-position pass with a per-model correction for the dropped paths
            (``entropy_gpu.param_grad.calibrated``), fitted on exact norms of that model;
            needs ``calibration``. ``"exact"``: the paper's measure itself, every cross-position
            path kept (``entropy_gpu.batched_logit_param_grad_norms``); costs about one backward
            pass of the batch per completion token, so it is for small models (the reasoning
            testbed's 0.9 M-parameter Llama), not for LLMs.
        k: random directions (forward-mode passes, ``method="forward_mode"``); the per-token
            relative standard deviation of the squared-norm estimate is about ``sqrt(2 / k)``.
        param_patterns: fnmatch patterns over parameter names (default: q/k/v/o projections).
        directions_per_pass: directions batched into one forward (memory vs speed).
        seed: seed of the directions; every generation batch uses the same directions.
        calibration: ``method="calibrated"`` only: a ``MeasureCalibration`` or the path of
            its JSON file (``MeasureCalibration.save``; the fidelity experiment's ``--fit``).
    """

    method: Literal["forward_mode", "same_position", "one_hop", "calibrated", "exact"] = "same_position"
    k: int = 8
    param_patterns: tuple[str, ...] = _ATTENTION_PROJECTIONS
    directions_per_pass: int = 8
    seed: int = 0
    calibration: str | MeasureCalibration | None = None

    def __post_init__(self) -> None:
        if self.method not in PARAM_GRAD_METHODS:
            raise ValueError(f"ParamGradMeasure.method must be one of {PARAM_GRAD_METHODS}, "
                             f"got {self.method!r}")
        if (self.method == "calibrated") != (self.calibration is not None):
            raise ValueError('ParamGradMeasure.calibration goes with method="calibrated", and only with it')
        if isinstance(self.calibration, (str, PathLike)):
            try:
                object.__setattr__(self, "calibration", MeasureCalibration.load(self.calibration))
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(f"ParamGradMeasure.calibration: cannot read {str(self.calibration)!r}: "
                                 f"{error}") from error
        elif self.calibration is not None and not isinstance(self.calibration, MeasureCalibration):
            raise ValueError("ParamGradMeasure.calibration must be a MeasureCalibration or a path, "
                             f"got {type(self.calibration).__name__}")
        for name in ("k", "directions_per_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParamGradMeasure.{name} must be an int >= 1, got {value!r}")
        patterns = ((self.param_patterns,) if isinstance(self.param_patterns, str)
                    else tuple(self.param_patterns))
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError("ParamGradMeasure.param_patterns must be non-empty strings, "
                             f"got {self.param_patterns!r}")
        object.__setattr__(self, "param_patterns", patterns)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ParamGradMeasure.seed must be an int, got {self.seed!r}")

    @property
    def name(self) -> str:
        return PARAM_GRAD_MEASURE


Measure = str | ParamGradMeasure


@dataclass(frozen=True)
class CorrPOConfig:
    """What the regularizer computes; see docs/corrpo.md for why these defaults.

    Attributes:
        coef: ``lambda``, the weight of ``phi(rho)`` added to the task reward.
        measure: the per-token gradient measure correlated with the entropy. The paper's
            measure, ``"param_grad_fro"`` or a ``ParamGradMeasure`` (its ``k`` and parameter
            selection): the parameter-gradient norm of the sampled token's logit, estimated
            with forward-mode passes of the model (``corrpo_from_model``). Or a logit-space
            measure from the logits alone: ``"nll_grad_norm"`` (``||d(-log p_y)/dz||``) or
            ``"entropy_grad_norm"`` (``||dH/dz||``); these are not estimates of the paper's
            measure (docs/corrpo.md).
        phi: ``"negate"`` (``-rho``: rewards inversion, penalizes positive correlation),
            ``"negative_part"`` (``max(-rho, 0)``: rewards inversion only), ``"identity"``
            (``+rho``: rewards the opposite sign, the counterfactual arm of an experiment), or a callable on a
            tensor of correlations (applied to defined values only).
        clip: if set, ``phi(rho)`` is clipped to ``[-clip, clip]`` before weighting.
        pooling: ``"completion"``: Pearson over each completion's own tokens.
            ``"group"``: entropy and measure are standardized with the moments of all
            completion tokens of the GRPO group, and ``rho_i`` is the mean of the product of
            the standardized values over completion ``i``'s tokens (its share of the group's
            pooled Pearson; the token-weighted mean of ``rho_i`` over a group is that Pearson).
        method: ``"pearson"`` or ``"spearman"`` (rank correlation; completion pooling and
            padded layout only).
    """

    coef: float = 0.1
    measure: Measure = PARAM_GRAD_MEASURE
    phi: Phi = "negate"
    clip: float | None = None
    pooling: Literal["completion", "group"] = "completion"
    method: Literal["pearson", "spearman"] = "pearson"

    def __post_init__(self) -> None:
        if not isinstance(self.coef, (int, float)) or not torch.isfinite(torch.tensor(float(self.coef))):
            raise ValueError(f"coef must be a finite number, got {self.coef!r}")
        if self.measure == PARAM_GRAD_MEASURE:
            object.__setattr__(self, "measure", ParamGradMeasure())
        if not isinstance(self.measure, ParamGradMeasure) and self.measure not in GRADIENT_MEASURES:
            raise ValueError(f"measure must be one of {GRADIENT_MEASURES + (PARAM_GRAD_MEASURE,)} or a "
                             f"ParamGradMeasure, got {self.measure!r}")
        if not callable(self.phi) and self.phi not in PHI_NAMES:
            raise ValueError(f"phi must be one of {PHI_NAMES} or a callable, got {self.phi!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be positive or None, got {self.clip!r}")
        if self.pooling not in ("completion", "group"):
            raise ValueError(f"pooling must be 'completion' or 'group', got {self.pooling!r}")
        if self.method not in ("pearson", "spearman"):
            raise ValueError(f"method must be 'pearson' or 'spearman', got {self.method!r}")
        if self.method == "spearman" and self.pooling == "group":
            raise ValueError("method='spearman' supports pooling='completion' only")

    @property
    def measure_name(self) -> str:
        """``"param_grad_fro"`` or the logit-space measure's name (for metrics and columns)."""
        return self.measure.name if isinstance(self.measure, ParamGradMeasure) else self.measure

    @property
    def needs_model(self) -> bool:
        """True when the measure needs the model itself (forward-mode passes), not just logits."""
        return isinstance(self.measure, ParamGradMeasure)


class CorrPOOutput(NamedTuple):
    """Per-completion results, shape ``[N]`` (``N`` completions, groups contiguous)."""

    correlation: Tensor        #: rho_i, float32, NaN where undefined
    valid: Tensor              #: bool, rho_i defined
    term: Tensor               #: clip(phi(rho_i)), 0 where undefined (the unweighted reward column)
    bonus: Tensor              #: coef * term
    rewards: Tensor | None     #: r_i + bonus, if task rewards were given
    advantages: Tensor | None  #: group-normalized advantages of ``rewards``, if given
    metrics: dict[str, float]  #: ``corrpo/*`` scalars to log


def _apply_phi(phi: Phi, rho: Tensor) -> Tensor:
    if phi == "negate":
        return -rho
    if phi == "negative_part":
        return (-rho).clamp(min=0.0)
    if phi == "identity":
        return rho
    return phi(rho)


def corrpo_term(correlation: Tensor, valid: Tensor, config: CorrPOConfig) -> Tensor:
    """``clip(phi(rho))`` where ``valid``, else 0 (float32). NaN never leaves this function."""
    safe_rho = torch.where(valid, correlation.float(), 0.0)  # phi never sees NaN
    term = _apply_phi(config.phi, safe_rho).float()
    if config.clip is not None:
        term = term.clamp(-config.clip, config.clip)
    return torch.where(valid & torch.isfinite(term), term, 0.0)


def _segment_ids(values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> tuple[Tensor, int]:
    """Completion index of every token to keep (flattened), and the number of completions."""
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        keep = mask.reshape(-1).bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        return ids[keep], lengths.numel()
    n, t = values.shape
    ids = torch.arange(n, device=values.device).unsqueeze(1).expand(n, t)
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return ids[keep], n


def _flat_tokens(values: Tensor, mask: Tensor | None) -> Tensor:
    return values.reshape(-1)[mask.reshape(-1).bool()] if mask is not None else values.reshape(-1)


def group_pooled_correlations(
    entropy: Tensor, measure: Tensor, mask: Tensor | None, group_size: int, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(rho_i, valid_i) with group-pooled moments (``pooling="group"``), float64 internally.

    ``rho_i = mean_{t in i} z_H(t) z_g(t)`` with ``z`` standardized by the mean and the
    (population) standard deviation of all kept tokens of completion ``i``'s group. Defined
    when completion ``i`` has a token and its group has two or more tokens and non-zero
    variance in both series.
    """
    seg, n_completions = _segment_ids(entropy, mask, cu_seqlens)
    if n_completions % group_size:
        raise ValueError(f"{n_completions} completions do not split into groups of group_size={group_size}")
    x, y = _flat_tokens(entropy, mask).double(), _flat_tokens(measure, mask).double()
    group = seg // group_size
    n_groups = n_completions // group_size

    def group_sum(v: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, group, v)

    count = group_sum(torch.ones_like(x))
    mean_x, mean_y = group_sum(x) / count.clamp(min=1), group_sum(y) / count.clamp(min=1)
    dx, dy = x - mean_x[group], y - mean_y[group]  # centred first: two-pass, no cancellation
    var_x, var_y = group_sum(dx * dx) / count.clamp(min=1), group_sum(dy * dy) / count.clamp(min=1)
    group_ok = (count >= 2) & (var_x > 0) & (var_y > 0)
    scale = torch.where(group_ok, (var_x * var_y).rsqrt(), 0.0)
    products = dx * dy * scale[group]
    per_completion = torch.zeros(n_completions, dtype=torch.float64, device=x.device).index_add_(
        0, seg, products)
    tokens = torch.zeros(n_completions, dtype=torch.float64, device=x.device).index_add_(
        0, seg, torch.ones_like(x))
    valid = group_ok.repeat_interleave(group_size) & (tokens > 0)
    rho = torch.where(valid, per_completion / tokens.clamp(min=1), float("nan"))
    return rho.float(), valid


def completion_correlations(
    entropy: Tensor,
    measure: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    config: CorrPOConfig = CorrPOConfig(),
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(rho_i, valid_i) per completion from per-token statistics.

    Layouts: padded ``[N, T]`` with a completion ``mask`` (1 = completion token), or packed
    ``[total]`` with ``cu_seqlens`` (``[N + 1]`` offsets; ``mask`` optional).
    """
    if entropy.shape != measure.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and measure {tuple(measure.shape)} differ in shape")
    if mask is not None and mask.shape != entropy.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of entropy {tuple(entropy.shape)}")
    if cu_seqlens is None and entropy.dim() != 2:
        raise ValueError("padded layout needs [N, T] statistics; pass cu_seqlens for packed [total] ones")
    if cu_seqlens is not None and entropy.dim() != 1:
        raise ValueError("packed layout (cu_seqlens) needs 1-D [total] statistics")
    if config.pooling == "group":
        n = entropy.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        return group_pooled_correlations(entropy, measure, mask, group_size or n, cu_seqlens)
    if config.method == "spearman":
        if cu_seqlens is not None:
            raise ValueError("method='spearman' needs the padded [N, T] layout")
        c = spearman(entropy, measure, mask=mask, dim=-1)
    elif cu_seqlens is not None:
        if mask is not None:  # drop unmasked tokens, then re-cut the segments
            keep = mask.bool()
            kept = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long, device=entropy.device)
            kept.index_add_(0, _segment_ids(entropy, None, cu_seqlens)[0], keep.long())
            cu_seqlens = torch.cat([kept.new_zeros(1), kept.cumsum(0)])
            entropy, measure = entropy[keep], measure[keep]
        c = segment_pearson(entropy, measure, cu_seqlens)
    else:
        c = pearson(entropy, measure, mask=mask, dim=-1)
    return _as_pair(c)


def _as_pair(c: Correlation) -> tuple[Tensor, Tensor]:
    valid = c.valid.bool()
    return torch.where(valid, c.corr.float(), float("nan")), valid


def group_advantages(rewards: Tensor, group_size: int, *, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)`` for contiguous groups.

    ``std`` is the unbiased (Bessel-corrected) standard deviation, as in TRL; ``scale="batch"``
    divides by the batch std instead, ``"none"`` only centres. Rewards must be finite.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    grouped = rewards.double().view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "none":
        return centred.to(rewards.dtype)
    if scale == "group":
        std = (grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1
               else torch.zeros_like(centred))
    elif scale == "batch":
        std = rewards.double().std() if rewards.numel() > 1 else torch.zeros((), dtype=torch.float64)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return (centred / (std + eps)).to(rewards.dtype)


def corrpo_metrics(entropy: Tensor, measure: Tensor, mask: Tensor | None, correlation: Tensor, valid: Tensor,
                   bonus: Tensor, measure_name: str = "nll_grad_norm") -> dict[str, float]:
    """``corrpo/*`` scalars: mean rho and inversion rate over defined completions (NaN if none),
    count and fraction of undefined ones, mean entropy and measure over completion tokens, mean bonus."""
    defined = correlation[valid].double()
    tokens_h, tokens_g = _flat_tokens(entropy, mask).double(), _flat_tokens(measure, mask).double()
    nan = float("nan")
    return {
        "corrpo/correlation": defined.mean().item() if defined.numel() else nan,
        "corrpo/inversion_rate": (defined < 0).double().mean().item() if defined.numel() else nan,
        "corrpo/undefined": float((~valid).sum().item()),
        "corrpo/undefined_fraction": (~valid).double().mean().item() if valid.numel() else nan,
        "corrpo/entropy": tokens_h.mean().item() if tokens_h.numel() else nan,
        f"corrpo/{measure_name}": tokens_g.mean().item() if tokens_g.numel() else nan,
        "corrpo/bonus": bonus.double().mean().item() if bonus.numel() else nan,
    }


def corrpo_from_stats(
    entropy: Tensor,
    measure: Tensor,
    mask: Tensor | None = None,
    *,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    config: CorrPOConfig = CorrPOConfig(),
    cu_seqlens: Tensor | None = None,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> CorrPOOutput:
    """CorR-PO from precomputed per-token entropy and gradient measure.

    Args:
        entropy, measure: ``[N, T]`` (padded, with ``mask``) or ``[total]`` (packed, with
            ``cu_seqlens``), e.g. fields of ``entropy_gpu.token_stats`` at the sampling temperature.
        mask: 1 for completion tokens the policy generated (not prompt, padding or tool output).
        rewards: task rewards ``[N]`` (already weighted and summed over reward functions).
        group_size: completions per prompt (GRPO's ``num_generations``); groups are contiguous.
            None means one group of all ``N``.
        config: see ``CorrPOConfig``.
        scale_rewards, eps: advantage normalization (see ``group_advantages``).

    Returns:
        ``CorrPOOutput``; ``rewards``/``advantages`` are None when ``rewards`` is None.
    """
    correlation, valid = completion_correlations(entropy, measure, mask, cu_seqlens=cu_seqlens, config=config,
                                                 group_size=group_size)
    return _finish(entropy, measure, mask, correlation, valid, rewards, group_size, config, scale_rewards,
                   eps)


def corrpo_from_logits(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    config: CorrPOConfig = CorrPOConfig(),
    temperature: float = 1.0,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
    backend: str = "auto",
) -> CorrPOOutput:
    """CorR-PO from completion logits ``[N, T, V]`` (or packed ``[total, V]`` with ``cu_seqlens``)
    and the sampled tokens ``targets``, in one pass over the logits.

    ``temperature`` should be the sampling temperature. ``mask`` defaults to
    ``targets != ignore_index``. Other arguments: see ``corrpo_from_stats``.
    """
    if config.needs_model:
        raise ValueError(f"measure {config.measure_name!r} needs the model, not only its logits: use "
                         "entropy_gpu.corrpo.corrpo_from_model (or a logit-space measure)")
    if mask is None:
        mask = targets != ignore_index
    if config.pooling == "completion" and config.method == "pearson":
        # The correlation accumulates in the same launch as the statistics.
        stats, c = token_stats_with_correlation(
            logits, targets, mask=mask, cu_seqlens=cu_seqlens, pair=("entropy", config.measure),
            temperature=temperature, ignore_index=ignore_index, stats=("entropy", config.measure),
            backend=backend)
        entropy, measure = stats.entropy, getattr(stats, config.measure)
        correlation, valid = _as_pair(c)
    else:
        stats = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                            stats=("entropy", config.measure), backend=backend)
        entropy, measure = stats.entropy, getattr(stats, config.measure)
        correlation, valid = completion_correlations(entropy, measure, mask, cu_seqlens=cu_seqlens,
                                                     config=config,
                                                     group_size=group_size)
    return _finish(entropy, measure, mask, correlation, valid, rewards, group_size, config, scale_rewards,
                   eps)


def _finish(entropy, measure, mask, correlation, valid, rewards, group_size, config, scale_rewards, eps):
    term = corrpo_term(correlation, valid, config)
    bonus = config.coef * term
    new_rewards = advantages = None
    if rewards is not None:
        if rewards.shape != bonus.shape:
            raise ValueError(f"rewards must have shape {tuple(bonus.shape)} (one per completion), "
                             f"got {tuple(rewards.shape)}")
        new_rewards = rewards.float() + bonus.to(rewards.device)
        advantages = group_advantages(new_rewards, group_size or new_rewards.numel(), scale=scale_rewards,
                                      eps=eps)
    metrics = corrpo_metrics(entropy, measure, mask, correlation, valid, bonus, config.measure_name)
    return CorrPOOutput(correlation, valid, term, bonus, new_rewards, advantages, metrics)
