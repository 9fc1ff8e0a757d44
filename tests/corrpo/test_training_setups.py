"""CorR-PO's default measure (same-position parameter gradients) in the set-ups policies are
trained in: bf16 / fp16 weights or autocast, a PEFT/LoRA-wrapped policy, gradient
checkpointing, and sharded training (refused with a clear error).

Half-precision tolerances, against the float32 measure of the same weights: bf16 keeps 8
significant bits (unit roundoff 2^-9 = 0.2 %), fp16 11 (0.03 %). The measure goes through a
forward and a backward of the model in that precision, so each token's value carries a few
roundings per layer; measured on these models: per-token relative error at most 1 % (bf16) and
0.1 % (fp16). The tests allow 4 % and 1 %. The per-response Pearson rho(entropy, measure)
moves by at most 0.02 (bf16; entropy from bf16 logits included); allowed 0.06 (bf16) and
0.02 (fp16). A wrong formula or a float32-only path is off by far more (O(1) relative).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_gpu.analysis.models import tiny_llama
from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats
from entropy_gpu.param_grad.model_parts import causal_lm, refuse_sharded, select_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61
#: dtype -> (per-token relative error of the measure, per-response rho difference)
HALF_TOL = {torch.bfloat16: (0.04, 0.06), torch.float16: (0.01, 0.02)}
#: forward-mode (same directions, k = 4): the tangents are half precision too
FORWARD_MODE_TOL = {torch.bfloat16: 0.1, torch.float16: 0.05}


def _llama():
    m = tiny_llama(vocab_size=VOCAB, hidden_size=32, layers=2, heads=2, seed=4)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # peaked distributions: entropies vary across tokens
    return m


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m.eval()  # q/k/v biases, grouped-query attention


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)).eval()


ARCHS = {"llama": _llama, "qwen2": _qwen2, "gemma2": _gemma2}


def _batch():
    """3 rows of 24 tokens: one unpadded, one left-padded, one right-padded; completions from 8."""
    # No token 0: Gemma-2's padding id, whose (tied) embedding row is zero, so is its gradient.
    ids = torch.randint(1, VOCAB, (3, 24), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0
    attention[2, -4:] = 0
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 8:] = True
    completion[2, -4:] = False
    return ids, attention, completion


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / math.sqrt(float((x * x).sum() * (y * y).sum())))


def _stats(model, method="same_position", **kwargs):
    ids, attention, completion = _batch()
    config = CorrPOConfig(measure=ParamGradMeasure(method=method, k=4, seed=1))
    return completion_stats(model, ids, completion, attention_mask=attention, config=config, **kwargs)


# ---- 1. bf16 and fp16 ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_half_precision_measure_is_close_to_the_float32_measure_of_the_same_weights(arch, dtype):
    model = ARCHS[arch]()
    want = _stats(model)
    got = _stats(copy.deepcopy(model).to(dtype))
    assert got.measure.dtype == torch.float32 and torch.isfinite(got.measure).all()
    mask = want.mask
    assert (want.measure[mask] > 0).all()
    token_tol, rho_tol = HALF_TOL[dtype]
    rel = ((got.measure - want.measure).abs() / want.measure.clamp_min(1e-30))[mask]
    assert rel.max() < token_tol, f"per-token relative error {rel.max():.4f}"
    assert rel.mean() < token_tol / 4
    for row in range(mask.shape[0]):
        m = mask[row]
        rho_got = _pearson(got.entropy[row, m], got.measure[row, m])
        rho_want = _pearson(want.entropy[row, m], want.measure[row, m])
        assert abs(rho_got - rho_want) < rho_tol, (row, rho_got, rho_want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_half_precision_forward_mode_estimate_is_close_to_float32(arch, dtype):
    """Same seed, same (exactly representable +-1) directions: only rounding differs."""
    model = ARCHS[arch]()
    want = _stats(model, method="forward_mode")
    got = _stats(copy.deepcopy(model).to(dtype), method="forward_mode")
    mask = want.mask
    assert got.measure.dtype == torch.float32 and torch.isfinite(got.measure).all()
    rel = ((got.measure - want.measure).abs() / want.measure.clamp_min(1e-30))[mask]
    assert rel.max() < FORWARD_MODE_TOL[dtype], f"per-token relative error {rel.max():.4f}"


@pytest.mark.parametrize("method", ["same_position", "forward_mode"])
def test_bf16_autocast_on_a_float32_model(method):
    """Mixed precision as TRL / accelerate run it on CPU: float32 weights under bf16 autocast."""
    model = _llama()
    want = _stats(model, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _stats(model, method=method)
    rel = ((got.measure - want.measure).abs() / want.measure)[want.mask]
    assert rel.max() < FORWARD_MODE_TOL[torch.bfloat16] if method == "forward_mode" else rel.max() < 0.04


def _cohere():
    """A model whose logits really are not h . W[y]: Cohere multiplies them by logit_scale."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(6)
    m = CohereForCausalLM(CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                       logit_scale=0.5))
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m.eval()


def _soft_capped_llama():
    """Llama ignores final_logit_softcapping; the measure's logit would apply it."""
    model = _llama()
    model.config.final_logit_softcapping = 2.0
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("make", [_cohere, _soft_capped_llama], ids=["logit_scale", "softcap"])
def test_unsupported_models_are_still_refused_in_half_precision(make, dtype):
    model = make().to(dtype)
    with pytest.raises(ValueError, match="not h . W\\[y\\]"):
        _stats(model)
    with pytest.raises(ValueError, match="not h . W\\[y\\]"), torch.autocast("cpu", dtype=torch.bfloat16):
        _stats(make())


def test_example_trains_one_step_in_bf16_on_cpu():
    """``examples/corrpo_trl.py --bf16`` (accelerate's bf16 autocast on CPU, the default measure)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, str(root / "examples" / "corrpo_trl.py"), "--bf16", "--steps", "1",
                           "--batch-size", "4", "--num-generations", "2", "--max-completion-length", "6",
                           "--output-dir", "/tmp/corrpo-bf16-test"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[0] == "1" and all(math.isfinite(float(v)) for v in row[1:])
    assert float(row[6]) > 0  # corrpo/param_grad_fro


# ---- 2a. PEFT / LoRA ----


def _lora(model, r=4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


@pytest.mark.parametrize("method", ["same_position", "forward_mode"])
def test_lora_policy_measures_the_base_weights(method):
    """A fresh LoRA (B = 0) computes what the base model computes; the measured parameters
    are the base q/k/v/o weights (``q_proj.base_layer.weight``), never the adapters."""
    base = _llama()
    want = _stats(base, method=method)
    peft_model = _lora(copy.deepcopy(base))
    selected = select_parameters(causal_lm(peft_model), ParamGradMeasure().param_patterns)
    assert len(selected) == 8 and not any("lora_" in n for n in selected)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in selected
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    got = _stats(peft_model, method=method)
    assert flags == {n: p.requires_grad for n, p in peft_model.named_parameters()}
    torch.testing.assert_close(got.measure, want.measure, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-6)


def test_trained_lora_policy_measures_like_its_merged_model():
    """After LoRA training, the logit depends on a base weight W only through W + s B A, so
    the gradient w.r.t. W is that w.r.t. the merged weight: the measure equals the merged
    model's."""
    peft_model = _lora(_llama())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    got = _stats(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    want = _stats(merged)
    assert (got.measure - _stats(_llama()).measure).abs().max() > 1e-3  # the adapters changed it
    torch.testing.assert_close(got.measure, want.measure, rtol=1e-4, atol=1e-6)


# ---- 2b. gradient checkpointing ----


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("method", ["same_position", "forward_mode"])
def test_gradient_checkpointing_gives_the_same_numbers(method, reentrant):
    model = _llama().train()
    want = _stats(model, method=method)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        got = _stats(model, method=method)
        assert model.model.layers[0].gradient_checkpointing  # still on afterwards
    finally:
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(got.measure, want.measure, rtol=1e-6, atol=1e-7)


# ---- 2c. sharded parameters ----


def test_sharded_parameters_are_refused():
    """FSDP (flat or DTensor parameters) and ZeRO-3 hold parameter shards outside the forward:
    per-parameter norms would be a shard's. Refused, never a silent wrong number."""
    model = _llama()
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight = torch.nn.Parameter(q.weight[:8].clone())  # what a rank's shard looks like
    with pytest.raises(NotImplementedError, match="sharded"):
        _stats(model)
    model = _llama()
    model.model.layers[1].self_attn.v_proj.weight.ds_id = 7  # DeepSpeed ZeRO-3's partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        refuse_sharded(model, select_parameters(model))


def test_fsdp2_dtensor_parameters_are_refused(tmp_path):
    """A real FSDP2 ``fully_shard`` model (one gloo process): its parameters are DTensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(NotImplementedError, match="DTensor"):
            _stats(model)
    finally:
        dist.destroy_process_group()


# ---- the same through CorrPOTrainer ----


def _corrpo_column(tmp_path, name, **grpo_kwargs) -> list[float]:
    """The ``corrpo`` reward column of one GRPO step on fixed completions (computed before the
    optimizer step, so every set-up scores the same policy)."""
    from datasets import Dataset
    from trl import GRPOConfig

    from entropy_gpu.analysis.models import load_tokenizer
    from entropy_gpu.integrations.trl import CorrPOTrainer
    from tests.integrations.corrpo_accelerate_worker import fixed_rollout

    tokenizer = load_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    peft_config = grpo_kwargs.pop("peft_config", None)
    args = GRPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=16, max_steps=1, temperature=0.9, report_to=[],
                      save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
                      log_completions=True,
                      **({"bf16": False} | grpo_kwargs))

    def length(completion_ids, **kwargs):
        return [len(c) / 16 for c in completion_ids]

    trainer = CorrPOTrainer(model=model, reward_funcs=length, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["Name a color."] * 2}),
                            processing_class=tokenizer, corrpo=CorrPOConfig(coef=0.5),
                            rollout_func=fixed_rollout, peft_config=peft_config)
    trainer.train()
    inner = causal_lm(trainer.model)
    assert (inner is not trainer.model) == (peft_config is not None)
    assert inner.model.layers[0].gradient_checkpointing == bool(args.gradient_checkpointing)
    return list(trainer._logs["rewards"]["corrpo"])


def test_trainer_lora_checkpointing_and_bf16_score_like_the_plain_policy(tmp_path, monkeypatch):
    """CorrPOTrainer with ``peft_config`` (fresh LoRA on q/v) and ``gradient_checkpointing=True``
    gives the plain float32 policy's corrpo column; with ``bf16=True`` (CPU autocast) it is
    within the bf16 rho tolerance."""
    from peft import LoraConfig

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    plain = _corrpo_column(tmp_path, "plain")
    assert np.ptp(plain) > 0.05  # distinct per-completion terms, so the comparisons can fail
    lora = _corrpo_column(tmp_path, "lora", gradient_checkpointing=True,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    np.testing.assert_allclose(lora, plain, rtol=1e-5, atol=1e-6)
    bf16 = _corrpo_column(tmp_path, "bf16", bf16=True)
    np.testing.assert_allclose(bf16, plain, atol=HALF_TOL[torch.bfloat16][1])
