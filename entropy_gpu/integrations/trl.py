"""CorR-PO for TRL's ``GRPOTrainer`` (tested with trl 1.13 to 1.16), and an opt-in
entropy_gpu path for its per-token log-probabilities and entropies.

``CorrPOTrainer`` is a ``GRPOTrainer`` with one more reward column, ``corrpo``, holding
``clip(phi(rho_i))`` with weight ``coef``: TRL then forms ``r_i + coef * phi(rho_i)`` with the
user's (weighted) rewards and group-normalizes it as usual, so multiple reward functions,
weights, ``num_generations`` groups, gradient accumulation, ``scale_rewards`` and
multi-process runs behave as in plain GRPO. ``rho_i`` is computed from the policy that
sampled the completions, at the sampling temperature:

- when TRL scores the old policy before the rewards (``old_per_token_logps``: steps not
  aligned with generation, ``num_iterations > 1``, vLLM importance sampling), that call is
  served by one entropy_gpu pass that returns TRL's log-probs and keeps the entropy and the
  gradient measure: no extra forward pass;
- otherwise (TRL's default: the loss's own forward gives the old log-probs, after the
  rewards are fixed) CorR-PO adds one no-grad forward pass per generation batch. Its cost
  is measured in benchmarks/ (see docs/corrpo.md).

Text-only models; the TRL internals this relies on are listed in docs/corrpo.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import types
import warnings
from collections import Counter
from typing import Any

import torch
import transformers
import trl
import trl.trainer.utils as trl_utils
from packaging.version import Version
from torch import Tensor
from trl import GRPOTrainer

from entropy_gpu import TokenStats, entropy_change_metrics, linear_token_stats
from entropy_gpu.corrpo import CorrPOConfig, completion_stats, corrpo_from_stats, micro_batch_token_stats

TRL_VERSION = Version(trl.__version__)
TESTED_TRL = (Version("1.13.0"), Version("1.17.0"))  # [low, high)
# From 1.15 GRPO scores through a chunked fused LM head and never materializes logits.
TRL_FUSED_LM_HEAD = TRL_VERSION >= Version("1.15.0")
CORRPO_REWARD_NAME = "corrpo"
logger = logging.getLogger(__name__)

if not TESTED_TRL[0] <= TRL_VERSION < TESTED_TRL[1]:
    warnings.warn(f"entropy_gpu.integrations.trl is tested with trl >={TESTED_TRL[0]},<{TESTED_TRL[1]}; "
                  f"found {TRL_VERSION}", stacklevel=2)

_CALL_ARGS = ("input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
              "compute_aux_loss")


def _text_only_call(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments of a ``_get_per_token_logps_and_entropies`` call if it is text-only
    without MoE aux loss (what the entropy_gpu path handles), else None."""
    if len(args) > len(_CALL_ARGS):
        return None
    call = dict(zip(_CALL_ARGS, args))
    call.update(kwargs)
    if call.get("compute_aux_loss") or any(v is not None for k, v in call.items() if k not in _CALL_ARGS):
        return None
    return call


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _micro_batches(trainer: GRPOTrainer, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   keep: int, stats: tuple[str, ...],
                   batch_size: int | None) -> list[tuple[slice, TokenStats]]:
    """``micro_batch_token_stats`` of the completion tokens (the last ``keep`` of ``input_ids``)
    as TRL scores them: under the trainer's autocast, at its sampling temperature, with
    ``logits_to_keep`` where the model takes it; positions outside ``attention_mask`` get no target."""
    kwargs = ({"logits_to_keep": keep + 1}
              if _supports_logits_to_keep(trainer.accelerator.unwrap_model(model)) else {})
    return micro_batch_token_stats(model, input_ids, attention_mask, attention_mask, stats,
                                   temperature=trainer.temperature, batch_size=batch_size, keep=keep,
                                   forward_kwargs=kwargs, forward_context=trainer.accelerator.autocast)


def completion_token_stats(
    trainer: GRPOTrainer, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
    logits_to_keep: int,
    stats: tuple[str, ...], batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-token statistics ``[B, logits_to_keep]`` of the completion tokens (the last
    ``logits_to_keep`` of ``input_ids``) at the trainer's sampling temperature: one forward
    per ``batch_size`` rows, then one entropy_gpu pass over that micro-batch's logits.
    Positions outside ``attention_mask`` get 0 in ``logprob`` and the gradient norms."""
    pieces = _micro_batches(trainer, model, input_ids, attention_mask, logits_to_keep, stats, batch_size)
    return {name: torch.cat([getattr(out, name) for _, out in pieces]) for name in stats}


# -- The drop-in: TRL's per-token log-probs and entropies served by entropy_gpu --------------------

#: TRL ``_metrics`` keys: per call of ``_get_per_token_logps_and_entropies`` that the drop-in sees,
#: 1.0 if entropy_gpu served it and 0.0 if TRL's own path ran; logged as their mean per logging step.
SERVED_GRAD_METRIC = "entropy_gpu/served_grad"        #: calls with grad: the training forward
SERVED_NO_GRAD_METRIC = "entropy_gpu/served_no_grad"  #: scoring calls (old policy, reference)
_HEAD_KWARG = "entropy_gpu_head"


def trl_scores_without_logits(trainer: GRPOTrainer) -> bool:
    """Whether TRL's own path for ``trainer`` never materializes the logits: its fused LM head
    (TRL >= 1.15) or, on 1.14, the chunked path of ``use_liger_kernel``. The drop-in then serves
    calls with entropy_gpu's fused LM head (never more memory than TRL), otherwise from the logits."""
    liger = bool(getattr(trainer, "use_liger_kernel", False))
    return TRL_FUSED_LM_HEAD or (TRL_VERSION >= Version("1.14.0") and liger)


def _causal_lm(trainer: GRPOTrainer, model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside ``model``'s distributed and PEFT wrappers (where TRL puts its fused head)."""
    inner = trainer.accelerator.unwrap_model(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _logit_scale(module: torch.nn.Module) -> tuple[float | None, str | None]:
    """(the factor the model multiplies its logits by, None), read as TRL 1.16's fused head reads
    it, or (None, the setting entropy_gpu's head cannot serve)."""
    config = module.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        return None, "the model's final_logit_softcapping (entropy_gpu's LM head has no soft-capping)"
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    # Granite divides by logits_scaling, HyperCLOVA X multiplies
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0:
        return None, f"the model's logit scale {scale} (not > 0)"
    return scale, None


@dataclasses.dataclass(frozen=True)
class _HeadRequest:
    """What the model's forward returns when called with ``entropy_gpu_head=``: per-token ``stats``."""

    keep: int                    #: the last ``keep`` tokens of ``input_ids`` are scored (the completion)
    stats: tuple[str, ...]       #: ``LinearTokenStats`` fields to return, ``[B, keep]`` each
    temperature: float           #: the sampling temperature over the model's logit scale
    fp32: bool                   #: ``cast_lm_head_to_fp32``: the head in float32, outside autocast


def _backbone(module: torch.nn.Module) -> torch.nn.Module:
    # As TRL's fused head: before transformers 5, vision-language models call their language model `model`.
    if (module.config.get_text_config() is not module.config
            and Version(transformers.__version__) < Version("5.0.0")):
        return module.model
    return module.base_model


def _fused_head_forward(module: torch.nn.Module, request: _HeadRequest, input_ids: Tensor,
                        attention_mask: Tensor, **kwargs) -> dict[str, Tensor]:
    """The backbone, then entropy_gpu's fused LM head (``linear_token_stats``, with autograd) on the
    completion positions only: ``{stat: [B, keep]}``, 0 where ``attention_mask`` is 0, as TRL's head."""
    for name in ("labels", "shift_labels", "num_items_in_batch"):  # what PEFT's forward may pass along
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    hidden = _backbone(module)(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    lm_head = module.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if torch.distributed.is_available():  # FSDP2: sharded parameters are DTensors; gather the head, as TRL
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
    # position t predicts token t + 1; the completion is the last `keep` tokens
    hidden = hidden[:, :-1][:, -request.keep:].to(weight.device)
    targets = input_ids[:, 1:][:, -request.keep:].to(weight.device)
    mask = attention_mask[:, 1:][:, -request.keep:].to(weight.device).bool()
    tokens = hidden[mask]
    context = contextlib.nullcontext()
    if request.fp32:
        tokens = tokens.float()
        context = torch.autocast(tokens.device.type, enabled=False)
    gather = getattr(trl_utils, "maybe_gather_lm_head_ctx", None)  # DeepSpeed ZeRO-3: gather the head, as TRL
    with context, (gather(weight, bias) if gather is not None else contextlib.nullcontext()):
        out = linear_token_stats(tokens, weight, targets[mask], bias, temperature=request.temperature,
                                 stats=request.stats)
    served = {}
    for name in request.stats:
        values = getattr(out, name)
        if torch.is_grad_enabled() and not mask.any():  # keep an all-padding micro-batch in the graph, as TRL
            values = values + 0 * (tokens.sum() + weight.sum())
        served[name] = values.new_zeros(mask.shape).masked_scatter(mask, values)
    return served


def _install_fused_head(module: torch.nn.Module) -> None:
    """Give ``module.forward`` an ``entropy_gpu_head=`` keyword (once): with it, the forward returns
    ``_fused_head_forward``'s statistics; without it, the forward is unchanged. Called through the
    model the trainer passes (DDP, DeepSpeed, PEFT wrappers), so their hooks run as for TRL's head."""
    if getattr(module, "_entropy_gpu_head_installed", False):
        return
    previous = module.forward
    # Bound to `self` at call time, so that a deep copy of the module calls its own forward.
    previous_func = previous.__func__ if getattr(previous, "__self__", None) is module else None

    @functools.wraps(type(module).forward)  # keeps the signature that `generate` validates against
    def forward(self, *args, entropy_gpu_head: _HeadRequest | None = None, **kwargs):
        if entropy_gpu_head is not None:
            return _fused_head_forward(self, entropy_gpu_head, *args, **kwargs)
        if previous_func is not None:
            return previous_func(self, *args, **kwargs)
        return previous(*args, **kwargs)

    module.forward = types.MethodType(forward, module)
    module._entropy_gpu_head_installed = True


def _fused_head_stats(trainer: GRPOTrainer, model: torch.nn.Module, call: dict[str, Any],
                      stats: tuple[str, ...]) -> tuple[dict[str, Tensor] | None, str | None]:
    """Per-token ``stats`` of a TRL call from the backbone and entropy_gpu's fused LM head, per
    ``batch_size`` rows under the trainer's autocast, at TRL's temperature; (None, why) where not."""
    module = _causal_lm(trainer, model)
    scale, reason = _logit_scale(module)
    if reason is not None:
        return None, reason
    _install_fused_head(module)
    # cast_lm_head_to_fp32: TRL >= 1.15 runs its head in float32 outside autocast (1.14 with Liger does not)
    fp32 = TRL_FUSED_LM_HEAD and bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    request = _HeadRequest(int(call["logits_to_keep"]), tuple(stats), trainer.temperature / scale, fp32)
    input_ids, attention_mask = call["input_ids"], call["attention_mask"]
    batch_size = call.get("batch_size") or input_ids.size(0)
    pieces = []
    for start in range(0, input_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        with trainer.accelerator.autocast():
            pieces.append(model(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                **{_HEAD_KWARG: request}))
    return {name: torch.cat([piece[name] for piece in pieces]) for name in stats}, None


def served_token_stats(trainer: GRPOTrainer, model: torch.nn.Module, call: dict[str, Any],
                       stats: tuple[str, ...]) -> tuple[dict[str, Tensor] | None, str | None]:
    """Per-token statistics ``{stat: [B, logits_to_keep]}`` of a text-only TRL
    ``_get_per_token_logps_and_entropies`` call (see ``_text_only_call``), computed by entropy_gpu
    the way TRL computes that call, with autograd when grad is enabled (``logprob``, ``entropy``):

    - where TRL never materializes the logits (``trl_scores_without_logits``): the backbone, then
      entropy_gpu's fused LM head on the completion positions (``stats`` from ``LINEAR_STAT_NAMES``);
    - otherwise (TRL 1.13, 1.14 without Liger): one ``token_stats`` pass over each micro-batch's
      logits (``stats`` from ``STAT_NAMES``).

    0 at positions outside the attention mask. Returns (statistics, None), or (None, the setting
    that keeps TRL's own path)."""
    if trl_scores_without_logits(trainer):
        return _fused_head_stats(trainer, model, call, stats)
    return completion_token_stats(trainer, model, call["input_ids"], call["attention_mask"],
                                  call["logits_to_keep"], stats, call.get("batch_size")), None


def _warn_once(trainer: GRPOTrainer, message: str) -> None:
    warned = trainer.__dict__.setdefault("_entropy_gpu_warned", set())
    if message not in warned:
        warned.add(message)
        warnings.warn(message, stacklevel=3)


def _record_call(trainer: GRPOTrainer, served: bool, reason: str | None) -> None:
    """Count the call in ``trainer.entropy_gpu_calls`` and TRL's ``_metrics``; warn (once per
    setting) when TRL's own path computes it; log the first served training call."""
    grad = torch.is_grad_enabled()
    calls = trainer.__dict__.setdefault("entropy_gpu_calls", Counter())
    calls[f"{'served' if served else 'trl'}_{'grad' if grad else 'no_grad'}"] += 1
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode][SERVED_GRAD_METRIC if grad else SERVED_NO_GRAD_METRIC].append(float(served))
    if served and grad and calls["served_grad"] == 1:
        path = ("the backbone + entropy_gpu's fused LM head" if trl_scores_without_logits(trainer)
                else "one entropy_gpu pass over the logits")
        logger.info("entropy_gpu serves GRPO's training log-probs and entropies (TRL %s): %s",
                    TRL_VERSION, path)
    if not served:
        kind = "training" if grad else "scoring"
        _warn_once(trainer, f"entropy_gpu drop-in: TRL's own path computes a {kind} call of "
                            f"_get_per_token_logps_and_entropies: {reason}")


def _entropy_gpu_logps_and_entropies(trainer: GRPOTrainer, model, call: dict[str, Any] | None):
    """TRL's ``(logps, entropies, aux_loss)`` from entropy_gpu (``served_token_stats``), or None
    where TRL's own path stays (with a warning naming the setting). Entropies carry gradients
    only for an entropy bonus, as the loss uses them."""
    out, reason = None, ("a call with MoE router aux loss (compute_aux_loss=True: the model's "
                         "output_router_logits) or multimodal inputs")
    if call is not None:
        stats = ("logprob", "entropy") if call.get("compute_entropy") else ("logprob",)
        out, reason = served_token_stats(trainer, model, call, stats)
    _record_call(trainer, out is not None, reason)
    if out is None:
        return None
    entropy = out.get("entropy")
    if entropy is not None and not getattr(trainer, "_entropy_bonus_enabled", False):
        entropy = entropy.detach()
    return out["logprob"], entropy, None


def _watch_training_forward(trainer: GRPOTrainer) -> None:
    """Wrap ``trainer.compute_loss`` (once): a training loss computed without any call of
    ``_get_per_token_logps_and_entropies`` reaching the drop-in gets a warning, never silence."""
    if "_entropy_gpu_watched" in trainer.__dict__:
        return
    trainer._entropy_gpu_watched = True
    if TRL_VERSION < Version("1.14.0") and getattr(trainer, "use_liger_kernel", False):
        warnings.warn("entropy_gpu drop-in: use_liger_kernel=True on TRL 1.13 computes the training loss "
                      "with Liger's fused GRPO loss, which entropy_gpu does not serve; only the no-grad "
                      "scoring calls are served (TRL >= 1.14 serves both)", stacklevel=3)
    compute_loss = trainer.compute_loss

    def watched_compute_loss(model, inputs, *args, **kwargs):
        calls = trainer.__dict__.setdefault("entropy_gpu_calls", Counter())
        before = calls["served_grad"] + calls["trl_grad"]
        loss = compute_loss(model, inputs, *args, **kwargs)
        if torch.is_grad_enabled() and calls["served_grad"] + calls["trl_grad"] == before:
            why = ("use_liger_kernel=True on TRL 1.13 (Liger's fused GRPO loss)"
                   if TRL_VERSION < Version("1.14.0") and getattr(trainer, "use_liger_kernel", False)
                   else f"{type(trainer).__name__}.compute_loss called no _get_per_token_logps_and_entropies")
            _warn_once(trainer, f"entropy_gpu drop-in: a training loss was computed without entropy_gpu: "
                                f"{why}")
        return loss

    trainer.compute_loss = watched_compute_loss


def use_entropy_gpu_logprobs(trainer: GRPOTrainer) -> GRPOTrainer:
    """Opt-in: serve ``trainer``'s GRPO log-prob/entropy computation with entropy_gpu.

    Every text-only call of ``_get_per_token_logps_and_entropies`` without MoE aux loss is served:
    the training forward (with grad: the loss's log-probs, and entropies with autograd for an
    entropy bonus) and the no-grad scoring calls (old-policy and reference log-probs), under TRL's
    default ``GRPOConfig`` and with ``num_iterations``, ``steps_per_generation``, vLLM importance
    sampling, ``beta``, ``cast_lm_head_to_fp32`` and (TRL >= 1.14) ``use_liger_kernel``. Where TRL
    never materializes the logits (TRL >= 1.15; 1.14 with ``use_liger_kernel``) from the backbone
    and entropy_gpu's fused LM head in place of TRL's chunked head; on TRL 1.13/1.14 from one
    entropy_gpu pass over the logits (``served_token_stats``). Results equal TRL's within
    floating-point tolerance on completion positions (0 elsewhere, as TRL >= 1.14).

    What is served is counted in ``trainer.entropy_gpu_calls`` and logged as the metrics
    ``entropy_gpu/served_grad`` and ``entropy_gpu/served_no_grad`` (fraction of calls served); a
    call or a training loss left to TRL (multimodal, MoE aux loss, logit soft-capping, Liger's loss
    on TRL 1.13) gets a warning naming the setting. Returns the trainer.
    """
    _watch_training_forward(trainer)
    if isinstance(trainer, CorrPOTrainer):
        trainer.entropy_gpu_logprobs = True
        return trainer
    if "_entropy_gpu_original_logps" in trainer.__dict__:
        return trainer
    original = trainer._entropy_gpu_original_logps = trainer._get_per_token_logps_and_entropies

    def patched(model, *args, **kwargs):
        out = _entropy_gpu_logps_and_entropies(trainer, model, _text_only_call(args, kwargs))
        return original(model, *args, **kwargs) if out is None else out

    trainer._get_per_token_logps_and_entropies = patched
    return trainer


def _refuse_sharded_training(accelerator) -> None:
    """The parameter-gradient measure needs whole parameters: refuse FSDP and DeepSpeed ZeRO-3
    up front (the model is wrapped only when training starts)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and plugin is not None
                                        and getattr(plugin, "zero_stage", 0) == 3):
        raise NotImplementedError(
            f"CorR-PO's parameter-gradient measure does not support sharded training ({kind.value}"
            f"{', ZeRO-3' if kind == DistributedType.DEEPSPEED else ''}): its per-token gradients would be "
            "those of parameter shards. Use DDP / DeepSpeed ZeRO-1/2 (parameters replicated), or a "
            "logit-space measure: CorrPOConfig(measure='nll_grad_norm')")


def pad_right(rows: list[list[int]] | list[Tensor], value: int, device) -> Tensor:
    """Rows of token ids as one ``[N, max_len]`` tensor, padded at the end with ``value``."""
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value).to(device)


def pad_left(rows: list[list[int]], value: int, device) -> Tensor:
    """Rows of token ids as one ``[N, max_len]`` tensor, padded at the start with ``value``."""
    return pad_right([torch.as_tensor(r, dtype=torch.long).flip(0) for r in rows], value, device).flip(1)


class CorrPOReward:
    """The ``corrpo`` reward column of a ``CorrPOTrainer``, and all its CorR-PO state.

    The path from generated completions to the reward column, in TRL's order:

    1. ``CorrPOTrainer._generate`` hands the rollout (prompt ids, completion ids, tool mask)
       to :meth:`start_batch`.
    2. Only where TRL scores the old policy before the rewards (see :meth:`serve_old_policy`),
       that no-grad pass is served here and keeps entropy and measure: no extra forward.
    3. TRL calls this object with its other reward functions; :meth:`__call__` computes the
       per-token statistics (unless step 2 kept them), gathers the generation batch across
       processes, applies ``corrpo_from_stats`` and returns this process's ``clip(phi(rho_i))``.
    """

    __name__ = CORRPO_REWARD_NAME

    def __init__(self, trainer: CorrPOTrainer, config: CorrPOConfig):
        self.trainer = trainer
        self.config = config
        self.rollout: tuple | None = None              #: (prompt ids, completion ids, tool mask)
        #: (entropy, measure, mask, entropy_change), kept by serve_old_policy
        self.old_policy_stats: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        #: (entropy_change, mask) ``[B, C]`` of the last scored batch, until the advantages exist
        self.entropy_change: tuple[Tensor, Tensor] | None = None
        self.serve_next_old_policy_call = False
        self.last_term: Tensor | None = None           #: the column returned for the last batch

    # -- 1. the rollout
    def start_batch(self, prompt_ids: list, completion_ids: list, tool_mask: list | None) -> None:
        self.rollout = (prompt_ids, completion_ids, tool_mask)
        self.old_policy_stats = None
        # Logit-space measures come from the logits of TRL's old-policy pass when TRL runs one
        # before the rewards (its own condition); the parameter-gradient measure needs its own passes.
        t = self.trainer
        generate_every = t.args.steps_per_generation * t.num_iterations
        scores_old_policy = (t.args.gradient_accumulation_steps % generate_every != 0
                             or bool(t.use_vllm and t.vllm_importance_sampling_correction))
        self.serve_next_old_policy_call = scores_old_policy and not self.config.needs_model

    # -- 2. TRL's old-policy scoring, when it comes before the rewards
    def serve_old_policy(self, model, call: dict[str, Any] | None):
        """TRL's ``(logps, entropies, None)`` for its old-policy call of this batch, keeping the
        CorR-PO statistics; None when this call is not that one."""
        if not (self.serve_next_old_policy_call and call is not None and model is self.trainer.model
                and not torch.is_grad_enabled()):
            return None
        self.serve_next_old_policy_call = False
        measure = self.config.measure_name
        stats = ("logprob", "entropy", measure, "entropy_change")
        out = completion_token_stats(self.trainer, model, call["input_ids"], call["attention_mask"],
                                     call["logits_to_keep"], stats, call.get("batch_size"))
        self.old_policy_stats = (out["entropy"], out[measure],
                                 call["attention_mask"][:, -call["logits_to_keep"]:], out["entropy_change"])
        return out["logprob"], out["entropy"] if call.get("compute_entropy") else None, None

    # -- 3. the reward column
    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if self.rollout is None or len(self.rollout[1]) != len(completions):
            raise RuntimeError("CorR-PO: no rollout recorded for this batch "
                               "(CorrPOTrainer._generate was bypassed)")
        if completion_ids is not None and ([list(c) for c in completion_ids]
                                           != [list(c) for c in self.rollout[1]]):
            raise RuntimeError("CorR-PO: the completions to score are not the recorded rollout")
        entropy, measure, mask, extra_forward = self._token_stats()
        self.last_term = self._score(entropy, measure, mask, extra_forward)
        self.old_policy_stats = None
        return self.last_term.tolist()

    def _token_stats(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """(entropy, measure, mask, extra_forward) of this process's completions, ``[B, C]``."""
        t = self.trainer
        prompt_ids, completion_ids, tool_mask = self.rollout
        device = t.accelerator.device
        if self.old_policy_stats is not None:
            entropy, measure, mask, entropy_change = self.old_policy_stats
            extra_forward = False
        else:
            pad_id = t._tokenizer.pad_token_id
            prompts = pad_left(prompt_ids, pad_id, device)
            completions = pad_right(completion_ids, pad_id, device)
            real = pad_right([[1] * len(c) for c in completion_ids], 0, device)
            mask = real
            if t.mask_truncated_completions:  # as TRL: no loss, and here no correlation, for truncated ones
                stop_ids = [*getattr(t, "eos_token_ids", [t._tokenizer.eos_token_id]), pad_id]
                truncated = torch.tensor([len(c) == 0 or int(c[-1]) not in stop_ids for c in completion_ids],
                                         device=device)
                mask = mask * (~truncated).unsqueeze(1).long()
            input_ids = torch.cat([prompts, completions], dim=1)
            prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0, device)
            attention_mask = torch.cat([prompt_mask, mask], dim=1)
            batch_size = (t.args.per_device_train_batch_size if t.model.training
                          else t.args.per_device_eval_batch_size)
            if self.config.needs_model:
                width = prompts.size(1)
                completion_mask = torch.cat([torch.zeros_like(prompt_mask), mask], dim=1)
                # At the training precision: bf16 / fp16 mixed precision runs these passes under
                # the same autocast as TRL's loss pass (norms are summed in float32 either way).
                with t.accelerator.autocast():
                    stats = completion_stats(t.accelerator.unwrap_model(t.model), input_ids, completion_mask,
                                             attention_mask=torch.cat([prompt_mask, real], dim=1),
                                             config=self.config, temperature=t.temperature,
                                             batch_size=batch_size, with_entropy_change=True)
                entropy, measure = stats.entropy[:, width:], stats.measure[:, width:]
                entropy_change = stats.entropy_change[:, width:]
            else:
                with torch.no_grad():
                    out = completion_token_stats(t, t.model, input_ids, attention_mask, completions.size(1),
                                                 ("entropy", self.config.measure_name, "entropy_change"),
                                                 batch_size)
                entropy, measure = out["entropy"], out[self.config.measure_name]
                entropy_change = out["entropy_change"]
            extra_forward = True
        if tool_mask is not None:  # tool outputs are not the policy's tokens
            tools = pad_right(tool_mask, 1, device)
            width = mask.size(1)
            tools = torch.nn.functional.pad(tools, (0, width - tools.size(1)), value=1)[:, :width]
            mask = mask * tools
        self.entropy_change = (entropy_change, mask.bool())
        return entropy, measure, mask.bool(), extra_forward

    def _score(self, entropy: Tensor, measure: Tensor, mask: Tensor, extra_forward: bool) -> Tensor:
        """This process's ``clip(phi(rho_i))`` column; logs ``corrpo/*``."""
        t = self.trainer
        mode = "train" if t.model.training else "eval"
        local_rows = entropy.size(0)
        # Groups may straddle processes: score the whole generation batch on every process.
        entropy, measure, mask = (t.accelerator.gather(t.accelerator.pad_across_processes(x, dim=1))
                                  for x in (entropy.float(), measure.float(), mask.long()))
        group_size = t.num_generations if mode == "train" else t.num_generations_eval
        result = corrpo_from_stats(entropy, measure, mask.bool(), group_size=group_size, config=self.config)
        for name, value in result.metrics.items():
            # NaN: no defined correlation in this batch; logged steps average the rest
            if not math.isnan(value):
                t._metrics[mode][name].append(value)
        t._metrics[mode]["corrpo/extra_forward"].append(float(extra_forward))
        start = t.accelerator.process_index * local_rows
        return result.term[start:start + local_rows]

    # -- 4. after TRL's advantages: the entropy dynamics of the batch
    def log_entropy_change(self, advantages: Tensor, completion_mask: Tensor) -> None:
        """Log ``entropy_change/*`` (``entropy_gpu.entropy_change_metrics``: ``A * entropy_change``
        over the generation batch's completion tokens) from the statistics of this batch's
        reward pass and TRL's advantages (this process's rows); no extra forward."""
        if self.entropy_change is None:
            return
        t = self.trainer
        change, mask = self.entropy_change
        self.entropy_change = None
        width = min(change.size(1), completion_mask.size(1))
        mask = mask[:, :width] & completion_mask[:, :width].bool()
        change, advantages = change[:, :width].float(), advantages.float()
        if advantages.dim() == 2:
            advantages = advantages[:, :width]
        gathered = [t.accelerator.gather(t.accelerator.pad_across_processes(x, dim=1) if x.dim() == 2 else x)
                    for x in (change, advantages, mask.long())]
        metrics = entropy_change_metrics(gathered[0], gathered[1], gathered[2].bool())
        mode = "train" if t.model.training else "eval"
        for name, value in metrics.items():
            if not math.isnan(value):
                t._metrics[mode][name].append(value)


class CorrPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rewards include the CorR-PO term ``coef * phi(rho_i)``.

    Args: those of ``trl.GRPOTrainer``, plus
        corrpo: ``CorrPOConfig`` (coefficient, measure, phi, clipping, pooling).
        entropy_gpu_logprobs: also serve TRL's log-prob/entropy calls with entropy_gpu
            (see ``use_entropy_gpu_logprobs``).

    All CorR-PO state lives in ``self.corrpo_reward`` (a :class:`CorrPOReward`, TRL's last
    reward function). Logs ``corrpo/correlation``, ``corrpo/inversion_rate``,
    ``corrpo/undefined``, ``corrpo/undefined_fraction``, ``corrpo/entropy``,
    ``corrpo/<measure>``, ``corrpo/bonus`` and ``corrpo/extra_forward`` (1 when CorR-PO ran its
    own passes for the batch), besides TRL's ``rewards/corrpo/mean``; and the batch's entropy
    dynamics from the same pass, ``entropy_change/adv_weighted_mean``, ``frac_pushing_down``,
    ``q10``/``q50``/``q90``, ``mean``, ``tokens`` (``entropy_gpu.entropy_change_metrics``).
    """

    def __init__(self, *args, corrpo: CorrPOConfig | None = None, entropy_gpu_logprobs: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.corrpo = corrpo if corrpo is not None else CorrPOConfig()
        if self.corrpo.needs_model:
            _refuse_sharded_training(self.accelerator)
        self.entropy_gpu_logprobs = entropy_gpu_logprobs
        if entropy_gpu_logprobs:
            _watch_training_forward(self)
        self.corrpo_reward = CorrPOReward(self, self.corrpo)
        # Appended after TRL's checks, as TRL itself appends environment rewards.
        self.reward_funcs.append(self.corrpo_reward)
        self.reward_func_names.append(CORRPO_REWARD_NAME)
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat([self.reward_weights, torch.tensor([float(self.corrpo.coef)])])

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        if out[6] is not None or self._is_multimodal_batch(prompts):
            raise NotImplementedError("CorrPOTrainer supports text-only batches: its scoring pass does not "
                                      "forward images")
        self.corrpo_reward.start_batch(out[0], out[1], out[2])
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.corrpo_reward.log_entropy_change(out["advantages"], out["completion_mask"])
        return out

    @staticmethod
    def _is_multimodal_batch(prompts: list) -> bool:
        return any(isinstance(m, dict) and isinstance(m.get("content"), list)
                   and any(isinstance(part, dict) and part.get("type") == "image" for part in m["content"])
                   for p in prompts if isinstance(p, list) for m in p)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        call = _text_only_call(args, kwargs)
        out = self.corrpo_reward.serve_old_policy(model, call)
        if out is None and self.entropy_gpu_logprobs:
            out = _entropy_gpu_logps_and_entropies(self, model, call)
        return out if out is not None else super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
