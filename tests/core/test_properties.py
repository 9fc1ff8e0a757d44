"""Property tests (hypothesis): agreement with the reference on arbitrary rows, and the
invariances and bounds every softmax statistic must satisfy."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from entropy_gpu import STAT_NAMES, token_stats
from tests.helpers import assert_matches
from tests.reference import reference_stats

finite = st.floats(min_value=-300, max_value=300, allow_nan=False, width=32)
temperatures = st.floats(min_value=0.25, max_value=4.0)


@st.composite
def batches(draw, max_vocab=200, allow_masked=True):
    vocab = draw(st.integers(1, max_vocab))
    rows = draw(st.integers(1, 4))
    data = draw(arrays(np.float32, (rows, vocab), elements=finite))
    logits = torch.from_numpy(data)
    if allow_masked and vocab > 1 and draw(st.booleans()):
        mask = torch.from_numpy(draw(arrays(np.bool_, (rows, vocab))))
        mask[:, 0] = False  # keep one finite entry per row
        logits = logits.masked_fill(mask, float("-inf"))
    targets = torch.from_numpy(draw(arrays(np.int64, (rows,), elements=st.integers(0, vocab - 1))))
    return logits, targets


@given(batches(), temperatures, st.sampled_from(["torch", "triton"]))
def test_matches_reference(batch, temperature, backend):
    logits, targets = batch
    out = token_stats(logits, targets, temperature=temperature, stats="all", backend=backend)
    assert_matches(out, reference_stats(logits, targets, temperature))


@given(batches(allow_masked=False), st.floats(-1e3, 1e3), temperatures)
def test_shift_invariance(batch, shift, temperature):
    logits, targets = batch
    shifted = logits.double() + shift
    a = token_stats(logits.double(), targets, temperature=temperature, stats="all")
    b = token_stats(shifted, targets, temperature=temperature, stats="all")
    for name in STAT_NAMES:
        expected = getattr(a, name) + (shift / temperature if name == "logsumexp" else 0.0)
        torch.testing.assert_close(getattr(b, name), expected, atol=1e-6, rtol=1e-9)


@given(batches(), st.randoms(use_true_random=False))
def test_permutation_invariance(batch, rng):
    logits, targets = batch
    perm = list(range(logits.shape[-1]))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    inverse = torch.argsort(perm)
    a = token_stats(logits, targets, stats="all")
    b = token_stats(logits[:, perm], inverse[targets], stats="all")
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=2e-5, rtol=2e-5, equal_nan=True)


@given(batches(), temperatures)
def test_bounds(batch, temperature):
    logits, targets = batch
    out = token_stats(logits, targets, temperature=temperature, stats="all")
    support = torch.isfinite(logits).sum(-1).double()
    eps = 1e-4
    assert (out.entropy >= -eps).all() and (out.entropy <= torch.log(support) + eps).all()
    assert (out.sum_sq_probs >= 1 / support - eps).all() and (out.sum_sq_probs <= 1 + eps).all()
    assert (out.logprob <= eps).all()
    assert (out.varentropy >= 0).all() and (out.entropy_grad_norm >= 0).all()
    # ||p - e_y||^2 = 1 - 2 p_y + S exactly; bounded by 2 / t^2.
    p_y = out.logprob.double().exp()
    expected = torch.sqrt(torch.clamp(1 - 2 * p_y + out.sum_sq_probs.double(), min=0)) / temperature
    torch.testing.assert_close(out.nll_grad_norm.double(), expected, atol=2e-3, rtol=1e-3)
    assert (out.nll_grad_norm <= math.sqrt(2) / temperature + eps).all()
    # Entropy is at least the min-entropy and at most log of the support.
    min_entropy = -(logits.double() / temperature).log_softmax(-1).max(-1).values
    assert (out.entropy.double() >= min_entropy - eps).all()


@given(batches(max_vocab=60, allow_masked=False), st.integers(2, 8))
def test_duplicating_the_vocabulary(batch, copies):
    """Repeating every logit k times adds log k to entropy and logsumexp, divides S by k."""
    logits, _ = batch
    assume(logits.shape[-1] * copies <= 480)
    a = token_stats(logits.double(), stats=("entropy", "logsumexp", "sum_sq_probs", "varentropy"))
    b = token_stats(logits.double().repeat(1, copies), stats=("entropy", "logsumexp", "sum_sq_probs",
                                                              "varentropy"))
    torch.testing.assert_close(b.entropy, a.entropy + math.log(copies))
    torch.testing.assert_close(b.logsumexp, a.logsumexp + math.log(copies))
    torch.testing.assert_close(b.sum_sq_probs, a.sum_sq_probs / copies)
    torch.testing.assert_close(b.varentropy, a.varentropy, atol=1e-9, rtol=1e-7)
