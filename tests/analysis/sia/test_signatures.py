"""Signatures, AUROC with bootstrap interval, and dataset summaries, against
brute-force and scipy computations."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from entropy_gpu.analysis.sia import auroc, auroc_with_interval, fano_bound, summarize, trace_signatures
from entropy_gpu.analysis.sia.signatures import resample_curve


def test_trace_signatures_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h = rng.uniform(0, 3, size=rng.integers(2, 12))
        sig = trace_signatures(h.tolist(), answer_set_size=4)
        K = len(h) - 1
        assert sig["final_entropy"] == h[-1]
        assert sig["slope"] == pytest.approx(np.polyfit(np.arange(K + 1) / K, h, 1)[0])
        assert sig["frac_non_increasing"] == pytest.approx(sum(h[k] <= h[k - 1] for k in range(1, K + 1)) / K)
        assert sig["largest_spike"] == pytest.approx(max([0.0] + [h[k] - h[k - 1] for k in range(1, K + 1)]))
        assert sig["fano_bound"] == pytest.approx(min(1, max(0, (h[-1] - math.log(2)) / math.log(3))))


def test_signatures_of_a_single_point_and_fano_edge_cases():
    sig = trace_signatures([1.0], answer_set_size=10)
    assert sig["final_entropy"] == 1.0
    assert all(math.isnan(sig[k]) for k in ("slope", "frac_non_increasing", "largest_spike"))
    assert math.isnan(fano_bound(1.0, 2)) and math.isnan(fano_bound(1.0, None))
    assert fano_bound(0.1, 4) == 0.0 and fano_bound(50.0, 4) == 1.0
    assert trace_signatures([2.0, 1.0, 0.5])["largest_spike"] == 0.0
    with pytest.raises(ValueError):
        trace_signatures([])


def test_auroc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5, 30).astype(float)
    neg = rng.integers(0, 5, 25).astype(float)  # many ties
    u = mannwhitneyu(pos, neg).statistic
    assert auroc(pos, neg) == pytest.approx(u / (30 * 25))
    assert auroc([1.0], []) != auroc([1.0], [])  # NaN for an empty class


def test_auroc_orientation_and_interval():
    rng = np.random.default_rng(2)
    correct = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    entropy = np.r_[rng.normal(0.5, 0.3, 40), rng.normal(1.5, 0.3, 40)]  # correct: lower entropy
    out = auroc_with_interval(entropy, correct, "lower", n_boot=300)
    assert out["auroc"] > 0.95 and out["lo"] <= out["auroc"] <= out["hi"]
    flipped = auroc_with_interval(entropy, correct, "higher", n_boot=300)
    assert flipped["auroc"] == pytest.approx(1 - out["auroc"])
    noise = auroc_with_interval(rng.normal(size=80), correct, "lower", n_boot=300)
    assert noise["lo"] < 0.5 < noise["hi"]
    with_nan = auroc_with_interval(np.r_[entropy[:-1], np.nan], correct, "lower", n_boot=10)
    assert with_nan["n_incorrect"] == 39


def _record(entropy, correct, logp=None):
    return {"entropy": entropy, "answer_logprob": logp or [-x for x in entropy], "correct": correct,
            "steps": [{}] * (len(entropy) - 1), "signatures": trace_signatures(entropy, 4)}


def test_summary_mean_curves_and_groups():
    records = [_record([2.0, 1.0, 0.0], True), _record([2.0, 1.5], True),
               _record([1.0, 1.0, 1.0, 2.0], False), _record([1.0], False)]
    s = summarize(records, grid_points=5, n_boot=200)
    grid = np.linspace(0, 1, 5)
    assert s["n_traces"] == 4 and s["n_correct"] == 2 and s["accuracy"] == 0.5
    want = (resample_curve([2.0, 1.0, 0.0], grid) + resample_curve([2.0, 1.5], grid)) / 2
    assert s["curves"]["correct"]["entropy"]["mean"] == pytest.approx(want.tolist())
    assert s["curves"]["correct"]["answer_logprob"]["mean"] == pytest.approx((-want).tolist())
    assert s["curves"]["incorrect"]["n"] == 1  # the K = 0 trace has no curve
    # 3 traces with a curve: too few for a bootstrap band (analysis/intervals.py).
    band = s["curves"]["all"]["entropy"]
    assert set(band["lo"]) == set(band["hi"]) == {None}  # NaN in JSON
    fe = s["signatures"]["final_entropy"]
    # Final entropies: correct {0.0, 1.5}, incorrect {2.0, 1.0}; lower-is-correct wins 3 of 4 pairs.
    assert fe["mean_correct"] == pytest.approx(0.75) and fe["auroc"] == pytest.approx(0.75)
    assert s["signatures"]["slope"]["n_incorrect"] == 1  # NaN slope of the K = 0 trace dropped


def test_summary_without_known_correctness_has_no_auroc():
    s = summarize([_record([1.0, 0.5], None), _record([1.0, 0.2], None)], n_boot=10)
    assert s["accuracy"] is None and "auroc" not in s["signatures"]["final_entropy"]
    assert s["curves"]["all"]["n"] == 2 and s["curves"]["correct"]["n"] == 0


def test_bootstrap_bands_and_auroc_intervals_only_where_n_allows_one():
    from entropy_gpu.analysis.intervals import MIN_AUROC_CLASS_N, MIN_BOOTSTRAP_N
    from entropy_gpu.analysis.sia.run import format_summary
    from entropy_gpu.analysis.sia.signatures import bootstrap_mean

    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(size=(MIN_BOOTSTRAP_N - 1, 3)), n_boot=50)
    assert np.isnan(small["lo"]).all() and np.isnan(small["hi"]).all() and np.isfinite(small["mean"]).all()
    enough = bootstrap_mean(rng.normal(size=(MIN_BOOTSTRAP_N, 3)), n_boot=50)
    assert np.all(np.array(enough["lo"]) < np.array(enough["hi"]))
    # Four perfectly separated traces: AUROC 1, and no "[1.000, 1.000]".
    four = auroc_with_interval([0.1, 0.2, 0.9, 1.0], [True, True, False, False], "lower", n_boot=50)
    assert four["auroc"] == 1.0 and math.isnan(four["lo"]) and math.isnan(four["hi"])
    k = MIN_AUROC_CLASS_N
    values = np.r_[rng.normal(0, 1, k), rng.normal(0.5, 1, k)]
    ok = auroc_with_interval(values, [True] * k + [False] * k, "lower", n_boot=200)
    assert ok["lo"] <= ok["auroc"] <= ok["hi"] and ok["lo"] < ok["hi"]
    short = auroc_with_interval(values[1:], [True] * (k - 1) + [False] * k, "lower", n_boot=50)
    assert math.isnan(short["lo"])
    records = [_record([2.0, 1.0, 0.1], True), _record([2.0, 1.5, 0.2], True),
               _record([1.0, 1.0, 1.9], False), _record([1.0, 2.0, 2.0], False)]
    text = format_summary(summarize(records, n_boot=50))
    line = next(x for x in text.splitlines() if x.startswith("AUROC final_entropy"))
    assert "1.000  [n too small]" in line and "[1.000, 1.000]" not in text
