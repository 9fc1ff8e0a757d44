"""entropy_gpu inside verl (tested with verl 0.9.1; supported range ``>=0.9.0,<0.10``).

Two independent pieces, each switched on by one call (or by the ``ENTROPY_GPU_VERL``
environment variable through verl's ``verl.plugins`` entry point, so that every Ray
worker of a run does the same; see README "CorR-PO with verl"):

- ``patch_verl()``: verl's entropy, log-prob and sum-of-squared-probability functions
  (``verl.utils.torch_functional``), the fused LM-head paths (``FusedLinearForPPO``,
  ``linear_cross_entropy`` without a process group) and, when Megatron is installed, the
  vocabulary-parallel functions of ``verl.utils.megatron.tensor_parallel`` are served by
  entropy_gpu: one read of the logits per call, fp32 outputs, log-probs never above 0.
  verl divides the logits by the temperature before these functions, so they take the
  temperature only where verl passes it (the fused paths). ``unpatch_verl()`` restores
  verl's own functions in every verl module that holds a replacement, including modules
  loaded after patching (which bound the replacement by name themselves).
- ``install_corrpo()``: registers the advantage estimator ``corrpo_grpo`` and the two
  smallest hooks that carry the per-token entropy and gradient measure from the actor's
  old-log-prob pass to it (verl's trainer otherwise drops the entropy there and never
  computes a measure). The per-response term, bonus and ``corrpo/*`` metrics come from
  ``entropy_gpu.corrpo``; the advantages are verl's GRPO advantages of ``reward + bonus``.
  CorR-PO runs with the FSDP engine (``strategy=fsdp``/``fsdp2``) and
  ``use_fused_kernels=False`` (the fused paths never materialize logits for the measure).

Nothing here imports ``verl`` at module import time: the ``verl.plugins`` entry point
loads this module while ``import verl`` is still running.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entropy_gpu import STAT_NAMES, linear_token_stats, token_stats, vocab_parallel_token_stats
from entropy_gpu.corrpo import CorrPOConfig, corrpo_from_stats

SUPPORTED_VERL = ">=0.9.0,<0.10"
ENV_VAR = "ENTROPY_GPU_VERL"
ESTIMATOR_NAME = "corrpo_grpo"
ENTROPY_KEY, MEASURE_KEY = "corrpo_entropy", "corrpo_measure"
METRICS_KEY = "corrpo_metrics"

__all__ = [
    "ENV_VAR",
    "ESTIMATOR_NAME",
    "SUPPORTED_VERL",
    "calculate_sum_pi_squared_from_logits",
    "compute_corrpo_grpo_advantage",
    "corrpo_config_from",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "install_corrpo",
    "is_patched",
    "logprobs_from_logits",
    "patch_verl",
    "plugin",
    "uninstall_corrpo",
    "unpatch_verl",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_with_chunking",
    "vocab_parallel_log_probs_from_logits",
    "vocab_parallel_sum_pi_squared",
]


# --------------------------------------------------------------------------- drop-ins


def _nonpositive(logprob: Tensor) -> Tensor:
    """``min(logprob, 0)`` in value; the gradient passes unchanged (a rounding of +1e-7
    on a token with p ~ 1 must not cut its gradient)."""
    return logprob - logprob.detach().clamp(min=0.0)


@torch.compiler.disable  # one fused pass already; verl wraps entropy in torch.compile
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Drop-in for ``verl.utils.torch_functional.entropy_from_logits``: ``H(softmax(logits))``
    per row, float32 (float64 for float64 logits), differentiable."""
    return token_stats(logits, stats="entropy").entropy


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """Drop-in for verl's chunked variant. entropy_gpu already streams over the vocabulary, so
    ``chunk_size`` (verl's row chunk) is accepted and not needed."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return entropy_from_logits(logits)


@torch.compiler.disable
def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """Drop-in for ``verl.utils.torch_functional.logprobs_from_logits``: ``log softmax(logits)[labels]``,
    float32, never above 0, differentiable.

    ``inplace_backward`` (verl passes True when nothing else reads the logits) writes the
    gradient over the logits buffer; it is used only for non-leaf logits. While CorR-PO's
    capture is active (the old-log-prob pass), the same read also yields the gradient measure.
    """
    measure = _CAPTURE.get()
    want = ("logprob",) if measure is None else ("logprob", measure.name)
    inplace = bool(inplace_backward) and logits.requires_grad and logits.grad_fn is not None
    out = token_stats(logits, labels, stats=want, inplace_backward=inplace)
    if measure is not None:
        measure.values.append(getattr(out, measure.name))
    return _nonpositive(out.logprob)


@torch.compiler.disable
def calculate_sum_pi_squared_from_logits(logits: Tensor) -> Tensor:
    """Drop-in for verl's ``calculate_sum_pi_squared_from_logits``: ``sum_i p_i^2`` per row, float32."""
    return token_stats(logits, stats="sum_sq_probs").sum_sq_probs


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state as mpu  # verl's Megatron path: the tensor-parallel group

    return mpu.get_tensor_model_parallel_group()


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, *, group=None) -> Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_entropy``: the entropy of
    the full rows from this rank's vocabulary shard (equal shards in rank order, as Megatron
    splits them); ``group`` defaults to Megatron's tensor-parallel group. Differentiable."""
    return vocab_parallel_token_stats(vocab_parallel_logits, group=_tp_group(group), stats="entropy").entropy


def vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits: Tensor, chunk_size: int = 2048, *, group=None
) -> Tensor:
    """Drop-in for verl's chunked variant; ``chunk_size`` is accepted and not needed."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return vocab_parallel_entropy(vocab_parallel_logits, group=group)


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, *, group=None) -> Tensor:
    """Drop-in for verl's ``vocab_parallel_log_probs_from_logits`` (global label ids),
    float32, never above 0, differentiable."""
    measure = _CAPTURE.get()
    want = ("logprob",) if measure is None else ("logprob", measure.name)
    out = vocab_parallel_token_stats(logits, labels, group=_tp_group(group), stats=want)
    if measure is not None:
        measure.values.append(getattr(out, measure.name))
    return _nonpositive(out.logprob)


def vocab_parallel_sum_pi_squared(vocab_parallel_logits: Tensor, *, group=None) -> Tensor:
    """Drop-in for verl's ``vocab_parallel_sum_pi_squared``, float32."""
    return vocab_parallel_token_stats(
        vocab_parallel_logits, group=_tp_group(group), stats="sum_sq_probs"
    ).sum_sq_probs


def _fused_linear_for_ppo_forward(original: Callable) -> Callable:
    def forward(
        self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``FusedLinearForPPO.forward`` from ``linear_token_stats``: (log-probs, entropy) of
        ``softmax(hidden @ W.T / temperature)``, both float32; the logits are never materialized."""
        out = linear_token_stats(
            hidden_states,
            vocab_weights,
            input_ids.to(torch.int64),
            temperature=float(temperature),
            stats=("logprob", "entropy"),
        )
        return _nonpositive(out.logprob), out.entropy

    forward.__wrapped__ = original
    return forward


def _linear_cross_entropy(original: Callable) -> Callable:
    def linear_cross_entropy(
        hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None
    ):
        """verl's ``linear_cross_entropy`` (fused LM head) from ``linear_token_stats``: float32
        (log-probs, entropy) flattened to ``[tokens]`` as verl's kernel returns them.
        Vocabulary-sharded weights (``dist_process_group``) and reduced outputs stay on verl's kernel."""
        if dist_process_group is not None or reduction != "none":
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
        out = linear_token_stats(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1).to(torch.int64),
            temperature=float(temperature),
            stats=("logprob", "entropy"),
        )
        return _nonpositive(out.logprob), out.entropy

    linear_cross_entropy.__wrapped__ = original
    return linear_cross_entropy


# --------------------------------------------------------------------------- patching

_TORCH_FUNCTIONAL = {
    "entropy_from_logits": entropy_from_logits,
    "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
    "logprobs_from_logits": logprobs_from_logits,
    "calculate_sum_pi_squared_from_logits": calculate_sum_pi_squared_from_logits,
}
_MEGATRON = {
    "vocab_parallel_entropy": vocab_parallel_entropy,
    "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
    "vocab_parallel_sum_pi_squared": vocab_parallel_sum_pi_squared,
}
# (module, attribute, original) for every replacement made, in order.
_PATCHES: list[tuple[Any, str, Any]] = []
# id(replacement) -> (replacement, verl's original) for the functions patch_verl serves: modules
# imported after patching bind the replacement themselves (``from verl.utils.torch_functional
# import ...``), so unpatch_verl looks for these in every loaded verl module.
_REPLACEMENTS: dict[int, tuple[Any, Any]] = {}


def _set(owner: Any, name: str, value: Any) -> None:
    _PATCHES.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _rebind_imported_names(replacements: dict[str, tuple[Any, Any]]) -> None:
    """Modules that did ``from verl... import f`` hold verl's ``f`` in their own namespace:
    point every loaded ``verl.*`` module's copy at the replacement."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        namespace = getattr(module, "__dict__", {})
        for name, (original, new) in replacements.items():
            if namespace.get(name) is original:
                _set(module, name, new)


def is_patched() -> bool:
    """Whether ``patch_verl`` is in effect."""
    return bool(_PATCHES)


def patch_verl(*, fused_linear: bool = True, vocab_parallel: bool = True) -> list[str]:
    """Serve verl's entropy / log-prob / sum-of-squared-probability functions from entropy_gpu.

    Patches ``verl.utils.torch_functional`` and every loaded ``verl.*`` module that imported
    those functions by name; modules imported later pick up the patched ones. Call it before
    verl builds its engines (they bind ``entropy_from_logits`` at construction). Idempotent.

    Args:
        fused_linear: also serve ``FusedLinearForPPO`` and ``linear_cross_entropy``
            (``use_fused_kernels=True``) from ``entropy_gpu.linear_token_stats``.
        vocab_parallel: also serve ``verl.utils.megatron.tensor_parallel``'s functions from
            ``entropy_gpu.vocab_parallel_token_stats`` (skipped when Megatron is not installed).

    Returns:
        The dotted names of the functions now served by entropy_gpu.
    """
    if _PATCHES:
        return _patched_names()
    verl_f = importlib.import_module("verl.utils.torch_functional")
    replacements = {name: (getattr(verl_f, name), new) for name, new in _TORCH_FUNCTIONAL.items()}
    for name, (_, new) in replacements.items():
        _set(verl_f, name, new)
    if vocab_parallel:
        try:
            tp = importlib.import_module("verl.utils.megatron.tensor_parallel")
        except ImportError:  # no megatron-core: nothing of verl's can call these
            tp = None
        if tp is not None:
            for name, new in _MEGATRON.items():
                replacements[name] = (getattr(tp, name), new)
                _set(tp, name, new)
    if fused_linear:
        with contextlib.suppress(ImportError):
            fused = importlib.import_module("verl.utils.experimental.torch_functional")
            cls = fused.FusedLinearForPPO
            _set(cls, "forward", _fused_linear_for_ppo_forward(cls.forward))
        with contextlib.suppress(ImportError):
            lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
            original = lce.linear_cross_entropy
            replacements["linear_cross_entropy"] = (original, _linear_cross_entropy(original))
            _set(lce, "linear_cross_entropy", replacements["linear_cross_entropy"][1])
    _REPLACEMENTS.update({id(new): (new, original) for original, new in replacements.values()})
    _rebind_imported_names(replacements)
    return _patched_names()


def _patched_names() -> list[str]:
    out = []
    for owner, name, _ in _PATCHES:
        label = (
            f"{getattr(owner, '__module__', '')}.{owner.__qualname__}"
            if isinstance(owner, type)
            else owner.__name__
        )
        out.append(f"{label}.{name}")
    return out


def unpatch_verl() -> None:
    """Restore verl's own functions everywhere ``patch_verl`` replaced them, and in every
    verl module loaded since then that bound a replacement by name (with the ``verl.plugins``
    entry point, patching runs at ``import verl``, before the engines and rollouts load)."""
    while _PATCHES:
        owner, name, original = _PATCHES.pop()
        setattr(owner, name, original)
    if not _REPLACEMENTS:
        return
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        namespace = getattr(module, "__dict__", {})
        for name, value in list(namespace.items()):
            found = _REPLACEMENTS.get(id(value))
            if found is not None and found[0] is value:
                setattr(module, name, found[1])
    _REPLACEMENTS.clear()


# --------------------------------------------------------------------------- CorR-PO


class _Capture:
    def __init__(self, name: str) -> None:
        self.name = name
        self.values: list[Tensor] = []


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "entropy_gpu_verl_capture", default=None
)
# The DataProto that compute_advantage is processing (the estimator reads the statistics from it).
_ACTIVE_BATCH: contextvars.ContextVar[Any] = contextvars.ContextVar("entropy_gpu_verl_batch", default=None)


@contextlib.contextmanager
def capture_measure(name: str) -> Iterator[_Capture]:
    """While active, the patched log-prob functions also return the gradient measure ``name``
    from the same read of the logits (appended to the yielded object's ``values``)."""
    if name not in STAT_NAMES:
        raise ValueError(f"measure {name!r} is not a per-token logit statistic ({STAT_NAMES})")
    token = _CAPTURE.set(_Capture(name))
    try:
        yield _CAPTURE.get()
    finally:
        _CAPTURE.reset(token)


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
        measure = captured.values[0].detach().float()
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            measure = self._gather_and_unpad_packed(measure, output_args["pad_size"])
        cu_seqlens = micro_batch["input_ids"].offsets()
        model_output[MEASURE_KEY] = torch.nested.nested_tensor_from_jagged(measure, cu_seqlens)
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
        return old_log_prob, mfu

    return _compute_old_log_prob


def _compute_advantage(original: Callable) -> Callable:
    def compute_advantage(data, adv_estimator, *args, **kwargs):
        token = _ACTIVE_BATCH.set(data)
        try:
            out = original(data, adv_estimator, *args, **kwargs)
        finally:
            _ACTIVE_BATCH.reset(token)
        for key in (ENTROPY_KEY, MEASURE_KEY):  # not needed by the actor update
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


# --------------------------------------------------------------------------- plugin


def plugin() -> None:
    """verl.plugins entry point (runs on every ``import verl``): does nothing unless
    ``ENTROPY_GPU_VERL`` is set: ``kernels`` (or ``1``) patches the functions, ``corrpo``
    also installs CorR-PO. Errors are raised, not swallowed: a run that asked for
    entropy_gpu must not silently run without it (verl logs plugin errors at debug level)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "0", "none", "off"):
        return
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = wanted - {"1", "kernels", "corrpo"}
    if unknown:
        raise ValueError(f"{ENV_VAR}={value!r}: expected 'kernels', 'corrpo' or 'kernels,corrpo'")
    if "corrpo" in wanted:
        install_corrpo()
    else:
        patch_verl()
