"""token_stats against a float64 reference: shapes, dtypes, scales, temperatures,
strides, ignore_index and special values, on both backends."""

from __future__ import annotations

import math

import pytest
import torch

import entropy_gpu
from entropy_gpu import STAT_NAMES, token_stats
from entropy_gpu._rows import as_rows
from tests.helpers import TEST_DEVICE, assert_matches, randint, random_logits
from tests.reference import (
    entropy_after_logit_step,
    reference_entropy_change,
    reference_entropy_grad,
    reference_stats,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,rows", [(1, 5), (7, 9), (1000, 16), (32000, 8), (151936, 3), (262144, 2)])
def test_torch_backend_matches_reference(vocab, rows, dtype):
    for scale, temperature in [(1.0, 1.0), (30.0, 0.3), (1e4 if dtype != torch.float16 else 1e3, 2.0)]:
        logits = random_logits((rows, vocab), dtype, scale)
        targets = randint(vocab, (rows,))
        out = token_stats(logits, targets, temperature=temperature, stats="all", backend="torch")
        ref = reference_stats(logits, targets, temperature)
        assert_matches(out, ref, context=f"V={vocab} {dtype} scale={scale} t={temperature}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,rows", [(1, 3), (7, 5), (1000, 6), (4099, 4)])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_triton_kernel_matches_reference(vocab, rows, dtype, temperature):
    scale = 50.0 if dtype != torch.float16 else 10.0
    logits = random_logits((rows, vocab), dtype, scale)
    targets = randint(vocab, (rows,))
    out = token_stats(logits, targets, temperature=temperature, stats="all", backend="triton")
    assert_matches(out, reference_stats(logits, targets, temperature), context=f"V={vocab} {dtype}")


def test_triton_large_vocab_few_rows():
    logits = random_logits((2, 262144), torch.bfloat16, 20.0)
    targets = torch.tensor([5, 262143], device=TEST_DEVICE)
    out = token_stats(logits, targets, stats="all", backend="triton")
    assert_matches(out, reference_stats(logits, targets))


@pytest.mark.parametrize("stats", [("entropy",), ("logprob",), ("nll_grad_norm", "sum_sq_probs"),
                                   ("varentropy", "logsumexp"), ("entropy_grad_norm",), "all"])
def test_requested_subset_only(stats):
    logits = random_logits((4, 300), torch.float32, 5.0)
    targets = randint(300, (4,))
    ref = reference_stats(logits, targets)
    for backend in BACKENDS:
        out = token_stats(logits, targets, stats=stats, backend=backend)
        names = STAT_NAMES if stats == "all" else stats
        for name in STAT_NAMES:
            assert (getattr(out, name) is None) == (name not in names), (name, backend)
        assert_matches(out, ref, names=names, context=backend)


def test_default_stats_depend_on_targets():
    logits = random_logits((3, 50))
    out = token_stats(logits)
    assert out.entropy is not None and out.logsumexp is not None and out.logprob is None
    out = token_stats(logits, torch.zeros(3, dtype=torch.long, device=TEST_DEVICE))
    assert out.logprob is not None and out.nll_grad_norm is not None and out.varentropy is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_and_shape(backend):
    for dtype in DTYPES + [torch.float64]:
        logits = random_logits((2, 3, 4, 40), dtype)
        out = token_stats(logits, randint(40, (2, 3, 4)), stats="all", backend=backend)
        for name in STAT_NAMES:
            value = getattr(out, name)
            assert value.shape == (2, 3, 4)
            assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_logits_are_computed_in_float64(backend):
    logits = random_logits((4, 257), torch.float64, 3.0)
    targets = randint(257, (4,))
    out = token_stats(logits, targets, stats="all", backend=backend)
    ref = reference_stats(logits, targets)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(out, name), ref[name], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_3d_inputs(backend):
    base = random_logits((3, 6, 2 * 301), torch.bfloat16, 8.0)
    cases = {
        "shifted [:, :-1]": base[:, :-1, :301],
        "every other column": base[..., ::2],
        "transposed": random_logits((301, 10), torch.float32, 8.0).t(),
        "4-d permuted": random_logits((2, 3, 4, 301), torch.float32, 8.0).permute(2, 0, 1, 3),
        "expanded row": random_logits((1, 301), torch.float32, 8.0).expand(5, 301),
    }
    for label, logits in cases.items():
        targets = randint(logits.shape[-1], logits.shape[:-1])
        out = token_stats(logits, targets, stats="all", backend=backend, temperature=0.7)
        assert_matches(out, reference_stats(logits, targets, 0.7), context=label)


def test_shifted_slice_is_not_copied():
    logits = torch.randn(3, 6, 301)
    rows = as_rows(logits[:, :-1])
    assert rows.data_ptr() == logits.data_ptr() and rows.shape == (3, 5, 301)
    assert as_rows(logits).shape == (1, 18, 301)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index(backend):
    logits = random_logits((6, 5, 97), torch.float32, 4.0)
    targets = randint(97, (6, 5))
    targets[torch.rand(6, 5, device=TEST_DEVICE) < 0.4] = -100
    out = token_stats(logits, targets, stats="all", backend=backend)
    ref = reference_stats(logits, targets)
    assert_matches(out, ref)
    ignored = targets == -100
    assert (out.logprob[ignored] == 0).all() and (out.nll_grad_norm[ignored] == 0).all()
    # An ignore_index inside [0, V) ignores that token id but still counts it in the softmax.
    targets = randint(97, (6, 5))
    targets[:, 0] = 3
    out = token_stats(logits, targets, ignore_index=3, stats="all", backend=backend)
    assert_matches(out, reference_stats(logits, targets, ignore_index=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_with_neg_inf(backend):
    logits = random_logits((8, 500), torch.float32, 6.0)
    keep = torch.rand(8, 500, device=TEST_DEVICE) < 0.1
    keep[:, 0] = True
    logits = logits.masked_fill(~keep, float("-inf"))
    targets = randint(500, (8,))
    targets[:4] = 0  # finite target
    out = token_stats(logits, targets, stats="all", backend=backend)
    ref = reference_stats(logits, targets)
    assert_matches(out, ref)
    masked_target = ~keep.gather(1, targets[:, None]).squeeze(1)
    assert masked_target.any()
    assert torch.isneginf(out.logprob[masked_target]).all()
    # A target outside the support: ||p - onehot|| = sqrt(1 + sum p^2).
    torch.testing.assert_close(out.nll_grad_norm[masked_target],
                               torch.sqrt(1 + out.sum_sq_probs[masked_target]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_rows(backend):
    """Documented NaN semantics, and that a bad row never contaminates its neighbours."""
    logits = random_logits((5, 64), torch.float32, 3.0)
    logits[1] = float("-inf")                  # no finite entry
    logits[2, 7] = float("inf")
    logits[3, 9] = float("nan")
    targets = torch.full((5,), 2, device=TEST_DEVICE)
    out = token_stats(logits, targets, stats="all", backend=backend)
    assert torch.isneginf(out.logsumexp[1])
    for name in STAT_NAMES:
        value = getattr(out, name)
        if name != "logsumexp":
            assert torch.isnan(value[1]), (name, "all -inf")
        assert torch.isnan(value[2]), (name, "+inf")
        assert torch.isnan(value[3]), (name, "nan")
    keep = [0, 4]
    ref = reference_stats(logits[keep], targets[keep])
    assert_matches(entropy_gpu.TokenStats(*(getattr(out, n)[keep] for n in STAT_NAMES)), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_targets_give_nan(backend):
    logits = random_logits((4, 50))
    targets = torch.tensor([0, 50, -7, 10**12], device=TEST_DEVICE)
    out = token_stats(logits, targets, stats="all", backend=backend, check_targets_range=False)
    assert not torch.isnan(out.logprob[0]) and torch.isnan(out.logprob[1:]).all()
    assert torch.isnan(out.nll_grad_norm[1:]).all()
    ref = reference_stats(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out.entropy.double(), ref["entropy"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum_sq_probs.double(), ref["sum_sq_probs"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    logits = random_logits((4, 33))
    targets = torch.randint(0, 33, (4,), dtype=torch.int32, device=TEST_DEVICE)
    out = token_stats(logits, targets, backend=backend)
    assert_matches(out, reference_stats(logits, targets.long()), names=entropy_gpu.DEFAULT_STATS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = token_stats(torch.randn(0, 3, 10, device=TEST_DEVICE), torch.zeros(0, 3, dtype=torch.long,
                                                                             device=TEST_DEVICE),
                      stats="all", backend=backend)
    assert out.entropy.shape == (0, 3) and out.logprob.shape == (0, 3)


def test_gradient_norms_match_autograd():
    logits = random_logits((6, 123), torch.float64, 4.0)
    targets = randint(123, (6,))
    for temperature in (0.5, 1.0, 1.7):
        out = token_stats(logits.float(), targets, temperature=temperature, stats="all")
        grad_h = reference_entropy_grad(logits, temperature)
        torch.testing.assert_close(out.entropy_grad_norm.double().cpu(), grad_h.norm(dim=-1), atol=1e-5,
                                   rtol=1e-5)
        z = logits.clone().requires_grad_(True)
        nll = -torch.log_softmax(z / temperature, -1).gather(1, targets[:, None]).sum()
        (grad_nll,) = torch.autograd.grad(nll, z)
        torch.testing.assert_close(out.nll_grad_norm.double(), grad_nll.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_confident_rows_keep_nll_grad_norm_accurate():
    """p_y close to 1: the textbook form sqrt(1 - 2 p_y + S) cancels in fp32 (errors ~1e-4);
    the kernels' (1 - p_y)^2 + sum_{i != y} p_i^2 stays within 1e-6 absolute."""
    logits = torch.full((4, 1000), -20.0)
    logits[:, 0] = torch.tensor([0.0, 8.0, 11.0, 14.0])
    logits[:, 1:4] = torch.tensor([2.0, 1.0, 0.5])
    targets = torch.zeros(4, dtype=torch.long)
    logits, targets = logits.to(TEST_DEVICE), targets.to(TEST_DEVICE)
    ref = reference_stats(logits, targets)["nll_grad_norm"]
    lp = torch.log_softmax(logits, -1)  # fp32, as a naive implementation would
    p = lp.exp()
    naive = torch.sqrt(torch.clamp(1 - 2 * p[:, 0] + (p * p).sum(-1), min=0))
    assert (naive.double() - ref).abs().max() > 1e-5  # the cancellation is real here
    for backend in BACKENDS:
        out = token_stats(logits, targets, stats=("nll_grad_norm",), backend=backend)
        torch.testing.assert_close(out.nll_grad_norm.double(), ref, rtol=0, atol=1e-6)


def test_convenience_wrappers_agree():
    logits = random_logits((3, 4, 77), torch.bfloat16, 3.0)
    targets = randint(77, (3, 4))
    full = token_stats(logits, targets, stats="all", temperature=0.8)
    torch.testing.assert_close(entropy_gpu.entropy(logits, temperature=0.8), full.entropy)
    torch.testing.assert_close(entropy_gpu.logprobs(logits, targets, temperature=0.8), full.logprob)
    ent, lp = entropy_gpu.entropy_and_logprobs(logits, targets, temperature=0.8)
    torch.testing.assert_close(ent, full.entropy)
    torch.testing.assert_close(lp, full.logprob)
    torch.testing.assert_close(entropy_gpu.nll_grad_norm(logits, targets, temperature=0.8),
                               full.nll_grad_norm)
    torch.testing.assert_close(entropy_gpu.entropy_grad_norm(logits, temperature=0.8), full.entropy_grad_norm)
    torch.testing.assert_close(entropy_gpu.varentropy(logits, temperature=0.8), full.varentropy)


def test_torch_backend_small_blocks_match_one_block():
    """Row blocking must not change results (block boundaries inside a batch row)."""
    from entropy_gpu._torch_backend import token_stats_torch

    logits = random_logits((3, 7, 211), torch.float32, 5.0)
    targets = randint(211, (21,))
    want = (True,) * len(STAT_NAMES)
    outs = []
    for block_bytes in (1, 211 * 4 * 2, 1 << 30):
        out = torch.full((len(STAT_NAMES), 21), float("nan"))
        token_stats_torch(as_rows(logits), targets, out, inv_temperature=1.0, ignore_index=-100,
                          want=want, block_bytes=block_bytes)
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)


def test_entropy_bounds_on_uniform_rows():
    vocab = 5003
    out = token_stats(torch.zeros(2, vocab), stats=("entropy", "sum_sq_probs", "varentropy"))
    torch.testing.assert_close(out.entropy, torch.full((2,), math.log(vocab)))
    torch.testing.assert_close(out.sum_sq_probs, torch.full((2,), 1 / vocab))
    assert (out.varentropy.abs() < 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.4, 1.0, 1.7])
def test_entropy_change_is_the_derivative_along_the_logprob_step(backend, temperature):
    """entropy_change = d/d eta H(softmax((z + eta grad_z log p_y) / t)) at eta = 0: against a
    float64 central difference of the entropy after the step, and the float64 autograd dot
    product (both references agree with each other first). Rows: masked (-inf) entries, a
    confident target, a confident non-target, an odd vocabulary, a large scale."""
    vocab = 301
    logits = random_logits((6, vocab), torch.float64, 3.0)
    logits[0, ::3] = float("-inf")
    # Rows 1, 2: x = z / t ~ N(0, 1) plus 8 on one column (p ~ 0.86, confident, not saturated).
    logits[1:3] = random_logits((2, vocab), torch.float64, temperature)
    logits[1, 7] += 8.0 * temperature   # the target is confident: a step on it lowers H
    logits[2, 11] += 8.0 * temperature  # another token is: raising the target raises H
    logits[4] *= 40.0
    targets = randint(vocab, (6,))
    targets[1], targets[2] = 7, 12
    targets[0] = 1            # column 1 is finite (-inf at 0, 3, 6, ...)
    eta = 1e-4
    fd = (entropy_after_logit_step(logits, targets, eta, temperature)
          - entropy_after_logit_step(logits, targets, -eta, temperature)) / (2 * eta)
    autograd = reference_entropy_change(logits, targets, temperature)
    torch.testing.assert_close(fd, autograd, atol=1e-6, rtol=1e-5)  # O(eta^2) truncation
    assert fd[1] < 0 < fd[2]
    for dtype in (torch.float64, torch.float32):
        out = token_stats(logits.to(dtype), targets, temperature=temperature, stats=("entropy_change",),
                          backend=backend).entropy_change.double().cpu()
        if dtype == torch.float64:  # the closed form in float64 is the autograd value up to rounding
            torch.testing.assert_close(out, autograd, atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(out, fd, atol=1e-4, rtol=1e-4, msg=lambda m, dtype=dtype: f"{dtype}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_change_needs_targets_and_is_zero_on_ignored_rows(backend):
    logits = random_logits((4, 50), torch.float32, 2.0)
    with pytest.raises(ValueError, match="entropy_change"):
        token_stats(logits, stats=("entropy_change",), backend=backend)
    targets = torch.tensor([-100, 3, 5, -100], device=TEST_DEVICE)
    out = token_stats(logits, targets, stats=("entropy_change",), backend=backend)
    assert (out.entropy_change[[0, 3]] == 0).all() and (out.entropy_change[[1, 2]] != 0).all()
    unchecked = token_stats(logits, torch.tensor([1, 50, -1, 2], device=TEST_DEVICE),
                            check_targets_range=False, stats=("entropy_change",), backend=backend)
    assert torch.isnan(unchecked.entropy_change[[1, 2]]).all()
    assert torch.isfinite(unchecked.entropy_change[[0, 3]]).all()
