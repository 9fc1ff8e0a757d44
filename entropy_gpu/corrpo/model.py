"""CorR-PO from the model itself: per-token entropy and gradient measure of a generation
batch (prompt + completion ids), then the CorR-PO reward term.

The paper's measure (``ParamGradMeasure``) needs forward-mode passes of the model; the
logit-space measures need only the logits. Both come from here, so every trainer (TRL, verl,
your own loop) computes them the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from entropy_gpu import TokenStats, token_stats
from entropy_gpu.param_grad.batched_exact import batched_logit_param_grad_norms
from entropy_gpu.param_grad.calibrated import calibrated_scores, calibration_features
from entropy_gpu.param_grad.estimate import (
    check_batch,
    estimate_logit_param_grad_norms,
    same_position_grad_norms,
)
from entropy_gpu.param_grad.model_parts import (
    causal_lm,
    check_logits_match,
    compute_dtype,
    refuse_sharded,
    select_parameters,
)

from .reward import CorrPOConfig, CorrPOOutput, ParamGradMeasure, check_group_size, corrpo_from_stats


class CompletionStats(NamedTuple):
    """``[N, T]`` per-token statistics aligned with ``input_ids`` (value at ``t`` for token
    ``y_t``, 0 outside ``mask``)."""

    entropy: Tensor   #: entropy of the distribution ``y_t`` was sampled from, at the temperature
    measure: Tensor   #: the configured gradient measure
    mask: Tensor      #: bool, the completion tokens
    entropy_change: Tensor | None = None  #: ``entropy_change`` (``with_entropy_change=True``), else None


def micro_batch_token_stats(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    stats: tuple[str, ...],
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    keep: int | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    skip_without_targets: bool = False,
    each_batch: Callable[[slice, Tensor], None] | None = None,
) -> list[tuple[slice, TokenStats]]:
    """The one micro-batch loop of CorR-PO's statistics (``completion_stats``, the TRL integration):
    one forward of ``model`` per ``batch_size`` rows of ``input_ids`` ``[N, T]`` (inside
    ``forward_context()``), then one ``token_stats`` pass over that micro-batch's logits.

    The statistics ``stats`` are those of tokens ``1 .. T-1`` (the last ``keep`` when given),
    each from the logits of the position before it, at ``temperature``; tokens where
    ``target_mask`` is 0 have no target (``ignore_index``). ``forward_kwargs`` go to the model
    (e.g. ``logits_to_keep``). With ``skip_without_targets``, a micro-batch whose ``target_mask``
    is all 0 is skipped (no forward). ``each_batch(rows, logits)`` sees each micro-batch's logits
    (``[rows, T-1 or keep, V]``) before they are freed. Returns ``(rows, TokenStats)`` of every
    micro-batch run, in order.
    """
    batch_size = batch_size or input_ids.size(0)
    forward_kwargs = forward_kwargs or {}
    tokens = slice(1, None) if keep is None else slice(-keep, None)
    pieces = []
    for start in range(0, input_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        ids, mask = input_ids[rows], target_mask[rows]
        if skip_without_targets and not mask.any():
            continue
        with forward_context():
            logits = model(input_ids=ids, attention_mask=attention_mask[rows], use_cache=False,
                           **forward_kwargs).logits
        logits = logits[:, :-1] if keep is None else logits[:, :-1][:, -keep:]  # position t predicts t + 1
        targets = ids[:, tokens].masked_fill(mask[:, tokens] == 0, -100)
        pieces.append((rows, token_stats(logits, targets, temperature=temperature, stats=stats)))
        if each_batch is not None:
            each_batch(rows, logits)
        del logits
    return pieces


def completion_stats(
    model: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    config: CorrPOConfig | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
    with_entropy_change: bool = False,
) -> CompletionStats:
    """Entropy and the configured gradient measure for every completion token of a padded batch.

    Args:
        model: the policy (a Hugging Face causal LM), as it sampled the completions.
        input_ids: ``[N, T]`` prompt + completion ids (left or right padding).
        completion_mask: ``[N, T]``, 1 at the completion tokens the policy sampled.
        attention_mask: ``[N, T]``, 1 for real tokens; default all ones.
        config: its ``measure`` picks the gradient measure (default ``CorrPOConfig()``).
        temperature: the sampling temperature (entropy and logit-space measures use it; the
            parameter-gradient measure is of the raw logit, so it only scales by ``1/t``).
        batch_size: rows per forward (memory); default all.
        with_entropy_change: also return ``entropy_change`` from the same pass (the trainer
            integrations log ``A * entropy_change``; ``entropy_gpu.entropy_change_metrics``).
    """
    config = CorrPOConfig() if config is None else config
    ids, mask, attention = check_batch(input_ids, completion_mask, attention_mask)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(config.measure, ParamGradMeasure):  # before any forward: sharded models are refused
        refuse_sharded(causal_lm(model), select_parameters(causal_lm(model), config.measure.param_patterns))
    measure_name = config.measure_name
    entropy = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    measure = torch.zeros_like(entropy)
    entropy_change = torch.zeros_like(entropy) if with_entropy_change else None
    param_grad = isinstance(config.measure, ParamGradMeasure)

    def param_grad_measure(sl: slice, logits: Tensor) -> None:
        measure[sl] = _param_grad_fro(model, ids[sl], mask[sl], attention[sl], logits, config.measure).float()

    stats = ("entropy",) if config.needs_model else ("entropy", measure_name)
    if with_entropy_change:
        stats += ("entropy_change",)
    for sl, out in micro_batch_token_stats(model, ids, attention, mask, stats, temperature=temperature,
                                           batch_size=batch_size, forward_context=torch.no_grad,
                                           skip_without_targets=True,
                                           each_batch=param_grad_measure if param_grad else None):
        entropy[sl, 1:] = out.entropy.float()
        if not param_grad:
            measure[sl, 1:] = getattr(out, measure_name).float()
        if entropy_change is not None:
            entropy_change[sl, 1:] = out.entropy_change.float()
    entropy, measure = entropy * mask, measure * mask
    return CompletionStats(entropy, measure, mask, None if entropy_change is None else entropy_change * mask)


def _param_grad_fro(model: nn.Module, ids: Tensor, mask: Tensor, attention: Tensor, logits: Tensor,
                    spec: ParamGradMeasure) -> Tensor:
    """[rows, T] parameter-gradient Frobenius norm per ``spec``, its logits checked against the model's."""
    if spec.method in ("same_position", "one_hop"):
        result = same_position_grad_norms(model, ids, mask, attention_mask=attention,
                                          param_patterns=spec.param_patterns, norms="fro", check_logits=False,
                                          one_hop_values=spec.method == "one_hop")
        norm = result.total["fro"]
    elif spec.method == "exact":
        result = batched_logit_param_grad_norms(model, ids, mask, attention_mask=attention,
                                                param_patterns=spec.param_patterns)
        norm = result.total["fro"]
    elif spec.method == "calibrated":
        result = calibration_features(model, ids, mask, attention_mask=attention,
                                      param_patterns=spec.param_patterns, check_logits=False,
                                      one_hop_values=spec.calibration.one_hop_values)
        norm = calibrated_scores(result, spec.calibration)
    else:
        result = estimate_logit_param_grad_norms(
            model, ids, mask, attention_mask=attention, k=spec.k, param_patterns=spec.param_patterns,
            seed=spec.seed, directions_per_pass=spec.directions_per_pass, check_logits=False)
        norm = result.fro()
    b, t = mask.nonzero(as_tuple=True)
    own = logits[b, t - 1].gather(-1, ids[b, t][:, None])[:, 0]
    # The tolerance of the least precise computation of either logit: bf16 / fp16 weights, an
    # autocast here, or accelerate's mixed-precision forward (its logits come back as float32).
    check_logits_match(model, result.logits[b, t], own, dtype=compute_dtype(model, logits, result.logits))
    return norm


def corrpo_from_model(
    model: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    config: CorrPOConfig | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> CorrPOOutput:
    """CorR-PO for a generation batch, from the policy itself: ``completion_stats`` then
    ``corrpo_from_stats``. Works with every ``config.measure``, including the paper's
    parameter-gradient measure. Arguments: see those two functions."""
    config = CorrPOConfig() if config is None else config
    check_group_size(group_size)  # before the passes over the model
    stats = completion_stats(model, input_ids, completion_mask, attention_mask=attention_mask, config=config,
                             temperature=temperature, batch_size=batch_size)
    return corrpo_from_stats(stats.entropy, stats.measure, stats.mask, rewards=rewards, group_size=group_size,
                             config=config, scale_rewards=scale_rewards, eps=eps)
