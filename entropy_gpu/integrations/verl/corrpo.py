"""CorR-PO in verl: the advantage estimator ``corrpo_grpo`` (GRPO on ``reward + bonus``, the
bonus from ``entropy_gpu.corrpo``) and the hooks that carry the per-token entropy and gradient
measure from the actor's old-log-prob pass to it (``install_corrpo`` / ``uninstall_corrpo``).

The worker-side hook reads the measure through the drop-in log-prob function of ``dropin.py``
(``capture_measure``), so ``install_corrpo`` also patches verl (``patching.py``). CorR-PO runs
with the FSDP engine (``strategy=fsdp``/``fsdp2``) and ``use_fused_kernels=False`` (the fused
paths never materialize logits for the measure).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entropy_gpu import STAT_NAMES, entropy_change_metrics
from entropy_gpu.corrpo import CorrPOConfig, corrpo_from_stats

from .dropin import capture_measure
from .patching import ENV_VAR, patch_verl

ESTIMATOR_NAME = "corrpo_grpo"
ENTROPY_KEY, MEASURE_KEY = "corrpo_entropy", "corrpo_measure"
ENTROPY_CHANGE_KEY = "entropy_change"  # per token, w.r.t. the raw logits; logged as entropy_change/*
METRICS_KEY = "corrpo_metrics"

# The DataProto that compute_advantage is processing (the estimator reads the statistics from it).
_ACTIVE_BATCH: contextvars.ContextVar[Any] = contextvars.ContextVar("entropy_gpu_verl_batch", default=None)


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


VERL_DEFAULT_MEASURE = "nll_grad_norm"


def corrpo_config_from(algorithm_config: Any) -> CorrPOConfig:
    """``CorrPOConfig`` from verl's ``algorithm.corrpo`` section (any ``CorrPOConfig`` field,
    e.g. ``+algorithm.corrpo.coef=0.1``); defaults where absent."""
    section = _config_get(algorithm_config, "corrpo", None)
    if section is None:
        return CorrPOConfig(measure=VERL_DEFAULT_MEASURE)
    if isinstance(section, CorrPOConfig):
        return section
    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)
    known = {f.name for f in fields(CorrPOConfig)}
    unknown = set(section) - known
    if unknown:
        raise ValueError(
            f"algorithm.corrpo has unknown keys {sorted(unknown)}; CorrPOConfig fields: {sorted(known)}"
        )
    # CorrPOConfig's own default measure (the parameter-gradient norm) needs the model's own
    # passes; verl's log-prob pass gives logits only, so a logit-space measure is verl's default.
    return CorrPOConfig(**{"measure": VERL_DEFAULT_MEASURE, **section})


def _logit_measure(config: CorrPOConfig) -> str:
    if config.measure not in STAT_NAMES:
        raise ValueError(
            f"CorR-PO in verl computes the measure in the actor's log-prob pass from the logits; "
            f"measure {config.measure!r} is not a logit statistic (use e.g. 'nll_grad_norm')"
        )
    return config.measure


def _group_order(index: np.ndarray | None, n: int) -> tuple[Tensor, int | None]:
    """A permutation that makes GRPO groups (equal ``index``) contiguous, and the group size
    (None when the groups are not all the same size)."""
    if index is None:
        return torch.arange(n), n
    _, inverse, counts = np.unique(
        np.asarray(index, dtype=object).astype(str), return_inverse=True, return_counts=True
    )
    order = torch.from_numpy(np.argsort(inverse, kind="stable"))
    return order, int(counts[0]) if (counts == counts[0]).all() else None


def compute_corrpo_grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    *,
    corrpo_entropy: Tensor | None = None,
    corrpo_measure: Tensor | None = None,
    epsilon: float = 1e-6,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``corrpo_grpo``: GRPO on ``reward + coef * clip(phi(rho))``.

    ``rho`` is the Pearson (or ``CorrPOConfig``'s choice) between the per-token entropy and
    gradient measure over each response's tokens (``response_mask``), from
    ``entropy_gpu.corrpo.corrpo_from_stats``; the bonus is added to the response's last
    token reward, and verl's ``compute_grpo_outcome_advantage`` forms the advantages
    (``algorithm.norm_adv_by_std_in_grpo`` honoured).

    Args:
        token_level_rewards, response_mask: ``[B, T]``, as verl passes them.
        index: the GRPO group id per response (verl's ``uid``).
        config: verl's algorithm config; its ``corrpo`` section gives the ``CorrPOConfig``.
        corrpo_entropy, corrpo_measure: ``[B, T]`` per-token statistics; by default read from
            the batch being processed (put there by the trainer hook of ``install_corrpo``).

    Returns:
        (advantages, returns), ``[B, T]``. The ``corrpo/*`` metrics go to the batch's
        ``meta_info["corrpo_metrics"]`` (logged by the trainer hook).
    """
    batch = _ACTIVE_BATCH.get()
    if corrpo_entropy is None or corrpo_measure is None:
        if batch is None or ENTROPY_KEY not in batch.batch.keys() or MEASURE_KEY not in batch.batch.keys():
            raise ValueError(
                "corrpo_grpo needs the per-token entropy and gradient measure of the old-log-prob "
                "pass: call entropy_gpu.integrations.verl.install_corrpo() in the trainer and "
                f"worker processes (or set {ENV_VAR}=corrpo), or pass corrpo_entropy/corrpo_measure"
            )
        corrpo_entropy, corrpo_measure = batch.batch[ENTROPY_KEY], batch.batch[MEASURE_KEY]
    if corrpo_entropy.shape != response_mask.shape or corrpo_measure.shape != response_mask.shape:
        raise ValueError(
            f"corrpo_entropy {tuple(corrpo_entropy.shape)} and corrpo_measure "
            f"{tuple(corrpo_measure.shape)} must have the response_mask shape {tuple(response_mask.shape)}"
        )
    cfg = corrpo_config_from(config)
    n = response_mask.shape[0]
    order, group_size = _group_order(index, n)
    if cfg.pooling == "group" and group_size is None:
        raise ValueError("CorrPOConfig(pooling='group') needs groups of equal size (verl's rollout.n)")
    device = token_level_rewards.device
    order_d = order.to(device)
    out = corrpo_from_stats(
        corrpo_entropy.to(device)[order_d],
        corrpo_measure.to(device)[order_d],
        response_mask[order_d].bool(),
        config=cfg,
        group_size=group_size,
    )
    bonus = torch.empty_like(out.bonus)
    bonus[order_d] = out.bonus
    # The bonus goes on each response's last token: GRPO sums token rewards per response.
    positions = torch.arange(response_mask.shape[1], device=device)
    last = (response_mask.bool() * (positions + 1)).argmax(dim=1)
    has_tokens = response_mask.bool().any(dim=1)
    rewards = token_level_rewards.clone()
    rewards[torch.arange(n, device=device), last] += torch.where(has_tokens, bonus, 0.0).to(rewards.dtype)
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    advantages, returns = compute_grpo_outcome_advantage(
        rewards,
        response_mask,
        index if index is not None else np.zeros(n, dtype=object),
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=bool(_config_get(config, "norm_adv_by_std_in_grpo", True)),
    )
    if batch is not None:
        batch.meta_info[METRICS_KEY] = out.metrics
    return advantages, returns


def _register_estimator() -> None:
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not compute_corrpo_grpo_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_corrpo_grpo_advantage)


_HOOKS: list[tuple[Any, str, Any]] = []


def _hook(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    _HOOKS.append((owner, name, original))
    setattr(owner, name, make(original))


def _engine_prepare_model_outputs(original: Callable) -> Callable:
    """Worker side: when the trainer asks for it (``corrpo_measure`` in the micro-batch's
    non-tensor data), keep the measure the patched ``logprobs_from_logits`` computes with
    the log-probs and return it as ``model_output["corrpo_measure"]``, laid out as the log-probs."""

    def prepare_model_outputs(self, output, output_args, micro_batch, *args, **kwargs):
        from verl.utils import tensordict_utils as tu

        name = tu.get_non_tensor_data(data=micro_batch, key=MEASURE_KEY, default=None)
        if name is None:
            return original(self, output, output_args, micro_batch, *args, **kwargs)
        with capture_measure(name) as captured:
            model_output = original(self, output, output_args, micro_batch, *args, **kwargs)
        if len(captured.values) != 1:
            raise RuntimeError(
                "CorR-PO: the log-prob pass did not go through verl's logprobs_from_logits once "
                "(is use_fused_kernels on? CorR-PO needs use_fused_kernels=False)"
            )
        cu_seqlens = micro_batch["input_ids"].offsets()
        unpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        captures = ((MEASURE_KEY, captured.values[0]), (ENTROPY_CHANGE_KEY, captured.entropy_change[0]))
        for key, value in captures:
            value = value.detach().float()
            if unpad:
                value = self._gather_and_unpad_packed(value, output_args["pad_size"])
            model_output[key] = torch.nested.nested_tensor_from_jagged(value, cu_seqlens)
        return model_output

    return prepare_model_outputs


def _trainer_compute_old_log_prob(original: Callable) -> Callable:
    """Driver side: ask the actor for the measure in the old-log-prob pass and keep
    ``corrpo_entropy`` / ``corrpo_measure`` (padded like ``old_log_probs``) for the estimator."""

    def _compute_old_log_prob(self, batch):
        if self.config.algorithm.adv_estimator != ESTIMATOR_NAME:
            return original(self, batch)
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        measure_name = _logit_measure(corrpo_config_from(self.config.algorithm))
        worker_group = self.actor_rollout_wg
        calls: list[tuple[Any, Any]] = []
        real = worker_group.compute_log_prob

        def compute_log_prob(data):
            tu.assign_non_tensor(data, **{MEASURE_KEY: measure_name})
            out = real(data)
            calls.append((data, out))
            return out

        own_attribute = "compute_log_prob" in vars(
            worker_group
        )  # Ray worker groups bind methods per instance
        worker_group.compute_log_prob = compute_log_prob
        try:
            old_log_prob, mfu = original(self, batch)
        finally:
            if own_attribute:
                worker_group.compute_log_prob = real
            else:
                del worker_group.compute_log_prob
        data, out = calls[-1]
        measure = no_padding_2_padding(tu.get(out, MEASURE_KEY), data).float()
        # Statistics at the sampling temperature: verl's measure is taken on z / t, the
        # gradient w.r.t. the logits z is that / t (docs/corrpo.md).
        temperature = float(self.config.actor_rollout_ref.rollout.temperature)
        old_log_prob.batch[ENTROPY_KEY] = old_log_prob.batch["entropys"].clone()
        old_log_prob.batch[MEASURE_KEY] = measure / temperature
        # entropy_change is a product of two logit gradients: d/dz = (d/d(z/t)) / t each.
        change = no_padding_2_padding(tu.get(out, ENTROPY_CHANGE_KEY), data).float()
        old_log_prob.batch[ENTROPY_CHANGE_KEY] = change / temperature**2
        return old_log_prob, mfu

    return _compute_old_log_prob


def _compute_advantage(original: Callable) -> Callable:
    def compute_advantage(data, adv_estimator, *args, **kwargs):
        token = _ACTIVE_BATCH.set(data)
        try:
            out = original(data, adv_estimator, *args, **kwargs)
        finally:
            _ACTIVE_BATCH.reset(token)
        if ENTROPY_CHANGE_KEY in out.batch.keys() and "advantages" in out.batch.keys():
            # The batch's entropy dynamics: A * entropy_change over the response tokens.
            dynamics = entropy_change_metrics(out.batch[ENTROPY_CHANGE_KEY], out.batch["advantages"],
                                              out.batch["response_mask"].bool())
            out.meta_info[METRICS_KEY] = {**out.meta_info.get(METRICS_KEY, {}),
                                          **{k: v for k, v in dynamics.items() if not math.isnan(v)}}
        for key in (ENTROPY_KEY, MEASURE_KEY, ENTROPY_CHANGE_KEY):  # not needed by the actor update
            if key in out.batch.keys():
                out.batch.pop(key)
        return out

    return compute_advantage


def _compute_data_metrics(original: Callable) -> Callable:
    def compute_data_metrics(batch, *args, **kwargs):
        metrics = original(batch, *args, **kwargs)
        metrics.update(batch.meta_info.pop(METRICS_KEY, {}))
        return metrics

    return compute_data_metrics


def install_corrpo(*, driver: bool = True, workers: bool = True) -> None:
    """Register ``corrpo_grpo`` and install CorR-PO's hooks (idempotent); also ``patch_verl()``.

    Run it in every process of the run: the trainer (``TaskRunner``) for ``driver`` and the
    actor workers for ``workers``. Setting ``ENTROPY_GPU_VERL=corrpo`` does that through
    verl's plugin entry point. Select it with ``algorithm.adv_estimator=corrpo_grpo`` and
    configure it with ``+algorithm.corrpo.<CorrPOConfig field>=...``.
    """
    patch_verl()
    _register_estimator()
    hooked = {name for _, name, _ in _HOOKS}
    if workers and "prepare_model_outputs" not in hooked:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        _hook(FSDPEngineWithLMHead, "prepare_model_outputs", _engine_prepare_model_outputs)
    if driver and "_compute_old_log_prob" not in hooked:
        from verl.trainer.ppo import ray_trainer

        _hook(ray_trainer.RayPPOTrainer, "_compute_old_log_prob", _trainer_compute_old_log_prob)
        _hook(ray_trainer, "compute_advantage", _compute_advantage)
        _hook(ray_trainer, "compute_data_metrics", _compute_data_metrics)


def uninstall_corrpo() -> None:
    """Remove CorR-PO's hooks and the estimator registration (the kernels stay patched)."""
    while _HOOKS:
        owner, name, original = _HOOKS.pop()
        setattr(owner, name, original)
    with contextlib.suppress(ImportError):
        from verl.trainer.ppo import core_algos

        if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is compute_corrpo_grpo_advantage:
            del core_algos.ADV_ESTIMATOR_REGISTRY[ESTIMATOR_NAME]
