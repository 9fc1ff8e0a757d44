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

import inspect
import math
import warnings
from typing import Any

import torch
import trl
from packaging.version import Version
from torch import Tensor
from trl import GRPOTrainer

from entropy_gpu import entropy_and_logprobs, token_stats
from entropy_gpu.corrpo.reward import CorrPOConfig, corrpo_from_stats

TRL_VERSION = Version(trl.__version__)
TESTED_TRL = (Version("1.13.0"), Version("1.17.0"))  # [low, high)
# From 1.15 GRPO scores through a chunked fused LM head and never materializes logits.
TRL_FUSED_LM_HEAD = TRL_VERSION >= Version("1.15.0")
CORRPO_REWARD_NAME = "corrpo"

if not TESTED_TRL[0] <= TRL_VERSION < TESTED_TRL[1]:
    warnings.warn(f"entropy_gpu.integrations.trl is tested with trl >={TESTED_TRL[0]},<{TESTED_TRL[1]}; "
                  f"found {TRL_VERSION}", stacklevel=2)

_CALL_ARGS = ("input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss")


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


def completion_token_stats(
    trainer: GRPOTrainer, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int,
    stats: tuple[str, ...], batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-token statistics ``[B, logits_to_keep]`` of the completion tokens (the last
    ``logits_to_keep`` of ``input_ids``) at the trainer's sampling temperature: one forward
    per ``batch_size`` rows, then one entropy_gpu pass over that micro-batch's logits.
    Positions outside ``attention_mask`` get 0 in ``logprob`` and the gradient norms."""
    batch_size = batch_size or input_ids.size(0)
    kwargs = {"logits_to_keep": logits_to_keep + 1} if _supports_logits_to_keep(trainer.accelerator.unwrap_model(model)) else {}
    pieces = []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        with trainer.accelerator.autocast():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        logits = logits[:, :-1][:, -logits_to_keep:]  # position t predicts token t + 1
        targets = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)
        out = token_stats(logits, targets, temperature=trainer.temperature, stats=stats)
        pieces.append([getattr(out, name) for name in stats])
        del logits
    return {name: torch.cat([p[k] for p in pieces]) for k, name in enumerate(stats)}


def _logps_with_grad(trainer: GRPOTrainer, model, call: dict[str, Any]) -> tuple[Tensor, Tensor | None, None]:
    """Training call on TRL < 1.15: log-probs and entropies from one differentiable entropy_gpu
    pass over each micro-batch's logits (entropies carry gradients only for an entropy bonus)."""
    input_ids, attention_mask, keep = call["input_ids"], call["attention_mask"], call["logits_to_keep"]
    batch_size = call.get("batch_size") or input_ids.size(0)
    kwargs = {"logits_to_keep": keep + 1} if _supports_logits_to_keep(trainer.accelerator.unwrap_model(model)) else {}
    entropy_grad = getattr(trainer, "_entropy_bonus_enabled", False)
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        with trainer.accelerator.autocast():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        logits = logits[:, :-1][:, -keep:]
        targets = ids[:, -keep:].masked_fill(mask[:, -keep:] == 0, -100)
        entropy, logps = entropy_and_logprobs(logits, targets, temperature=trainer.temperature)
        all_logps.append(logps)
        all_entropies.append(entropy if entropy_grad else entropy.detach())
    entropies = torch.cat(all_entropies) if call.get("compute_entropy") else None
    return torch.cat(all_logps), entropies, None


def _entropy_gpu_logps_and_entropies(trainer: GRPOTrainer, model, call: dict[str, Any] | None):
    """TRL's ``(logps, entropies, aux_loss)`` from entropy_gpu, or None where TRL's own path stays."""
    if call is None:
        return None
    if torch.is_grad_enabled():
        if TRL_FUSED_LM_HEAD:  # from 1.15, TRL's chunked fused LM head already avoids the logits
            return None
        return _logps_with_grad(trainer, model, call)
    stats = ("logprob", "entropy") if call.get("compute_entropy") else ("logprob",)
    out = completion_token_stats(trainer, model, call["input_ids"], call["attention_mask"], call["logits_to_keep"],
                                 stats, call.get("batch_size"))
    return out["logprob"], out.get("entropy"), None


def use_entropy_gpu_logprobs(trainer: GRPOTrainer) -> GRPOTrainer:
    """Opt-in: serve ``trainer``'s GRPO log-prob/entropy computation with entropy_gpu.

    Text-only calls without MoE aux loss are served; others keep TRL's path. Scoring calls
    (no grad: old-policy and reference log-probs) use one fused entropy_gpu pass over each
    micro-batch's logits. Training calls (with grad) on TRL < 1.15 take log-probs and
    entropies from one differentiable entropy_gpu pass; on TRL >= 1.15 they keep TRL's
    chunked fused LM head, which never materializes the logits. Results equal TRL's within
    floating-point tolerance on completion positions (0 elsewhere, as TRL >= 1.14).
    Returns the trainer.
    """
    if isinstance(trainer, CorrPOTrainer):
        trainer.entropy_gpu_logprobs = True
        return trainer
    original = trainer._get_per_token_logps_and_entropies

    def patched(model, *args, **kwargs):
        out = _entropy_gpu_logps_and_entropies(trainer, model, _text_only_call(args, kwargs))
        return original(model, *args, **kwargs) if out is None else out

    trainer._get_per_token_logps_and_entropies = patched
    return trainer


class _CorrPOReward:
    """The ``corrpo`` reward column: ``clip(phi(rho_i))`` computed by the trainer for this batch."""

    __name__ = CORRPO_REWARD_NAME

    def __init__(self, trainer: "CorrPOTrainer"):
        self.trainer = trainer

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        term = self.trainer._corrpo_term
        if term is None or term.numel() != len(completions):
            raise RuntimeError("CorR-PO term missing for this batch: _calculate_rewards was bypassed")
        return term.tolist()


def _pad_right(rows: list[list[int]] | list[Tensor], value: int, device) -> Tensor:
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value).to(device)


def _pad_left(rows: list[list[int]], value: int, device) -> Tensor:
    return _pad_right([torch.as_tensor(r, dtype=torch.long).flip(0) for r in rows], value, device).flip(1)


class CorrPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rewards include the CorR-PO term ``coef * phi(rho_i)``.

    Args: those of ``trl.GRPOTrainer``, plus
        corrpo: ``CorrPOConfig`` (coefficient, measure, phi, clipping, pooling).
        entropy_gpu_logprobs: also serve TRL's log-prob/entropy calls with entropy_gpu
            (see ``use_entropy_gpu_logprobs``).

    Logs ``corrpo/correlation``, ``corrpo/inversion_rate``, ``corrpo/undefined``,
    ``corrpo/undefined_fraction``, ``corrpo/entropy``, ``corrpo/<measure>``, ``corrpo/bonus``
    and ``corrpo/extra_forward`` (1 when CorR-PO ran its own forward pass for the batch),
    besides TRL's ``rewards/corrpo/mean``.
    """

    def __init__(self, *args, corrpo: CorrPOConfig | None = None, entropy_gpu_logprobs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.corrpo = corrpo if corrpo is not None else CorrPOConfig()
        self.entropy_gpu_logprobs = entropy_gpu_logprobs
        # Appended after TRL's checks, as TRL itself appends environment rewards.
        self.reward_funcs.append(_CorrPOReward(self))
        self.reward_func_names.append(CORRPO_REWARD_NAME)
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat([self.reward_weights, torch.tensor([float(self.corrpo.coef)])])
        self._corrpo_rollout: tuple | None = None
        self._corrpo_captured: tuple[Tensor, Tensor, Tensor] | None = None
        self._corrpo_capture_armed = False
        self._corrpo_term: Tensor | None = None

    def _trl_scores_old_policy(self) -> bool:
        """Whether TRL computes ``old_per_token_logps`` before the rewards (its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or bool(self.use_vllm and self.vllm_importance_sampling_correction))

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        if out[6] is not None or self._is_multimodal_batch(prompts):
            raise NotImplementedError("CorrPOTrainer supports text-only batches: its scoring pass does not "
                                      "forward images")
        self._corrpo_rollout = (out[0], out[1], out[2])  # prompt ids, completion ids, tool mask
        self._corrpo_captured = None
        self._corrpo_capture_armed = self._trl_scores_old_policy()
        return out

    @staticmethod
    def _is_multimodal_batch(prompts: list) -> bool:
        return any(isinstance(m, dict) and isinstance(m.get("content"), list)
                   and any(isinstance(part, dict) and part.get("type") == "image" for part in m["content"])
                   for p in prompts if isinstance(p, list) for m in p)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        call = _text_only_call(args, kwargs)
        if self._corrpo_capture_armed and call is not None and model is self.model and not torch.is_grad_enabled():
            # TRL's old-policy scoring of this batch: serve it and keep the CorR-PO statistics.
            self._corrpo_capture_armed = False
            stats = ("logprob", "entropy", self.corrpo.measure)
            out = completion_token_stats(self, model, call["input_ids"], call["attention_mask"],
                                         call["logits_to_keep"], stats, call.get("batch_size"))
            mask = call["attention_mask"][:, -call["logits_to_keep"]:]
            self._corrpo_captured = (out["entropy"], out[self.corrpo.measure], mask)
            return out["logprob"], out["entropy"] if call.get("compute_entropy") else None, None
        if self.entropy_gpu_logprobs:
            out = _entropy_gpu_logps_and_entropies(self, model, call)
            if out is not None:
                return out
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._corrpo_term = self._corrpo_score()
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _corrpo_token_stats(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """(entropy, measure, mask, extra_forward) for this batch's completions, ``[B, C]``."""
        prompt_ids, completion_ids, tool_mask = self._corrpo_rollout
        device = self.accelerator.device
        if self._corrpo_captured is not None:
            entropy, measure, mask = self._corrpo_captured
            extra_forward = False
        else:
            pad_id = self._tokenizer.pad_token_id
            prompts = _pad_left(prompt_ids, pad_id, device)
            completions = _pad_right(completion_ids, pad_id, device)
            mask = _pad_right([[1] * len(c) for c in completion_ids], 0, device)
            if self.mask_truncated_completions:  # as TRL: no loss, and here no correlation, for truncated ones
                stop_ids = [*getattr(self, "eos_token_ids", [self._tokenizer.eos_token_id]), pad_id]
                truncated = torch.tensor([len(c) == 0 or int(c[-1]) not in stop_ids for c in completion_ids],
                                         device=device)
                mask = mask * (~truncated).unsqueeze(1).long()
            input_ids = torch.cat([prompts, completions], dim=1)
            prompt_mask = _pad_left([[1] * len(p) for p in prompt_ids], 0, device)
            attention_mask = torch.cat([prompt_mask, mask], dim=1)
            batch_size = (self.args.per_device_train_batch_size if self.model.training
                          else self.args.per_device_eval_batch_size)
            with torch.no_grad():
                out = completion_token_stats(self, self.model, input_ids, attention_mask, completions.size(1),
                                             ("entropy", self.corrpo.measure), batch_size)
            entropy, measure = out["entropy"], out[self.corrpo.measure]
            extra_forward = True
        if tool_mask is not None:  # tool outputs are not the policy's tokens
            tools = _pad_right(tool_mask, 1, device)
            width = mask.size(1)
            tools = torch.nn.functional.pad(tools, (0, width - tools.size(1)), value=1)[:, :width]
            mask = mask * tools
        return entropy, measure, mask.bool(), extra_forward

    def _corrpo_score(self) -> Tensor:
        """This process's ``clip(phi(rho_i))`` column; logs ``corrpo/*``."""
        mode = "train" if self.model.training else "eval"
        entropy, measure, mask, extra_forward = self._corrpo_token_stats()
        local_rows = entropy.size(0)
        # Groups may straddle processes: score the whole generation batch on every process.
        entropy, measure, mask = (self.accelerator.gather(self.accelerator.pad_across_processes(t, dim=1))
                                  for t in (entropy.float(), measure.float(), mask.long()))
        mask = mask.bool()
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        result = corrpo_from_stats(entropy, measure, mask, group_size=group_size, config=self.corrpo)
        for name, value in result.metrics.items():
            if not math.isnan(value):  # NaN: no defined correlation in this batch; logged steps average the rest
                self._metrics[mode][name].append(value)
        self._metrics[mode]["corrpo/extra_forward"].append(float(extra_forward))
        start = self.accelerator.process_index * local_rows
        self._corrpo_captured = None
        return result.term[start:start + local_rows]
