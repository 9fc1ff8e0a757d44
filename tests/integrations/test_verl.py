"""entropy_gpu inside the real verl package (entropy_gpu.integrations.verl).

verl's own functions run on real ``DataProto`` / ``TensorDict`` batches next to the patched
ones, against float64 references; the estimator is looked up in verl's registry and run
through verl's ``compute_advantage``; the CorR-PO hooks run verl's trainer method
``_compute_old_log_prob`` and its FSDP engine's input/output code on a real (tiny)
transformers model. What needs GPUs and Ray workers (FSDP sharding, the rollout engine,
``main_ppo``) is covered by examples/verl/ (README "CorR-PO with verl").
"""

from __future__ import annotations

import os
import subprocess
import sys
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
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402

from entropy_gpu.corrpo import CorrPOConfig, corrpo_from_stats  # noqa: E402
from entropy_gpu.integrations import verl as ev  # noqa: E402
from tests.helpers import run_ranks  # noqa: E402
from tests.reference import reference_stats  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ORIGINALS = {name: getattr(verl_F, name) for name in ev._TORCH_FUNCTIONAL}


@pytest.fixture
def patched():
    ev.unpatch_verl()
    names = ev.patch_verl()
    yield names
    ev.unpatch_verl()


def logits_batch(b=3, t=5, v=257, dtype=torch.float64, scale=3.0, seed=0) -> DataProto:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * scale
    logits[0, 0, 7] = 40.0  # a near-certain token: log p ~ -1e-16
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, 0] = 7
    return DataProto.from_dict(tensors={"logits": logits.to(dtype), "responses": labels})


# ------------------------------------------------------------------ patching


def test_patch_reaches_modules_that_imported_by_name_and_unpatch_restores():
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    import verl.workers.engine.megatron.transformer_impl as megatron_impl

    ev.unpatch_verl()
    before = (fsdp_impl.logprobs_from_logits, megatron_impl.vocab_parallel_entropy, FusedLinearForPPO.forward)
    names = ev.patch_verl()
    try:
        assert "verl.utils.torch_functional.logprobs_from_logits" in names
        assert verl_F.logprobs_from_logits is ev.logprobs_from_logits
        assert fsdp_impl.logprobs_from_logits is ev.logprobs_from_logits  # imported by name
        assert megatron_impl.vocab_parallel_entropy is ev.vocab_parallel_entropy
        assert megatron_impl.vocab_parallel_log_probs_from_logits is ev.vocab_parallel_log_probs_from_logits
        assert FusedLinearForPPO.forward is not before[2]
        assert ev.patch_verl() == names  # idempotent
    finally:
        ev.unpatch_verl()
    assert not ev.is_patched()
    assert (
        fsdp_impl.logprobs_from_logits,
        megatron_impl.vocab_parallel_entropy,
        FusedLinearForPPO.forward,
    ) == before
    assert all(getattr(verl_F, n) is f for n, f in ORIGINALS.items())


UNPATCH_AFTER_LATE_IMPORTS = """
import sys
import verl  # ENTROPY_GPU_VERL=kernels: the plugin patches here, before the engines load
from entropy_gpu.integrations import verl as ev
assert ev.is_patched()
import verl.workers.engine.fsdp.transformer_impl as fsdp_impl  # loaded after patching
assert fsdp_impl.logprobs_from_logits is ev.logprobs_from_logits
ev.unpatch_verl()
ev.patch_verl()
assert "verl.workers.rollout.naive.naive_rollout" not in sys.modules
import verl.workers.rollout.naive.naive_rollout as naive  # loaded after patch_verl()
assert naive.logprobs_from_logits is ev.logprobs_from_logits
ev.unpatch_verl()
ours = {id(f) for f in (*ev._TORCH_FUNCTIONAL.values(), *ev._MEGATRON.values())}
left = sorted(f"{m}.{k}" for m, mod in list(sys.modules.items())
              if mod is not None and m.startswith("verl")
              for k, v in list(vars(mod).items()) if id(v) in ours)
print("left:", left)
print(fsdp_impl.logprobs_from_logits.__module__, naive.logprobs_from_logits.__module__)
"""


def test_unpatch_restores_modules_imported_after_patching():
    """With the plugin, patching runs at ``import verl``; engines and the rollout load later and
    bind the patched names themselves. unpatch_verl must restore those bindings too."""
    env = dict(os.environ, ENTROPY_GPU_VERL="kernels")
    out = subprocess.run([sys.executable, "-c", UNPATCH_AFTER_LATE_IMPORTS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "left: []"
    assert lines[-1] == "verl.utils.torch_functional verl.utils.torch_functional"


def test_plugin_entry_point_does_nothing_unless_enabled():
    # This process imported verl without ENTROPY_GPU_VERL: verl's own functions.
    assert os.environ.get(ev.ENV_VAR, "") == ""
    assert ORIGINALS["entropy_from_logits"].__module__ == "verl.utils.torch_functional"
    code = (
        "import verl, verl.utils.torch_functional as F; from entropy_gpu.integrations import verl as ev; "
        "print(F.entropy_from_logits is ev.entropy_from_logits, "
        "F.logprobs_from_logits is ev.logprobs_from_logits)"
    )
    env = dict(os.environ, ENTROPY_GPU_VERL="kernels")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True True"


# ------------------------------------------------------------------ drop-in accuracy


def _verl_stats(function, logits, labels) -> dict:
    """Entropy, log-prob and sum p^2 from verl's three functions, ``function(name)`` giving each."""
    return {
        "entropy": function("entropy_from_logits")(logits),
        "logprob": function("logprobs_from_logits")(logits, labels),
        "sum_sq_probs": function("calculate_sum_pi_squared_from_logits")(logits),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patched_functions_agree_with_verl_and_float64_reference(patched, dtype):
    data = logits_batch(dtype=dtype)
    logits, labels = data.batch["logits"], data.batch["responses"]
    ref = reference_stats(logits, labels)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    ours = _verl_stats(lambda name: getattr(verl_F, name), logits, labels)  # patched
    theirs = _verl_stats(ORIGINALS.__getitem__, logits, labels)
    for name in ours:
        assert ours[name].dtype == dtype  # fp32 out for fp32 in (fp64 for fp64)
        torch.testing.assert_close(ours[name].double(), ref[name], atol=tol, rtol=tol, msg=name)
        torch.testing.assert_close(
            ours[name].double(), theirs[name].double(), atol=10 * tol, rtol=10 * tol, msg=name
        )
    chunked = verl_F.entropy_from_logits_with_chunking(logits.reshape(-1, logits.shape[-1]), chunk_size=4)
    torch.testing.assert_close(chunked.double(), ref["entropy"].reshape(-1), atol=tol, rtol=tol)
    assert (ours["logprob"] <= 0).all()


def test_bf16_outputs_are_fp32_and_more_accurate_than_verl(patched):
    data = logits_batch(b=4, t=16, v=4096, dtype=torch.bfloat16, scale=4.0, seed=1)
    logits, labels = data.batch["logits"], data.batch["responses"]
    ref = reference_stats(logits.double(), labels)  # exact statistics of the bf16 logits
    ours = _verl_stats(lambda name: getattr(verl_F, name), logits, labels)  # patched
    theirs = _verl_stats(ORIGINALS.__getitem__, logits, labels)
    for name in ours:
        assert ours[name].dtype == torch.float32, name
        assert theirs[name].dtype == torch.bfloat16, name  # verl returns the input dtype
        err_ours = (ours[name].double() - ref[name]).abs().max().item()
        err_verl = (theirs[name].double() - ref[name]).abs().max().item()
        assert err_ours < 1e-4, (name, err_ours)
        assert err_ours * 10 < err_verl, (name, err_ours, err_verl)


def test_log_probs_never_above_zero_and_gradients_match_verl(patched):
    logits = torch.randn(6, 50, dtype=torch.float32) * 4
    logits[:, 3] = 60.0  # p(3) rounds to 1 in fp32
    labels = torch.full((6,), 3)
    labels[-1] = 5
    assert (verl_F.logprobs_from_logits(logits, labels) <= 0).all()
    x64 = torch.randn(4, 7, 33, dtype=torch.float64) * 2
    y64 = torch.randint(0, 33, (4, 7))
    grads = []
    for entropy_fn, logprob_fn in (
        (verl_F.entropy_from_logits, verl_F.logprobs_from_logits),
        (ORIGINALS["entropy_from_logits"], ORIGINALS["logprobs_from_logits"]),
    ):
        x = x64.clone().requires_grad_(True)
        h = x * 1.0  # an intermediate, as in verl (logits / temperature)
        loss = (entropy_fn(h) * 0.3 - logprob_fn(h, y64, inplace_backward=False)).sum()
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)
    # inplace_backward=True (verl's default when nothing else reads the logits): same gradient.
    grads = []
    for logprob_fn in (verl_F.logprobs_from_logits, ORIGINALS["logprobs_from_logits"]):
        x = x64.clone().requires_grad_(True)
        (-logprob_fn(x * 1.0, y64, inplace_backward=True)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


def test_fused_linear_for_ppo_matches_verl_torch_path_with_temperature(patched):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(97, 16, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 5), generator=gen)
    t = 0.7
    outs = []
    for forward in (FusedLinearForPPO.forward, FusedLinearForPPO.forward.__wrapped__):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = forward(FusedLinearForPPO(chunk_size=3), h, w, ids, temperature=t)
        (logp.sum() + 0.5 * ent.sum()).backward()
        outs.append((logp, ent, h.grad, w.grad))
    ref = reference_stats(hidden @ weight.T, ids, temperature=t)
    torch.testing.assert_close(outs[0][0].detach(), ref["logprob"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outs[0][1].detach(), ref["entropy"], atol=1e-10, rtol=1e-10)
    assert outs[0][0].dtype == outs[0][1].dtype == torch.float64
    for a, b in zip(outs[0], outs[1]):  # verl's torch path rounds through fp32 internally
        torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=2e-6, rtol=1e-5)


def test_linear_cross_entropy_drop_in_matches_float64_and_verls_layout(patched):
    """verl's Triton fused LM head needs a GPU; the drop-in is checked against float64 with
    verl's output layout ([tokens]) and the call verl's model forwards make."""
    import verl.utils.kernel.linear_cross_entropy as lce

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(90, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 90, (2, 6), generator=gen)
    logp, ent = lce.linear_cross_entropy(hidden, weight, labels, 0.6, "none")
    ref = reference_stats(hidden @ weight.detach().T, labels, temperature=0.6)
    assert logp.shape == ent.shape == (12,)
    torch.testing.assert_close(logp.detach(), ref["logprob"].reshape(-1), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ent.detach(), ref["entropy"].reshape(-1), atol=1e-10, rtol=1e-10)
    (logp.sum() + ent.sum()).backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.distributed
def test_vocab_parallel_functions_on_real_gloo_ranks(tmp_path):
    """verl's Megatron vocab-parallel functions (with Megatron's tensor-parallel group on gloo)
    against the patched ones on 2 CPU ranks (checks in tests/integrations/verl_vocab_parallel_worker.py)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    worker = os.path.join(HERE, "verl_vocab_parallel_worker.py")
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 2000)
    )
    run_ranks([[sys.executable, worker, str(rank), "2"] for rank in range(2)], env=env)


# ------------------------------------------------------------------ CorR-PO estimator


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
    ev._register_estimator()
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
        batch = DataProto.from_dict(
            tensors={
                "token_level_rewards": data["token_level_rewards"],
                "response_mask": data["response_mask"],
                ev.ENTROPY_KEY: data["corrpo_entropy"],
                ev.MEASURE_KEY: data["corrpo_measure"],
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
        metrics = out.meta_info[ev.METRICS_KEY]
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


# ------------------------------------------------------------------ the trainer + engine hooks


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
    # Without corrpo_grpo the trainer method is verl's own (no measure requested).
    trainer.config.algorithm.adv_estimator = "grpo"
    ev.install_corrpo()
    try:
        old_plain, _ = ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, rollout_batch(vocab)[0])
    finally:
        ev.uninstall_corrpo()
    assert ev.MEASURE_KEY not in old_plain.batch.keys()
    torch.testing.assert_close(old_plain.batch["old_log_probs"], old.batch["old_log_probs"])


def test_hooks_refuse_fused_kernels_and_non_logit_measures():
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    micro_batch = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    tu.assign_non_tensor(micro_batch, **{ev.MEASURE_KEY: "nll_grad_norm"})
    fused_path = ev._engine_prepare_model_outputs(
        lambda *args, **kwargs: {}
    )  # never calls logprobs_from_logits
    with pytest.raises(RuntimeError, match="use_fused_kernels=False"):
        fused_path(None, None, {}, micro_batch)
    with pytest.raises(ValueError, match="not a logit statistic"):  # e.g. a parameter-gradient measure
        ev._logit_measure(SimpleNamespace(measure="param_grad_norm"))
    with pytest.raises(ValueError, match="not a per-token logit statistic"):
        with ev.capture_measure("param_grad_norm"):
            pass


def test_recipe_data_is_scored_by_verls_gsm8k_reward(tmp_path):
    """examples/verl/prepare_gsm8k.py writes what verl's own rule reward (openai/gsm8k) scores."""
    import importlib.util

    import pyarrow.parquet as pq
    from verl.utils.reward_score import default_compute_score

    spec = importlib.util.spec_from_file_location(
        "prepare_gsm8k", os.path.join(ROOT, "examples", "verl", "prepare_gsm8k.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--val", "8"]) == 0
    rows = pq.read_table(tmp_path / "test.parquet").to_pylist()
    assert len(rows) == 8 and pq.read_table(tmp_path / "train.parquet").num_rows > 1000
    for r in rows:
        truth = r["reward_model"]["ground_truth"]
        assert r["data_source"] == "openai/gsm8k" and r["prompt"][0]["role"] == "user"
        assert default_compute_score("openai/gsm8k", f"Step by step.\n#### {truth}", truth) == 1.0
        assert default_compute_score("openai/gsm8k", f"#### {truth}1", truth) == 0.0
    assert module.main(["--out", str(tmp_path), "--val", "0"]) == 2


RECIPE = os.path.join(ROOT, "examples", "verl", "run_corrpo_gsm8k.sh")


def _recipe(tmp_path, **env) -> subprocess.CompletedProcess:
    """The recipe with a fresh HOME (it must write nothing there when it refuses) and this
    interpreter as its python3."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA", "STEPS", "GPUS", "ROLLOUT")}
    base.update(HOME=str(home), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", RECIPE], capture_output=True, text=True, env=base, timeout=120)


def _assert_refused(done: subprocess.CompletedProcess, tmp_path, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_corrpo_gsm8k.sh: error: "), done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert list((tmp_path / "home").iterdir()) == []  # no Ray session, no caches


@pytest.fixture
def recipe_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "test.parquet"):
        (data / name).write_bytes(b"")
    return {"MODEL": str(model), "DATA": str(data)}


def test_recipe_refuses_a_missing_model_or_data_before_ray(tmp_path, recipe_inputs):
    _assert_refused(_recipe(tmp_path), tmp_path, "MODEL")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "MODEL": str(tmp_path / "nope")}), tmp_path,
                    "MODEL=", "nope", "no such folder")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "DATA": str(tmp_path / "nodata")}), tmp_path,
                    "nodata/train.parquet", "prepare_gsm8k.py")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, STEPS="0"), tmp_path, "STEPS")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, ARM="ppo"), tmp_path, "ARM", "corrpo_flipped")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, SEED="-1"), tmp_path, "SEED")


def test_recipe_arms_parse_as_corrpo_configs():
    """The recipe's corrpo_flipped arm (+algorithm.corrpo.phi=identity) is a valid CorR-PO config."""
    from omegaconf import OmegaConf

    from entropy_gpu.integrations.verl import corrpo_config_from

    for phi, sign in (("negate", -1.0), ("identity", 1.0)):
        algorithm = OmegaConf.create({"corrpo": {"coef": 0.1, "phi": phi, "measure": "nll_grad_norm"}})
        config = corrpo_config_from(algorithm)
        assert config.phi == phi and config.measure == "nll_grad_norm"
        from entropy_gpu.corrpo import corrpo_term

        term = corrpo_term(torch.tensor([0.5]), torch.tensor([True]), config)
        assert term.item() == sign * 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU refusal needs a machine without CUDA")
def test_recipe_refuses_without_a_gpu_before_ray(tmp_path, recipe_inputs):
    _assert_refused(_recipe(tmp_path, **recipe_inputs), tmp_path, "CUDA")
