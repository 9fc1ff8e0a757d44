"""CorR-PO in the real verl package (entropy_gpu.integrations.verl.corrpo): the estimator
``corrpo_grpo`` is looked up in verl's registry and run through verl's ``compute_advantage``; the
hooks run verl's trainer method ``_compute_old_log_prob`` and its FSDP engine's input/output code
on a real (tiny) transformers model. What needs GPUs and Ray workers (FSDP sharding, the rollout
engine, ``main_ppo``) is covered by examples/verl/ (docs/usage/corrpo-verl.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

# verl imports Megatron and Ray, which warn about optional accelerators on a CPU machine.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

verl = pytest.importorskip("verl", reason="verl is not installed (bash scripts/setup.sh dev installs it)")

import verl.utils.torch_functional as verl_F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from entropy_gpu.corrpo import CorrPOConfig, corrpo_from_stats  # noqa: E402
from entropy_gpu.integrations import verl as ev  # noqa: E402
from entropy_gpu.integrations.verl import corrpo as verl_corrpo  # noqa: E402
from tests.reference import reference_stats  # noqa: E402


def grpo_batch(groups=3, n=4, t=9, seed=0, shuffle=False):
    gen = torch.Generator().manual_seed(seed)
    b = groups * n
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = 1  # a one-token response: rho undefined, bonus 0
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    entropy = torch.rand(b, t, generator=gen) * 3
    measure = entropy * torch.randn(b, 1, generator=gen) + torch.rand(b, t, generator=gen)
    scores = torch.randint(0, 2, (b,), generator=gen).float()
    scores[n : 2 * n] = 1.0  # a group with equal task rewards
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = scores
    uid = np.array([f"prompt-{i // n}" for i in range(b)], dtype=object)
    perm = torch.randperm(b, generator=gen) if shuffle else torch.arange(b)
    return dict(
        token_level_rewards=rewards[perm],
        response_mask=mask[perm],
        index=uid[perm.numpy()],
        corrpo_entropy=entropy[perm],
        corrpo_measure=measure[perm],
        scores=scores[perm],
        perm=perm,
    )


@pytest.mark.parametrize("pooling", ["completion", "group"])
def test_estimator_is_found_by_name_and_matches_entropy_gpu_corrpo(pooling):
    verl_corrpo._register_estimator()
    fn = core_algos.get_adv_estimator_fn("corrpo_grpo")
    assert fn is ev.compute_corrpo_grpo_advantage
    cfg = CorrPOConfig(coef=0.3, pooling=pooling, measure="nll_grad_norm")
    algo = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "corrpo": {"coef": 0.3, "pooling": pooling}})
    data = grpo_batch()
    adv, ret = fn(
        data["token_level_rewards"],
        data["response_mask"],
        data["index"],
        algo,
        corrpo_entropy=data["corrpo_entropy"],
        corrpo_measure=data["corrpo_measure"],
    )
    want = corrpo_from_stats(
        data["corrpo_entropy"],
        data["corrpo_measure"],
        data["response_mask"].bool(),
        rewards=data["scores"],
        group_size=4,
        config=cfg,
        eps=1e-6,
    )
    assert want.valid.sum() > 6
    assert want.valid[0] == (pooling == "group")  # a one-token response has a rho only when pooled
    per_response = adv[torch.arange(adv.shape[0]), 0]
    torch.testing.assert_close(per_response, want.advantages, atol=1e-5, rtol=1e-5)
    assert torch.equal(adv, ret)
    assert (adv[data["response_mask"] == 0] == 0).all()
    # Shuffled responses (verl balances batches): the same per-response values.
    shuffled = grpo_batch(shuffle=True)
    adv_s, _ = fn(
        shuffled["token_level_rewards"],
        shuffled["response_mask"],
        shuffled["index"],
        algo,
        corrpo_entropy=shuffled["corrpo_entropy"],
        corrpo_measure=shuffled["corrpo_measure"],
    )
    torch.testing.assert_close(adv_s[:, 0], want.advantages[shuffled["perm"]], atol=1e-5, rtol=1e-5)
    # coef = 0 is verl's own GRPO.
    plain, _ = core_algos.compute_grpo_outcome_advantage(
        data["token_level_rewards"], data["response_mask"], data["index"]
    )
    zero, _ = fn(
        data["token_level_rewards"],
        data["response_mask"],
        data["index"],
        OmegaConf.create({"corrpo": {"coef": 0.0}}),
        corrpo_entropy=data["corrpo_entropy"],
        corrpo_measure=data["corrpo_measure"],
    )
    torch.testing.assert_close(zero, plain)


def test_compute_advantage_reads_the_statistics_from_the_batch_and_logs_metrics():
    from verl.trainer.ppo import ray_trainer

    ev.install_corrpo(workers=False)
    try:
        data = grpo_batch(seed=4)
        entropy_change = torch.randn(data["response_mask"].shape, generator=torch.Generator().manual_seed(1))
        batch = DataProto.from_dict(
            tensors={
                "token_level_rewards": data["token_level_rewards"],
                "response_mask": data["response_mask"],
                ev.ENTROPY_KEY: data["corrpo_entropy"],
                ev.MEASURE_KEY: data["corrpo_measure"],
                ev.ENTROPY_CHANGE_KEY: entropy_change,
            },
            non_tensors={"uid": data["index"]},
        )
        algo = OmegaConf.create({"adv_estimator": "corrpo_grpo", "corrpo": {"coef": 0.2}})
        out = ray_trainer.compute_advantage(batch, adv_estimator="corrpo_grpo", config=algo)
        want = corrpo_from_stats(
            data["corrpo_entropy"],
            data["corrpo_measure"],
            data["response_mask"].bool(),
            rewards=data["scores"],
            group_size=4,
            config=CorrPOConfig(coef=0.2, measure="nll_grad_norm"),  # verl's default measure
            eps=1e-6,
        )
        torch.testing.assert_close(out.batch["advantages"][:, 0], want.advantages, atol=1e-5, rtol=1e-5)
        assert ev.ENTROPY_KEY not in out.batch.keys() and ev.MEASURE_KEY not in out.batch.keys()
        assert ev.ENTROPY_CHANGE_KEY not in out.batch.keys()
        metrics = out.meta_info[ev.METRICS_KEY]
        # The entropy dynamics: A * entropy_change over the response tokens (numpy reference).
        mask = data["response_mask"].bool().numpy()
        predicted = (out.batch["advantages"].double() * entropy_change.double()).numpy()[mask]
        dynamics = {k: metrics.pop(k) for k in list(metrics) if k.startswith("entropy_change/")}
        assert dynamics == pytest.approx({
            "entropy_change/adv_weighted_mean": predicted.mean(),
            "entropy_change/frac_pushing_down": (predicted < 0).mean(),
            "entropy_change/mean": entropy_change.double().numpy()[mask].mean(),
            **{f"entropy_change/q{q}": np.quantile(predicted, q / 100) for q in (10, 50, 90)},
            "entropy_change/tokens": float(mask.sum()),
        }, rel=1e-5, abs=1e-6)
        assert metrics == pytest.approx(want.metrics, nan_ok=True)
        assert {"corrpo/correlation", "corrpo/undefined", "corrpo/bonus", "corrpo/nll_grad_norm"} <= set(
            metrics
        )
        with pytest.raises(ValueError, match="install_corrpo"):
            core_algos.get_adv_estimator_fn("corrpo_grpo")(
                data["token_level_rewards"], data["response_mask"], data["index"], algo
            )
    finally:
        ev.uninstall_corrpo()
        ev.unpatch_verl()
    assert "corrpo_grpo" not in core_algos.ADV_ESTIMATOR_REGISTRY


def test_corrpo_config_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        ev.corrpo_config_from({"corrpo": {"coeff": 0.1}})
    assert (
        ev.corrpo_config_from(OmegaConf.create({"corrpo": {"measure": "entropy_grad_norm"}})).measure
        == "entropy_grad_norm"
    )
    assert ev.corrpo_config_from({}) == CorrPOConfig(measure="nll_grad_norm")  # verl: logit-space default
    data = grpo_batch()
    with pytest.raises(ValueError, match="response_mask shape"):
        ev.compute_corrpo_grpo_advantage(
            data["token_level_rewards"],
            data["response_mask"],
            data["index"],
            {},
            corrpo_entropy=data["corrpo_entropy"][:, :-1],
            corrpo_measure=data["corrpo_measure"],
        )


def tiny_model(vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).double().eval()


def bare_engine(model):
    """verl's FSDPEngineWithLMHead without FSDP/CUDA set-up: its input and output code only."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.pad_to_length = None
    engine.engine_config = SimpleNamespace(
        entropy_checkpointing=False,
        entropy_from_logits_with_chunking=False,
        entropy_from_logits_chunk_size=2048,
    )
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits  # bound at engine construction
    return engine


class LocalActor:
    """Stands in for the Ray worker group: runs the engine's own input/model/output code."""

    def __init__(self, engine, use_remove_padding=True):
        self.engine = engine
        self.use_remove_padding = use_remove_padding
        self.calls = 0

    def compute_log_prob(self, data):
        from verl.utils import tensordict_utils as tu

        self.calls += 1
        tu.assign_non_tensor(data, use_remove_padding=self.use_remove_padding, use_fused_kernels=False)
        model_inputs, output_args = self.engine.prepare_model_inputs(micro_batch=data)
        with torch.no_grad():
            raw = self.engine.module(**model_inputs, use_cache=False)
            model_output = self.engine.prepare_model_outputs(
                output=raw, output_args=output_args, micro_batch=data, logits_processor_func=None
            )
        return tu.get_tensordict(tensor_dict=model_output, non_tensor_dict={"metrics": {"mfu": 0.0}})


def rollout_batch(vocab=128, n=2, prompts=2, temperature=0.8):
    gen = torch.Generator().manual_seed(5)
    b, p, r = n * prompts, 4, 6
    prompt_len = torch.tensor([4, 2, 3, 4])[:b]
    resp_len = torch.tensor([6, 3, 1, 5])[:b]
    prompt_ids = torch.randint(0, vocab, (b, p), generator=gen)
    response_ids = torch.randint(0, vocab, (b, r), generator=gen)
    prompt_mask = (torch.arange(p).unsqueeze(0) >= (p - prompt_len).unsqueeze(1)).long()  # left padded
    response_mask = (torch.arange(r).unsqueeze(0) < resp_len.unsqueeze(1)).long()  # right padded
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    batch = DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], 1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
        },
        non_tensors={"uid": np.array([f"p{i // n}" for i in range(b)], dtype=object)},
        meta_info={"temperature": temperature},
    )
    return batch, prompt_len, resp_len


@pytest.mark.parametrize("remove_padding", [True, False])
def test_old_log_prob_hook_carries_entropy_and_measure_from_the_engine(patched, remove_padding):
    from verl.utils.attention_utils import unpad_input

    try:  # verl 0.9.0 unpads through flash-attn (GPU-only); 0.9.1 has a torch fallback
        unpad_input(torch.ones(1, 2, 1), torch.ones(1, 2, dtype=torch.long))
    except ModuleNotFoundError as exc:
        pytest.skip(f"this verl's padding code needs {exc.name} (verl 0.9.0 on CPU)")
    from verl.trainer.ppo import ray_trainer

    vocab, temperature = 128, 0.8
    model = tiny_model(vocab)
    trainer = SimpleNamespace(
        config=OmegaConf.create(
            {
                "algorithm": {"adv_estimator": "corrpo_grpo", "corrpo": {"coef": 0.1}},
                "actor_rollout_ref": {"actor": {}, "rollout": {"temperature": temperature}},
            }
        ),
        actor_rollout_wg=LocalActor(bare_engine(model), remove_padding),
    )
    ev.install_corrpo()
    try:
        batch, prompt_len, resp_len = rollout_batch(vocab, temperature=temperature)
        old, _ = ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, batch)
    finally:
        ev.uninstall_corrpo()
    assert trainer.actor_rollout_wg.calls == 1
    assert "compute_log_prob" not in vars(trainer.actor_rollout_wg)  # the worker-group call is restored
    # Reference: the same model on each unpadded sequence, float64 statistics at temperature t.
    for i in range(batch.batch.batch_size[0]):
        p, r = int(prompt_len[i]), int(resp_len[i])
        ids = torch.cat([batch.batch["prompts"][i, -p:], batch.batch["responses"][i, :r]])
        with torch.no_grad():
            logits = model(ids.unsqueeze(0)).logits[0, p - 1 : p + r - 1]
        ref = reference_stats(logits, ids[p:], temperature=temperature)
        torch.testing.assert_close(
            old.batch["old_log_probs"][i, :r].double(), ref["logprob"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            old.batch[ev.ENTROPY_KEY][i, :r].double(), ref["entropy"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            old.batch[ev.MEASURE_KEY][i, :r].double(), ref["nll_grad_norm"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(  # w.r.t. the raw logits, as token_stats at temperature t
            old.batch[ev.ENTROPY_CHANGE_KEY][i, :r].double(), ref["entropy_change"], atol=1e-5, rtol=1e-4
        )
    # Without corrpo_grpo the trainer method is verl's own (no measure requested).
    trainer.config.algorithm.adv_estimator = "grpo"
    ev.install_corrpo()
    try:
        old_plain, _ = ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, rollout_batch(vocab)[0])
    finally:
        ev.uninstall_corrpo()
    assert ev.MEASURE_KEY not in old_plain.batch.keys()
    assert ev.ENTROPY_CHANGE_KEY not in old_plain.batch.keys()
    torch.testing.assert_close(old_plain.batch["old_log_probs"], old.batch["old_log_probs"])


def test_hooks_refuse_fused_kernels_and_non_logit_measures():
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    micro_batch = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    tu.assign_non_tensor(micro_batch, **{ev.MEASURE_KEY: "nll_grad_norm"})
    fused_path = verl_corrpo._engine_prepare_model_outputs(
        lambda *args, **kwargs: {}
    )  # never calls logprobs_from_logits
    with pytest.raises(RuntimeError, match="use_fused_kernels=False"):
        fused_path(None, None, {}, micro_batch)
    with pytest.raises(ValueError, match="not a logit statistic"):  # e.g. a parameter-gradient measure
        verl_corrpo._logit_measure(SimpleNamespace(measure="param_grad_norm"))
    with pytest.raises(ValueError, match="not a per-token logit statistic"):
        with ev.capture_measure("param_grad_norm"):
            pass
