"""The drop-ins of entropy_gpu.integrations.verl.dropin, patched into the real verl package, next to
verl's own functions on real ``DataProto`` batches, against float64 references: entropy, log-prob,
sum p^2, their gradients, the fused LM-head paths and Megatron's vocabulary-parallel functions."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# verl imports Megatron and Ray, which warn about optional accelerators on a CPU machine.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

verl = pytest.importorskip("verl", reason="verl is not installed (bash scripts/setup.sh dev installs it)")

import verl.utils.torch_functional as verl_F  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402

from tests.helpers import run_ranks  # noqa: E402
from tests.integrations.verl.common import ORIGINALS  # noqa: E402
from tests.reference import reference_stats  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def logits_batch(b=3, t=5, v=257, dtype=torch.float64, scale=3.0, seed=0) -> DataProto:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * scale
    logits[0, 0, 7] = 40.0  # a near-certain token: log p ~ -1e-16
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, 0] = 7
    return DataProto.from_dict(tensors={"logits": logits.to(dtype), "responses": labels})


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
    against the patched ones on 2 CPU ranks (checks in tests/integrations/verl/vocab_parallel_worker.py)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    worker = os.path.join(HERE, "vocab_parallel_worker.py")
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 2000)
    )
    run_ranks([[sys.executable, worker, str(rank), "2"] for rank in range(2)], env=env)
