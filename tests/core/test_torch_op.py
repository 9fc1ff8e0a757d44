"""The entry points behave like torch ops: independent outputs that can be edited in
place, torch.library registration (fake implementations, autograd), torch.compile with
fullgraph=True, and the autocast policy of docs/numerics.md."""

from __future__ import annotations

import pytest
import torch

import entropy_gpu
from entropy_gpu import LINEAR_STAT_NAMES, STAT_NAMES, entropy_and_logprobs, linear_token_stats, token_stats
from entropy_gpu._autograd import token_stats_backward_op, token_stats_op
from entropy_gpu.linear import linear_token_stats_backward_op, linear_token_stats_op
from tests.helpers import random_logits
from tests.reference import reference_logprob_entropy

BACKENDS = ("torch", "triton")
# Some statistics on and some off, so the op's positions for entropy/logprob are exercised.
SOME_STATS = [name in ("logsumexp", "entropy", "logprob", "nll_grad_norm", "entropy_grad_norm",
                       "entropy_change") for name in STAT_NAMES]


def edit_in_place(x: torch.Tensor) -> torch.Tensor:
    """What users do to these outputs (TRL's kernel test does the first): one entry
    overwritten, a mask filled, a scale applied, all in place."""
    x[0, 2] = 0.0
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    mask[:, 1] = True
    x.masked_fill_(mask, 0.0)
    x.mul_(torch.linspace(0.5, 2.0, x.shape[-1], device=x.device, dtype=x.dtype))
    return x


def reference_edited_grad(logits, targets, use_entropy, use_logprob, temperature=1.0):
    """d(sum of the edited entropy and/or logprob)/d logits by autograd in float64: the same
    in-place edits applied to the reference (a clone, which autograd allows)."""
    z = logits.detach().cpu().double().requires_grad_(True)
    ent, lp = reference_logprob_entropy(z, targets.cpu() if targets is not None else None, temperature)
    loss = 0.0
    if use_entropy:
        loss = loss + edit_in_place(ent.clone()).sum()
    if use_logprob:
        loss = loss + edit_in_place(lp.clone()).sum()
    (g,) = torch.autograd.grad(loss, z)
    return g


def _token_stats_pair(z, t, **kw):
    out = token_stats(z, t, stats="all", **kw)
    return out.entropy, out.logprob


ENTRY_POINTS = {
    "token_stats": _token_stats_pair,
    "entropy": lambda z, t, **kw: (entropy_gpu.entropy(z, **kw), None),
    "logprobs": lambda z, t, **kw: (None, entropy_gpu.logprobs(z, t, **kw)),
    "entropy_and_logprobs": lambda z, t, **kw: entropy_and_logprobs(z, t, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_every_differentiable_output_can_be_edited_in_place_then_backward(entry, backend, inplace_backward):
    raw = random_logits((3, 4, 37), scale=2.0).requires_grad_(True)
    targets = torch.randint(0, 37, (3, 4), device=raw.device)
    targets[1, 3] = -100
    logits = raw * 1.0 if inplace_backward else raw  # the in-place backward needs a non-leaf
    ent, lp = ENTRY_POINTS[entry](logits, targets, backend=backend, inplace_backward=inplace_backward)
    loss = 0.0
    for field in (ent, lp):
        if field is not None:
            assert field.requires_grad
            loss = loss + edit_in_place(field).sum()
    loss.backward()
    want = reference_edited_grad(raw, targets, ent is not None, lp is not None)
    torch.testing.assert_close(raw.grad.double().cpu(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fields_are_independent_tensors(backend):
    """Editing one field changes no other field (they are not views of one buffer)."""
    logits = random_logits((2, 5, 19)).requires_grad_(True)
    targets = torch.randint(0, 19, (2, 5), device=logits.device)
    out = token_stats(logits, targets, stats="all", backend=backend)
    again = token_stats(logits.detach(), targets, stats="all", backend=backend)
    fields = [f for f in out if f is not None]
    assert len({f.untyped_storage().data_ptr() for f in fields}) == len(fields)
    out.logsumexp.zero_()  # not differentiable: no autograd involved
    out.entropy.fill_(7.0)
    for name in ("logprob", "sum_sq_probs", "nll_grad_norm", "varentropy", "entropy_grad_norm"):
        torch.testing.assert_close(getattr(out, name), getattr(again, name), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_stats_outputs_can_be_edited_in_place_then_backward(backend):
    hidden = random_logits((2, 4, 16)).requires_grad_(True)
    weight = random_logits((37, 16), scale=0.5).requires_grad_(True)
    bias = random_logits((37,)).requires_grad_(True)
    targets = torch.randint(0, 37, (2, 4), device=hidden.device)
    out = linear_token_stats(hidden, weight, targets, bias, stats="all", backend=backend)
    (edit_in_place(out.entropy).sum() + edit_in_place(out.logprob).sum()).backward()

    h, w, b = (x.detach().cpu().double().requires_grad_(True) for x in (hidden, weight, bias))
    ent, lp = reference_logprob_entropy(h @ w.T + b, targets.cpu())
    (edit_in_place(ent.clone()).sum() + edit_in_place(lp.clone()).sum()).backward()
    for got, want in ((hidden, h), (weight, w), (bias, b)):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=2e-5, rtol=1e-4)


def test_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of every
    op agree with the real implementations (torch.library.opcheck)."""
    opcheck = torch.library.opcheck
    logits = torch.randn(2, 3, 17, requires_grad=True)
    targets = torch.randint(0, 17, (2, 3))
    targets[0, 0] = -100
    entropy_only = [name == "entropy" for name in STAT_NAMES]
    for backend in BACKENDS:
        opcheck(token_stats_op, (logits, targets, 1.3, -100, SOME_STATS, backend, True, False))
    opcheck(token_stats_op, (logits, None, 1.0, -100, entropy_only, "torch", True, False))
    opcheck(token_stats_op, (logits.detach(), targets, 1.0, -100, SOME_STATS, "torch", False, False))
    everything = [True] * len(STAT_NAMES)
    state = token_stats_op(logits.detach(), targets, 1.0, -100, everything, "torch", True, False)[-1]
    grads = torch.randn(2, 3), torch.randn(2, 3)
    opcheck(token_stats_backward_op, (logits.detach(), targets, state, *grads, 1.0, -100, "torch"))

    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(17, 8, requires_grad=True)
    bias = torch.randn(17, requires_grad=True)
    flat = targets.reshape(-1)
    want = [name in ("logsumexp", "entropy", "logprob", "hidden_norm", "lm_head_grad_norm")
            for name in LINEAR_STAT_NAMES]
    for b in (None, bias):
        opcheck(linear_token_stats_op, (hidden, weight, b, flat, 0.8, -100, want, "torch", [4, 5]))
    detached = hidden.detach(), weight.detach(), bias.detach()
    state = linear_token_stats_op(*detached, flat, 1.0, -100, want, "torch", [4, 5])[-1]
    opcheck(linear_token_stats_backward_op,
            (*detached, flat, state, torch.randn(6), None, 1.0, -100, "torch", [4, 5], [True, True, True]))


# torch.compile: few compiles, tiny shapes, dynamic=False (compiling is slow on 2 cores).


def policy_loss(raw, targets, old_logprob, advantages, mask, backend):
    """A GRPO-style clipped policy loss with an entropy bonus and a detached diagnostic."""
    logits = raw * 1.0
    ent, lp = entropy_and_logprobs(logits, targets, temperature=0.7, backend=backend, inplace_backward=True)
    ratio = torch.exp(lp - old_logprob)
    pg = -torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
    diag = token_stats(raw, targets, stats=("nll_grad_norm", "varentropy"), backend=backend)
    loss = ((pg - 0.01 * ent) * mask).sum() / mask.sum()
    return loss, diag.nll_grad_norm, diag.varentropy


def check_compiled_policy_loss(device, dtype, backend):
    raw = random_logits((2, 3, 37), dtype=dtype, device=device).requires_grad_(True)
    targets = torch.randint(0, 37, (2, 3), device=device)
    targets[0, 0] = -100
    old = torch.randn(2, 3, device=device) - 3.0
    adv = torch.randn(2, 3, device=device)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], device=device)
    compiled = torch.compile(policy_loss, fullgraph=True, dynamic=False)
    got = compiled(raw, targets, old, adv, mask, backend)
    (got_grad,) = torch.autograd.grad(got[0], raw)
    want = policy_loss(raw, targets, old, adv, mask, backend)
    (want_grad,) = torch.autograd.grad(want[0], raw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    # bf16 gradients: a 1-ulp fp32 difference upstream may round to the neighbouring bf16.
    grad_tol = {} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(got_grad, want_grad, **grad_tol)
    assert raw.grad is None and got_grad.dtype == dtype

    # Range check under compile: no host sync, the bad row is NaN (no error, same graph).
    bad = targets.clone()
    bad[1, 2] = 37 + 5
    loss, nll, _ = compiled(raw, bad, old, adv, mask, backend)
    assert torch.isnan(loss) and torch.isnan(nll[1, 2]) and not torch.isnan(nll[1, :2]).any()
    with pytest.raises(ValueError, match="outside"):  # eager still raises
        policy_loss(raw, bad, old, adv, mask, backend)


def test_compiled_policy_loss_matches_eager_on_the_torch_backend():
    torch._dynamo.reset()
    check_compiled_policy_loss(torch.device("cpu"), torch.float32, "torch")


def test_compiled_policy_loss_matches_eager_on_the_triton_path():
    """The Triton kernels are opaque to the compiler (custom ops): here they run through
    the interpreter; on a GPU, test_compile_on_cuda runs them compiled, and
    tests/kernels/test_compile_cuda.py compiles them for sm_80/sm_90 ahead of time."""
    torch._dynamo.reset()
    check_compiled_policy_loss(torch.device("cpu"), torch.float32, "triton")


def lm_head_loss(hidden, weight, bias, targets):
    out = linear_token_stats(hidden, weight, targets, bias, stats=("entropy", "logprob", "lm_head_grad_norm"),
                             tile=(4, 16), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast casts trace too
        low = linear_token_stats(hidden, weight, targets, bias, stats=("logprob",), backend="torch")
    return (-out.logprob + 0.1 * out.entropy - 0.5 * low.logprob).sum(), out.lm_head_grad_norm


def test_compiled_linear_token_stats_matches_eager():
    torch._dynamo.reset()
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    targets = torch.randint(0, 37, (2, 3))
    compiled = torch.compile(lm_head_loss, fullgraph=True, dynamic=False)
    got = compiled(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got[0], (hidden, weight, bias))
    want = lm_head_loss(hidden, weight, bias, targets)
    want_grads = torch.autograd.grad(want[0], (hidden, weight, bias))
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_loss_with_dynamic_shapes_matches_eager():
    """One graph for several batch sizes (symbolic shapes and temperature)."""
    torch._dynamo.reset()

    def loss(logits, targets, hidden, weight, temperature):
        ent, lp = entropy_and_logprobs(logits, targets, temperature=temperature)
        lm = linear_token_stats(hidden, weight, targets, temperature=temperature, backend="torch")
        return (ent + lp).sum() + lm.logprob.sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for batch, temperature in ((2, 0.9), (5, 1.1)):
        inputs = (torch.randn(batch, 3, 30, requires_grad=True), torch.randint(0, 30, (batch, 3)),
                  torch.randn(batch, 3, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True))
        differentiable = (inputs[0], inputs[2], inputs[3])
        got = compiled(*inputs, temperature)
        got_grads = torch.autograd.grad(got, differentiable)
        want = loss(*inputs, temperature)
        want_grads = torch.autograd.grad(want, differentiable)
        for g, w in zip((got,) + got_grads, (want,) + want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_cuda_graph_traces_to_the_triton_ops_without_a_gpu():
    """What torch.compile sees for CUDA inputs, traced with fake CUDA tensors (no GPU
    needed): the ops with backend 'triton', fake outputs of the right shape, dtype and
    device, forward and backward ops alike. (The kernels themselves are compiled for
    sm_80/sm_90 in tests/kernels/test_compile_cuda.py.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    pytest.importorskip("triton")

    def loss(logits, targets, hidden, weight):
        # The range check is a host sync, which fake tensors cannot do; compile skips it.
        out = token_stats(logits, targets, stats=("entropy", "logprob"), check_targets_range=False)
        ent, lp = out.entropy, out.logprob
        lm = linear_token_stats(hidden, weight, targets, check_targets_range=False)
        return (lp - 0.01 * ent).sum() + lm.logprob.sum()

    with FakeTensorMode():
        logits = torch.empty(2, 3, 40, device="cuda", dtype=torch.bfloat16)
        targets = torch.zeros(2, 3, dtype=torch.long, device="cuda")
        hidden = torch.empty(2, 3, 16, device="cuda", dtype=torch.bfloat16)
        weight = torch.empty(40, 16, device="cuda", dtype=torch.bfloat16)
        graph = make_fx(loss)(logits, targets, hidden, weight).graph
        ops = {node.target: node for node in graph.nodes if node.op == "call_function"}
        for op in (torch.ops.entropy_gpu.token_stats, torch.ops.entropy_gpu.linear_token_stats):
            node = ops[op.default]
            assert "triton" in node.args, node.args
            outputs = node.meta["val"]
            assert all(o.device.type == "cuda" and o.dtype == torch.float32 for o in outputs)
            assert tuple(outputs[0].shape) in ((2, 3), (6,))
        state = token_stats_op(logits, targets, 1.0, -100, [False, True, True] + [False] * 4, "triton", True,
                               False)[-1]
        grad = token_stats_backward_op(logits, targets, state, None, torch.empty(2, 3, device="cuda"), 1.0,
                                       -100, "triton")
        assert grad.shape == logits.shape and grad.dtype == torch.bfloat16 and grad.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled)")
def test_compile_on_cuda():
    torch._dynamo.reset()
    check_compiled_policy_loss(torch.device("cuda"), torch.bfloat16, "auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = torch.randn(6, 64, device="cuda", requires_grad=True)
        weight = torch.randn(100, 64, device="cuda", requires_grad=True)
        targets = torch.randint(0, 100, (6,), device="cuda")
        got = linear_token_stats(hidden, weight, targets)
        want = linear_token_stats(hidden.bfloat16(), weight.bfloat16(), targets)
    torch.testing.assert_close(got.logprob, want.logprob, rtol=0, atol=0)


# Autocast (docs/numerics.md, "Behaving like a torch op").


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_ignores_autocast(backend, dtype):
    """The statistics are computed in fp32 from the logits as given, inside autocast or
    not: the same numbers, fp32 outputs, gradients in the logits' dtype."""
    logits = random_logits((2, 3, 29), dtype=dtype, scale=3.0).requires_grad_(True)
    targets = torch.randint(0, 29, (2, 3), device=logits.device)
    grad_out = torch.randn(2, 3, device=logits.device)
    results = []
    for enabled in (False, True):
        with torch.autocast(logits.device.type, dtype=torch.bfloat16, enabled=enabled):
            out = token_stats(logits, targets, stats="all", backend=backend)
            (grad,) = torch.autograd.grad(((out.entropy + out.logprob) * grad_out).sum(), logits)
        results.append((out, grad))
    (plain, plain_grad), (autocast, autocast_grad) = results
    for name in plain._fields:
        assert getattr(autocast, name).dtype == torch.float32
        torch.testing.assert_close(getattr(autocast, name), getattr(plain, name), rtol=0, atol=0,
                                   equal_nan=True)
    assert autocast_grad.dtype == dtype
    torch.testing.assert_close(autocast_grad, plain_grad, rtol=0, atol=0)


def test_token_stats_with_correlation_ignores_autocast():
    logits = random_logits((3, 6, 23), dtype=torch.bfloat16, scale=2.0)
    targets = torch.randint(0, 23, (3, 6), device=logits.device)
    with torch.autocast(logits.device.type, dtype=torch.bfloat16):
        stats, corr = entropy_gpu.token_stats_with_correlation(logits, targets)
    want_stats, want_corr = entropy_gpu.token_stats_with_correlation(logits, targets)
    for got, want in ((stats, want_stats), (corr, want_corr)):
        for g, w in zip(got, want):
            if g is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_stats_under_autocast_runs_the_lm_head_like_nn_linear(backend):
    """Under autocast the LM head's inputs are cast to the autocast dtype (as nn.Linear's
    would be), the logits accumulate in fp32, and fp32 parameters get fp32 gradients."""
    hidden = random_logits((2, 3, 16)).requires_grad_(True)
    weight = random_logits((41, 16), scale=0.5).requires_grad_(True)
    bias = random_logits((41,)).requires_grad_(True)
    targets = torch.randint(0, 41, (2, 3), device=hidden.device)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        got = linear_token_stats(hidden, weight, targets, bias, backend=backend)
        got_grads = torch.autograd.grad((got.entropy + got.logprob).sum(), (hidden, weight, bias))
        # Mixed dtypes, as autocast produces them (bf16 activations, fp32 master weights).
        mixed = linear_token_stats(hidden.bfloat16(), weight, targets, bias, backend=backend)
    low = [x.detach().bfloat16().requires_grad_(True) for x in (hidden, weight, bias)]
    want = linear_token_stats(low[0], low[1], targets, low[2], backend=backend)
    want_grads = torch.autograd.grad((want.entropy + want.logprob).sum(), low)
    for name in ("logsumexp", "entropy", "logprob", "nll_grad_norm"):
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(mixed, name), getattr(want, name), rtol=0, atol=0)
    for g, w, x in zip(got_grads, want_grads, (hidden, weight, bias)):
        assert g.dtype == x.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)
    # The bf16 matmul is a real change of precision: the fp32 result differs.
    full = linear_token_stats(hidden, weight, targets, bias, backend=backend)
    assert not torch.equal(full.logprob, got.logprob)


def test_autocast_leaves_float64_alone():
    hidden, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_stats(hidden, weight)
    assert got.entropy.dtype == torch.float64
    torch.testing.assert_close(got.entropy, linear_token_stats(hidden, weight).entropy, rtol=0, atol=0)
