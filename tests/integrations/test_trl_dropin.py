"""The TRL drop-in (``use_entropy_gpu_logprobs``) serves GRPO's training forward.

A real ``GRPOTrainer`` (a tiny random Llama saved from a config, the SmolLM2 tokenizer, CPU):
TRL's own loss and parameter gradients for one generated batch against the drop-in's on the
same batch and weights; and whole runs under several ``GRPOConfig`` settings, counting the
calls that reach TRL's own ``_get_per_token_logps_and_entropies`` and the entropy_gpu passes
(fused LM head or ``token_stats``) that run with grad. Runs on every TRL version the project
supports (1.13 to 1.16; see docs/corrpo.md for the per-version venvs).
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from datasets import Dataset
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer

import entropy_gpu.corrpo.model as corrpo_model
import entropy_gpu.integrations.trl as dropin
from entropy_gpu.integrations.trl import (
    SERVED_GRAD_METRIC,
    SERVED_NO_GRAD_METRIC,
    TRL_VERSION,
    use_entropy_gpu_logprobs,
)

PROMPTS = ["Tell a story", "Name a color"]


def varied_reward(completion_ids, **kwargs):
    """Differs between completions of one prompt, so the advantages (and the gradients) are not 0."""
    return [(sum(ids) % 13) / 13 + len(ids) / 8 for ids in completion_ids]


def _args(tmp_path, **settings) -> GRPOConfig:
    """TRL's default GRPOConfig (bf16 autocast included), small sizes, plus ``settings``."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=6, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                seed=0)
    return GRPOConfig(**{**base, **settings})


def _trainer(model_dir, tmp_path, **settings) -> GRPOTrainer:
    """A GRPOTrainer on the tiny Llama saved in ``model_dir``, its output embedding scaled so that
    next-token entropies spread out (at initialization they all lie within 1e-5 of log V, and the
    top_entropy_quantile mask would be decided by rounding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = _args(tmp_path, **settings)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=varied_reward, args=args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight.mul_(12.0)  # tied: the input embedding too (RMS-normed)
    return trainer


def _prepare(trainer: GRPOTrainer) -> None:
    """The model prepared as ``train()`` prepares it (with bf16, its forward runs under autocast)."""
    trainer.model = trainer.accelerator.prepare_model(trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def _generated_batch(trainer: GRPOTrainer) -> dict:
    """One generation batch as TRL's training loop hands it to ``compute_loss`` (before any drop-in)."""
    _prepare(trainer)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(4)])


def _loss_and_grads(trainer: GRPOTrainer, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]


class Spies:
    """Counts, with and without grad, the calls reaching TRL's own log-prob method and the
    entropy_gpu passes of the drop-in (fused LM head, or ``token_stats`` over the logits)."""

    def __init__(self, monkeypatch):
        self.trl, self.entropy_gpu = Counter(), Counter()
        trl_method = GRPOTrainer._get_per_token_logps_and_entropies

        def trl_spy(trainer, *args, **kwargs):
            self.trl["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            return trl_method(trainer, *args, **kwargs)

        def counting(fn):
            def spy(x, *args, **kwargs):
                self.entropy_gpu["grad" if x.requires_grad else "no_grad"] += 1
                return fn(x, *args, **kwargs)
            return spy

        monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", trl_spy)
        monkeypatch.setattr(dropin, "linear_token_stats", counting(dropin.linear_token_stats))
        monkeypatch.setattr(corrpo_model, "token_stats", counting(corrpo_model.token_stats))


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])
    return float((got.double() - want.double()).norm() / want.double().norm())


FP32_SETTINGS = {
    "defaults": {},
    "num_iterations=2": {"num_iterations": 2},
    "entropy_coef=0.5": {"entropy_coef": 0.5},
    "temperature=0.6,grpo": {"temperature": 0.6, "loss_type": "grpo"},
    "top_entropy_quantile=0.5": {"top_entropy_quantile": 0.5},
    "beta=0.1": {"beta": 0.1},
    "cast_lm_head_to_fp32": {"cast_lm_head_to_fp32": True},
}


@pytest.mark.parametrize("settings", list(FP32_SETTINGS.values()), ids=list(FP32_SETTINGS))
def test_training_step_equals_trls_fp32(tiny_model_dir, tmp_path, monkeypatch, settings):
    """One training step's loss and every parameter gradient: TRL's own path vs the drop-in, fp32."""
    spies = Spies(monkeypatch)
    trainer = _trainer(tiny_model_dir, tmp_path, bf16=False, **settings)
    inputs = _generated_batch(trainer)
    want_loss, want_grads = _loss_and_grads(trainer, inputs)
    assert spies.trl["grad"] == 1
    assert use_entropy_gpu_logprobs(trainer) is trainer
    spies.trl.clear()
    loss, grads = _loss_and_grads(trainer, inputs)
    assert spies.trl["grad"] == 0, "the training forward went through TRL's own path"
    assert spies.entropy_gpu["grad"] == 1
    assert trainer.entropy_gpu_calls == Counter(served_grad=1)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max(float(g.abs().max()) for g in want_grads) > 1e-3, "a test with zero gradients cannot fail"
    assert trainer._metrics["train"][SERVED_GRAD_METRIC] == [1.0]


BF16_SETTINGS = {"defaults": {},
                 "entropy_coef=0.5,temperature=0.6": {"entropy_coef": 0.5, "temperature": 0.6}}


@pytest.mark.parametrize("settings", list(BF16_SETTINGS.values()), ids=list(BF16_SETTINGS))
def test_training_step_bf16_tolerance(tiny_model_dir, tmp_path, settings):
    """bf16 autocast (GRPOConfig's default). entropy_gpu's head accumulates the logits in fp32;
    TRL's chunked head on CPU rounds each logits tile to bf16; the bf16 backbone's rounding is
    the same in both. Stated tolerance: loss within 2% (atol 1e-3) of TRL's, gradients within 3%
    of TRL's (relative Frobenius norm over all parameters), and at most 1.5x TRL's distance
    (and under 2%) from the same step computed in fp32."""
    trainer = _trainer(tiny_model_dir, tmp_path, **settings)
    assert trainer.args.bf16
    inputs = _generated_batch(trainer)
    reference = _trainer(tiny_model_dir, tmp_path, bf16=False, **settings)
    reference.model.load_state_dict(trainer.model.state_dict())
    _prepare(reference)
    fp32_loss, fp32_grads = _loss_and_grads(reference, inputs)
    trl_loss, trl_grads = _loss_and_grads(trainer, inputs)
    use_entropy_gpu_logprobs(trainer)
    loss, grads = _loss_and_grads(trainer, inputs)
    assert trainer.entropy_gpu_calls == Counter(served_grad=1)
    torch.testing.assert_close(loss, trl_loss, atol=1e-3, rtol=2e-2)
    assert _relative_error(grads, trl_grads) < 3e-2
    assert _relative_error(grads, fp32_grads) <= 1.5 * _relative_error(trl_grads, fp32_grads) + 1e-4
    assert _relative_error(grads, fp32_grads) < 2e-2


RUN_SETTINGS = {  # name: (GRPOConfig settings, training steps, no-grad scoring calls, their micro-batches)
    "defaults": ({}, 2, 0, 0),
    "num_iterations=2": ({"num_iterations": 2}, 2, 1, 1),
    # a generation batch of 8 rows scored per 4 (per_device_train_batch_size)
    "steps_per_generation=2": ({"steps_per_generation": 2, "per_device_train_batch_size": 4}, 2, 1, 2),
    "beta=0.04": ({"beta": 0.04}, 1, 1, 1),
}


@pytest.mark.parametrize("case", list(RUN_SETTINGS.values()), ids=list(RUN_SETTINGS))
def test_runs_serve_every_training_forward(tiny_model_dir, tmp_path, monkeypatch, case):
    """Whole runs (TRL's default GRPOConfig, bf16 autocast, and variants): every call with grad is
    served by entropy_gpu, none reaches TRL's own path, and the metric says so at each logged step."""
    settings, steps, scoring_calls, scoring_passes = case
    spies = Spies(monkeypatch)
    trainer = use_entropy_gpu_logprobs(_trainer(tiny_model_dir, tmp_path, max_steps=steps, **settings))
    trainer.train()
    assert trainer.state.global_step == steps
    assert spies.trl == Counter(), "a call went through TRL's own path"
    assert spies.entropy_gpu == Counter(grad=steps, no_grad=scoring_passes)
    assert trainer.entropy_gpu_calls == Counter(served_grad=steps, served_no_grad=scoring_calls)
    logs = [h for h in trainer.state.log_history if SERVED_GRAD_METRIC in h]
    assert len(logs) == steps and all(h[SERVED_GRAD_METRIC] == 1.0 for h in logs)
    if scoring_calls:
        history = trainer.state.log_history
        scoring_logs = [h[SERVED_NO_GRAD_METRIC] for h in history if SERVED_NO_GRAD_METRIC in h]
        assert scoring_logs == [1.0]


def test_use_liger_kernel(tiny_model_dir, tmp_path, monkeypatch):
    """Liger is not installed here, so its flag is set on the built trainer (TRL checks for Liger
    only at init). TRL 1.14 then takes its chunked path (no logits) and the drop-in serves it with
    the fused head, equal to TRL's; 1.15+ is unchanged by the flag; 1.13's Liger loss is not
    served, which the drop-in says."""
    trainer = _trainer(tiny_model_dir, tmp_path, bf16=False)
    inputs = _generated_batch(trainer)
    trainer.use_liger_kernel = True
    trainer._forward_redirection = None  # 1.14 sets it with Liger; unused for an unwrapped model
    if TRL_VERSION < Version("1.14.0"):
        with pytest.warns(UserWarning, match="use_liger_kernel=True on TRL 1.13"):
            use_entropy_gpu_logprobs(trainer)
        return
    want_loss, want_grads = _loss_and_grads(trainer, inputs)
    spies = Spies(monkeypatch)
    use_entropy_gpu_logprobs(trainer)
    loss, grads = _loss_and_grads(trainer, inputs)
    assert dropin.trl_scores_without_logits(trainer)
    assert spies.entropy_gpu == Counter(grad=1) and trainer.entropy_gpu_calls == Counter(served_grad=1)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unserved_calls_warn_and_keep_trls_path(tiny_model_dir, tmp_path, monkeypatch):
    """A call the drop-in cannot serve (MoE aux loss) runs TRL's own method with a warning naming
    the setting, and is counted as not served."""
    trainer = _trainer(tiny_model_dir, tmp_path, bf16=False)
    received = []
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies",
                        lambda self, *args, **kwargs: received.append(kwargs) or ("trl", None, None))
    use_entropy_gpu_logprobs(trainer)
    ids = torch.randint(3, 1000, (2, 6))
    with pytest.warns(UserWarning, match="compute_aux_loss"):
        out = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 3,
                                                         compute_aux_loss=True)
    assert out[0] == "trl" and received == [{"compute_aux_loss": True}]
    assert trainer.entropy_gpu_calls == Counter(trl_grad=1)
    assert trainer._metrics["train" if trainer.model.training else "eval"][SERVED_GRAD_METRIC] == [0.0]


@pytest.mark.skipif(not dropin.TRL_FUSED_LM_HEAD, reason="TRL < 1.15 serves soft-capped models' logits")
def test_soft_capped_model_warns_on_the_fused_head(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, bf16=False)
    inputs = _generated_batch(trainer)
    trainer.model.config.final_logit_softcapping = 30.0
    want_loss, _ = _loss_and_grads(trainer, inputs)
    use_entropy_gpu_logprobs(trainer)
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        loss, _ = _loss_and_grads(trainer, inputs)
    assert loss == want_loss
    assert trainer.entropy_gpu_calls == Counter(trl_grad=1)


def test_a_loss_without_the_method_warns(tiny_model_dir, tmp_path):
    """A trainer whose loss never calls ``_get_per_token_logps_and_entropies`` is not silently unserved."""
    trainer = _trainer(tiny_model_dir, tmp_path, bf16=False)
    trainer.compute_loss = lambda model, inputs, **kwargs: sum(p.sum() for p in model.parameters())
    use_entropy_gpu_logprobs(trainer)
    with pytest.warns(UserWarning, match="a training loss was computed without entropy_gpu"):
        trainer.compute_loss(trainer.model, {})


def test_corrpo_trainer_serves_the_same_calls(tiny_model_dir, tmp_path, monkeypatch):
    """``CorrPOTrainer(entropy_gpu_logprobs=True)`` serves the training forward as the drop-in does."""
    from entropy_gpu.corrpo import CorrPOConfig
    from entropy_gpu.integrations.trl import CorrPOTrainer

    spies = Spies(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = CorrPOTrainer(model=str(tiny_model_dir), reward_funcs=varied_reward,
                                args=_args(tmp_path, max_steps=1, num_iterations=2),
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                corrpo=CorrPOConfig(measure="nll_grad_norm"), entropy_gpu_logprobs=True)
    trainer.train()
    assert spies.trl["grad"] == 0
    assert spies.entropy_gpu["grad"] == 1
    # the old-policy scoring call is CorR-PO's own (it keeps the statistics), not the drop-in's
    assert trainer.entropy_gpu_calls == Counter(served_grad=1)
    assert any(h.get(SERVED_GRAD_METRIC) == 1.0 for h in trainer.state.log_history)


def test_peft_lora_training_step_equals_trls(tiny_model_dir, tmp_path, monkeypatch):
    """With a LoRA adapter (PEFT wraps the causal LM; its forward passes the drop-in's keyword
    through), the training forward is served and the adapter's gradients equal TRL's."""
    from peft import LoraConfig

    spies = Spies(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=varied_reward,
                              args=_args(tmp_path, bf16=False, beta=0.1),
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs = _generated_batch(trainer)
    want_loss, want_grads = _loss_and_grads(trainer, inputs)  # the adapter's parameters only
    use_entropy_gpu_logprobs(trainer)
    loss, grads = _loss_and_grads(trainer, inputs)
    assert spies.entropy_gpu["grad"] == 1 and trainer.entropy_gpu_calls == Counter(served_grad=1)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert want_grads and max(float(g.abs().max()) for g in want_grads) > 0
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
