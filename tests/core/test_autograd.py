"""Autograd of token_stats: logprob and entropy w.r.t. the logits on both backends,
against gradcheck and autograd through a float64 reference; NaN semantics; the
in-place backward contract; non-differentiable fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import entropy_gpu
from entropy_gpu import STAT_NAMES, token_stats
from entropy_gpu._rows import as_rows
from entropy_gpu._torch_backend import token_stats_backward_torch
from entropy_gpu.backend import token_stats_buffer
from entropy_gpu.kernels.stat_layout import SAVED_LOG_S0, SAVED_ROW_MAX
from entropy_gpu.kernels.token_stats_backward import launch_token_stats_backward
from entropy_gpu.moments import target_masks
from tests.helpers import TEST_DEVICE, randint, random_logits
from tests.reference import reference_grad

BACKENDS = ["torch", "triton"]
# Gradients come back in the logits' dtype: the bound is that dtype's rounding.
GRAD_TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-6, 8e-3), torch.float16: (2e-6, 1e-3),
            torch.float64: (1e-12, 1e-10)}


def grads_of(logits, targets, grad_entropy, grad_logprob, **kwargs):
    """Gradient w.r.t. ``logits`` of sum(grad_entropy * H) + sum(grad_logprob * logprob)."""
    z = logits.detach().clone().requires_grad_(True)
    stats = [s for s, g in (("entropy", grad_entropy), ("logprob", grad_logprob)) if g is not None]
    out = token_stats(z, targets, stats=stats, **kwargs)
    loss = sum((getattr(out, s) * g).sum() for s, g in (("entropy", grad_entropy), ("logprob", grad_logprob))
               if g is not None)
    (g,) = torch.autograd.grad(loss, z)
    return g


def assert_grad_close(got, want, dtype, context=""):
    atol, rtol = GRAD_TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape, context
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{context}: {m}")


def test_gradcheck_float64_torch_backend():
    z = random_logits((4, 23), torch.float64, 3.0)
    z[1, 5] = z[2, :3] = float("-inf")  # masked vocabulary
    targets = torch.tensor([3, 7, -100, 22], device=TEST_DEVICE)  # finite logprobs (gradcheck needs them)
    for temperature in (0.6, 1.0):
        def f(x, temperature=temperature):
            out = token_stats(x, targets, temperature=temperature,
                              stats=("entropy", "logprob", "nll_grad_norm"), backend="torch")
            return out.entropy, out.logprob
        assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda x: entropy_gpu.entropy(x, backend="torch"),
                                    (random_logits((3, 2, 9), torch.float64).requires_grad_(True),))
    strided = random_logits((6, 40), torch.float64, 2.0)[::2, 1::3].requires_grad_(True)
    strided_targets = randint(13, (3,))
    assert torch.autograd.gradcheck(
        lambda x: entropy_gpu.logprobs(x, strided_targets, backend="torch"), (strided,))
    # Second derivatives are not implemented: asking for them raises instead of being wrong.
    x = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(entropy_gpu.entropy(x, backend="torch").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grads_match_float64_autograd(backend, dtype):
    cases = [((5, 7), 3.0, 1.0), ((3, 1000), 10.0, 0.7), ((2, 3, 257), 40.0, 2.0), ((2, 1), 1.0, 1.0)]
    if backend == "torch":
        cases += [((4, 32000), 5.0, 1.0), ((3, 4099), 1e4 if dtype != torch.float16 else 1e3, 0.3)]
    for shape, scale, temperature in cases:
        logits = random_logits(shape, dtype, scale)
        targets = randint(shape[-1], shape[:-1])
        g_ent, g_lp = random_logits(shape[:-1]), random_logits(shape[:-1])
        combos = ((g_ent, g_lp), (g_ent, None), (None, g_lp)) if shape[-1] <= 1000 else ((g_ent, g_lp),)
        for ge, gl in combos:
            got = grads_of(logits, targets, ge, gl, temperature=temperature, backend=backend)
            want = reference_grad(logits, targets, ge, gl, temperature)
            assert_grad_close(got, want, dtype, f"{backend} {shape} {dtype} scale={scale} t={temperature} "
                                                f"entropy={ge is not None} logprob={gl is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_of_strided_masked_and_ignored_rows(backend):
    base = random_logits((3, 7, 2 * 301), torch.bfloat16, 8.0)
    cases = {
        "shifted [:, :-1]": base[:, :-1, :301],
        "every other column": base[..., ::2],
        "transposed": random_logits((301, 6), torch.float32, 8.0).t(),
        "4-d permuted": random_logits((2, 3, 2, 301), torch.float32, 8.0).permute(2, 0, 1, 3),
    }
    masked = random_logits((6, 301), torch.float32, 6.0)
    masked[torch.rand(6, 301, device=TEST_DEVICE) < 0.7] = float("-inf")
    masked[:, 0] = 1.0
    cases["masked vocabulary"] = masked
    for label, logits in cases.items():
        targets = randint(301, logits.shape[:-1])
        targets.view(-1)[::3] = -100
        g_ent, g_lp = random_logits(logits.shape[:-1]), random_logits(logits.shape[:-1])
        got = grads_of(logits, targets, g_ent, g_lp, temperature=0.8, backend=backend)
        want = reference_grad(logits, targets, g_ent, g_lp, 0.8)
        assert_grad_close(got, want, logits.dtype, label)
        if label == "masked vocabulary":  # no gradient into masked entries, but the target's one-hot
            columns = targets.clamp(min=0)[:, None]
            is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, columns, True)
            is_target &= (targets != -100)[:, None]
            assert (got[(logits == float("-inf")) & ~is_target] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_semantics_of_the_gradient(backend):
    logits = random_logits((6, 64), torch.float32, 3.0)
    logits[1] = float("-inf")         # all masked: NaN statistics
    logits[2, 7] = float("inf")
    logits[3, 9] = float("nan")
    targets = torch.tensor([2, 2, 2, 2, -100, 5], device=TEST_DEVICE)
    g = torch.ones(6, device=TEST_DEVICE)
    got = grads_of(logits, targets, g, g, backend=backend)
    for row in (1, 2, 3):
        assert torch.isnan(got[row]).all(), row
    want = reference_grad(logits[[0, 4, 5]], targets[[0, 4, 5]], g[:3], g[:3])
    assert_grad_close(got[[0, 4, 5]], want, torch.float32, "finite rows next to NaN rows")
    # Unchecked out-of-range targets: NaN logprob, so a logprob gradient is NaN there...
    bad = torch.tensor([0, 64, -3, 1, 2, 3], device=TEST_DEVICE)
    got = grads_of(logits[[0, 0, 0, 4, 5, 5]], bad, None, g, backend=backend, check_targets_range=False)
    assert torch.isnan(got[1:3]).all() and torch.isfinite(got[[0, 3, 4, 5]]).all()
    # ... while the entropy gradient of those rows is unaffected.
    got = grads_of(logits[[0, 0]], bad[:2], g[:2], None, backend=backend, check_targets_range=False)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_have_no_logprob_gradient(backend):
    logits = random_logits((4, 50), torch.float32, 2.0)
    ones = torch.ones(4, device=TEST_DEVICE)
    targets = torch.tensor([-100, 3, -100, 7], device=TEST_DEVICE)
    got = grads_of(logits, targets, None, ones, backend=backend)
    assert (got[[0, 2]] == 0).all() and (got[[1, 3]] != 0).any()
    got = grads_of(logits, torch.tensor([3, 3, 1, 2], device=TEST_DEVICE), None, ones, backend=backend,
                   ignore_index=3)
    assert (got[:2] == 0).all() and (got[2:] != 0).any()


def test_only_entropy_and_logprob_are_differentiable():
    z = random_logits((3, 40)).requires_grad_(True)
    out = token_stats(z, randint(40, (3,)), stats="all")
    for name in STAT_NAMES:
        assert getattr(out, name).requires_grad == (name in ("entropy", "logprob")), name
    with pytest.raises(RuntimeError):  # no silent zero gradient through a marked field
        out.nll_grad_norm.sum().backward()
    with pytest.raises(RuntimeError, match="does not require grad"):  # documented as not differentiable
        torch.autograd.grad(out.entropy_change.sum(), z)
    with torch.no_grad():
        assert not token_stats(z).entropy.requires_grad
    assert not token_stats(z.detach()).entropy.requires_grad


def test_wrappers_are_differentiable():
    logits = random_logits((3, 4, 77), torch.float32, 3.0)
    targets = randint(77, (3, 4))
    ge, gl = random_logits((3, 4)), random_logits((3, 4))
    want = reference_grad(logits, targets, ge, gl, 0.8)
    z = logits.clone().requires_grad_(True)
    ent, lp = entropy_gpu.entropy_and_logprobs(z, targets, temperature=0.8)
    (g,) = torch.autograd.grad((ent * ge).sum() + (lp * gl).sum(), z)
    assert_grad_close(g, want, torch.float32, "entropy_and_logprobs")
    z = logits.clone().requires_grad_(True)
    loss = ((entropy_gpu.entropy(z, temperature=0.8) * ge).sum()
            + (entropy_gpu.logprobs(z, targets, temperature=0.8) * gl).sum())
    (g,) = torch.autograd.grad(loss, z)
    assert_grad_close(g, want, torch.float32, "entropy + logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_matches_and_reuses_the_logits_buffer(backend, dtype):
    hidden = random_logits((2, 5, 16), dtype).requires_grad_(True)
    weight = random_logits((301, 16), dtype).requires_grad_(True)
    targets = randint(301, (2, 5))
    results = []
    for inplace in (False, True):
        logits = hidden @ weight.t()
        ent, lp = entropy_gpu.entropy_and_logprobs(logits, targets, backend=backend, inplace_backward=inplace)
        seen = {}
        logits.register_hook(lambda g, seen=seen: seen.setdefault("grad", g))
        (ent.sum() - 2 * lp.sum()).backward()
        assert (seen["grad"].data_ptr() == logits.data_ptr()) == inplace
        if inplace:
            assert torch.equal(logits, seen["grad"])  # the buffer now holds the gradient
        results.append((seen["grad"].clone(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_inplace_backward_contract_is_enforced():
    z = random_logits((4, 30)).requires_grad_(True)
    with pytest.raises(ValueError, match="leaf"):
        entropy_gpu.entropy(z, inplace_backward=True)
    with pytest.raises(ValueError, match="stride-0"):
        entropy_gpu.entropy((z[:1] * 2).expand(4, 30), inplace_backward=True)
    with pytest.raises(ValueError, match="contiguous"):
        logits = (random_logits((2, 3, 4, 30)).requires_grad_(True) * 1).permute(1, 0, 2, 3)[:, :, ::2]
        entropy_gpu.entropy(logits, inplace_backward=True)
    # A node that saved the same logits for its own backward fails loudly, not silently.
    x = random_logits((4, 30)).requires_grad_(True)
    logits = torch.tanh(x)  # tanh saves its output
    h = entropy_gpu.entropy(logits, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()
    # A second backward through the same call cannot run on a consumed buffer.
    logits = x * 3
    h = entropy_gpu.entropy(logits, inplace_backward=True)
    h.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already holds the gradient"):
        h.sum().backward()
    # Without a gradient to compute, the flag changes nothing.
    with torch.no_grad():
        entropy_gpu.entropy(z, inplace_backward=True)


@pytest.mark.parametrize("vocab,block_v,num_splits", [(1, 16, 1), (16, 16, 1), (1000, 64, 3), (2053, 1024, 2),
                                                      (2053, 256, 5)])
def test_triton_backward_kernel_matches_torch_twin(vocab, block_v, num_splits):
    from entropy_gpu.moments import backward_row_params

    logits = random_logits((2, 3, vocab), torch.bfloat16, 20.0)
    logits[0, 0, : vocab // 2] = float("-inf")
    logits[1, 2] = float("-inf")  # an all-masked row
    targets = randint(vocab, (2, 3))
    targets[0, 1] = -100
    rows = as_rows(logits)
    buf = token_stats_buffer(rows, targets.reshape(-1), inv_temperature=1 / 0.7, ignore_index=-100,
                             want=tuple(n in ("entropy", "logprob") for n in STAT_NAMES), backend="torch",
                             save_state=True)
    t, in_range, ignored = target_masks(targets, vocab, -100)
    params = backward_row_params(buf[SAVED_ROW_MAX], buf[SAVED_LOG_S0], buf[1], random_logits(6),
                                 random_logits(6), in_range, ignored)
    cols = torch.where(in_range, t, -1)
    want = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    token_stats_backward_torch(rows, want, params, cols, inv_temperature=1 / 0.7)
    got = torch.full(rows.shape, float("nan"), dtype=torch.float32, device=logits.device)
    launch_token_stats_backward(rows, got, params, cols, inv_temperature=1 / 0.7, block_v=block_v,
                                num_splits=num_splits)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
    got = got.view(2, 3, vocab)
    assert torch.isnan(got[1, 2]).all() and torch.isfinite(got[:, :2]).all()
    # In place, through a strided view: the same values, nothing outside the view touched.
    big = torch.full((2, 3, vocab + 5), 7.0, device=logits.device)
    view = big[..., 2:vocab + 2]
    view.copy_(logits.float())
    launch_token_stats_backward(view, view, params, cols, inv_temperature=1 / 0.7, block_v=block_v,
                                num_splits=num_splits)
    torch.testing.assert_close(view, want.view(2, 3, vocab), atol=1e-6, rtol=1e-5, equal_nan=True)
    assert (big[..., :2] == 7).all() and (big[..., vocab + 2:] == 7).all()


finite = st.floats(min_value=-80, max_value=80, allow_nan=False, width=32)


@settings(max_examples=30)
@given(data=st.data())
def test_gradient_rows_sum_to_zero_and_match_reference(data):
    """Shift invariance: adding c to a row changes neither H nor log p_y, so every
    gradient row sums to 0; and the values agree with float64 autograd."""
    vocab = data.draw(st.integers(1, 120))
    rows = data.draw(st.integers(1, 3))
    logits = torch.from_numpy(data.draw(arrays(np.float32, (rows, vocab), elements=finite))).to(TEST_DEVICE)
    targets = torch.from_numpy(data.draw(arrays(np.int64, (rows,), elements=st.integers(0, vocab - 1))))
    targets = targets.to(TEST_DEVICE)
    temperature = data.draw(st.floats(0.25, 4.0))
    ge, gl = random_logits(rows), random_logits(rows)
    got = grads_of(logits, targets, ge, gl, temperature=temperature, backend="torch")
    want = reference_grad(logits, targets, ge, gl, temperature)
    assert_grad_close(got, want, torch.float32, f"V={vocab} t={temperature}")
    scale = (ge.abs() + gl.abs()).double() / temperature
    assert (got.double().sum(-1).abs() <= 1e-5 * (1 + scale * vocab)).all()
