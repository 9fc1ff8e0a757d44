"""token_stats_with_correlation: per-sequence correlation of two token statistics, padded
([..., T, V] with a mask) or packed (cu_seqlens), against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from entropy_gpu import STAT_NAMES, pearson, token_stats, token_stats_with_correlation
from tests.helpers import TEST_DEVICE, assert_correlation, randint, random_logits, reference_rows
from tests.reference import reference_pearson, reference_stats

BACKENDS = ["torch", "triton"]
# The statistics themselves carry ~1e-6 absolute error; correlations of spreads ~0.1-1 inherit ~1e-5.
ATOL = 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_matches_reference(backend):
    logits = random_logits((3, 24, 301), torch.float32, 3.0)
    targets = randint(301, (3, 24))
    targets[:, :6] = -100  # prompt tokens: excluded
    mask = torch.rand(3, 24, device=TEST_DEVICE) < 0.9
    out, corr = token_stats_with_correlation(logits, targets, mask=mask, backend=backend)
    ref = reference_stats(logits, targets)
    used = mask & (targets != -100)
    assert_correlation(corr, *reference_rows(ref["entropy"], ref["nll_grad_norm"], used), atol=ATOL)
    # The correlation step alone, on the statistics as computed (conditioning-free).
    assert_correlation(corr, *reference_rows(out.entropy, out.nll_grad_norm, used), atol=1e-5)
    alone = token_stats(logits, targets, backend=backend)
    for name in STAT_NAMES:
        a, b = getattr(out, name), getattr(alone, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    same = pearson(out.entropy, out.nll_grad_norm, used, backend=backend)
    torch.testing.assert_close(corr.corr, same.corr, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading_one", [False, True])
def test_packed_sequences_match_reference(backend, leading_one):
    lengths = [7, 0, 1, 2, 30, 12]
    cu = torch.cumsum(torch.tensor([0] + lengths), 0).to(TEST_DEVICE, torch.int32)
    n = int(cu[-1])
    logits = random_logits((n, 257), torch.bfloat16, 5.0)
    targets = randint(257, (n,))
    targets[cu[:-1][torch.tensor(lengths,
                                 device=TEST_DEVICE) > 0].long()] = -100  # first token of each sequence
    if leading_one:
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    out, corr = token_stats_with_correlation(logits, targets, cu_seqlens=cu, backend=backend, temperature=0.7)
    assert corr.corr.shape == (len(lengths),)
    ref = reference_stats(logits.reshape(n, -1), targets.reshape(n), 0.7)
    want, count = [], []
    for s in range(len(lengths)):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        used = targets.reshape(n)[sl] != -100
        want.append(reference_pearson(ref["entropy"][sl][used].cpu(), ref["nll_grad_norm"][sl][used].cpu()))
        count.append(float(used.sum()))
    assert_correlation(corr, torch.tensor(want, dtype=torch.float64), torch.tensor(count), atol=ATOL)
    assert out.entropy.shape == targets.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_pairs_and_stats(backend):
    logits = random_logits((2, 16, 100), torch.float32, 2.0)
    out, corr = token_stats_with_correlation(logits, pair=("entropy", "varentropy"), stats=("logsumexp",),
                                             backend=backend)
    assert out.logsumexp is not None and out.entropy is not None and out.varentropy is not None
    assert out.logprob is None and out.nll_grad_norm is None and out.sum_sq_probs is None
    ref = reference_stats(logits)
    assert_correlation(corr, *reference_rows(ref["entropy"], ref["varentropy"]), atol=ATOL)
    single = token_stats_with_correlation(logits[0], pair=("entropy", "varentropy"), backend=backend)[1]
    assert single.corr.shape == ()
    torch.testing.assert_close(single.corr, corr.corr[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pair=("entropy", "surprise")), ValueError, "unknown statistic"),
        (dict(pair="entropy"), TypeError, "two statistic names"),
        (dict(pair=("entropy", "entropy")), ValueError, "two different"),
        (dict(targets=None), ValueError, "need targets"),
        (dict(mask=torch.ones(2, 5)), TypeError, "torch.bool"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, r"\[N, V\] or \[1, N, V\]"),
        (dict(stats=("nonsense",)), ValueError, "unknown statistic"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    logits = torch.randn(2, 5, 11)
    args = dict(targets=torch.randint(0, 11, (2, 5)))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        token_stats_with_correlation(logits, **args)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="sequence dimension"):
        token_stats_with_correlation(torch.randn(11), pair=("entropy", "varentropy"))
    with pytest.raises(ValueError, match="end at the number of tokens"):
        token_stats_with_correlation(torch.randn(6, 11), pair=("entropy", "varentropy"),
                                     cu_seqlens=torch.tensor([0, 5]))
