"""SIA curves on a tiny random Llama with SmolLM2's tokenizer: each estimator against
a brute-force float64 computation that re-encodes every prefix with a plain forward
pass; the one-pass (packed) method against the naive one; bad input."""

import copy
import math
from collections import Counter

import pytest
import torch

from entropy_gpu.analysis.sia import (
    AnswerCurve,
    Problem,
    SIAConfig,
    Trace,
    analyze_traces,
    answer_curve,
    miller_madow_entropy,
    normalize_short_answer,
    segment_trace,
)
from tests.sia_helpers import peaky_tiny_llama, smollm2_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
TRACE = "Tom starts with 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nSo he has 7 apples."
INSTRUCTION = "Think step by step."


@pytest.fixture(scope="module")
def model():
    return peaky_tiny_llama()


def brute_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": f"{QUESTION}\n\n{INSTRUCTION}"}],
                                   tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def brute_logprobs(model, ids):
    """float64 log-softmax of every position of a plain forward over ``ids``."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def brute_sequence(model, context, continuation):
    """(log-likelihood of ``continuation`` after ``context``, per-position log-probs)."""
    logp = brute_logprobs(model, context + continuation)
    n = len(context)
    ll = sum(logp[n - 1 + i, t].item() for i, t in enumerate(continuation))
    return ll, logp


def prefixes(tok, segmentation="newline", **kw):
    seg = segment_trace(TRACE, tok, segmentation, **kw)
    return [seg.token_ids[:n] for n in seg.prefix_lengths]


def config(**kw):
    return SIAConfig(instruction=INSTRUCTION, segmentation="newline", **kw)


def test_next_token_matches_brute_force(model):
    tok = smollm2_tokenizer()
    curve = answer_curve(model, tok, QUESTION, TRACE, "7", answer_kind="number", config=config())
    probe = tok("\nThe answer is", add_special_tokens=False)["input_ids"]
    answer = tok("\nThe answer is 7", add_special_tokens=False)["input_ids"][len(probe):]
    assert tok.convert_ids_to_tokens(answer) == ["Ġ", "7"]  # the digit comes after a bare space token
    want_h, want_lp = [], []
    for prefix in prefixes(tok):
        context = brute_prompt(tok) + prefix + probe
        ll, logp = brute_sequence(model, context, answer)
        row = logp[len(context)]  # distribution of the token after the space: the first digit
        want_h.append(-(row.exp() * row).sum().item())
        want_lp.append(ll)
    assert curve.num_steps == 3 and len(curve.entropy) == 4
    torch.testing.assert_close(torch.tensor(curve.entropy, dtype=torch.float64),
                               torch.tensor(want_h, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(curve.answer_logprob, dtype=torch.float64),
                               torch.tensor(want_lp, dtype=torch.float64),
                               atol=1e-4, rtol=1e-6)
    assert max(want_h) - min(want_h) > 1e-2, "the model must be sharp enough for this test to discriminate"
    assert curve.gains == pytest.approx([a - b for a, b in zip(curve.entropy, curve.entropy[1:])])
    assert curve.answer_set_size == 49152


def test_choices_matches_brute_force(model):
    tok = smollm2_tokenizer()
    choices = ["A", "B", "C", "D"]
    curve = answer_curve(model, tok, QUESTION, TRACE, "C", choices=choices, answer_kind="letter",
                         config=config(estimator="choices"))
    probe = tok("\nThe answer is", add_special_tokens=False)["input_ids"]
    for k, prefix in enumerate(prefixes(tok)):
        context = brute_prompt(tok) + prefix + probe
        ll = torch.tensor([brute_sequence(model, context,
                                          tok(f" {c}", add_special_tokens=False)["input_ids"])[0]
                           for c in choices], dtype=torch.float64)
        logp = ll - ll.logsumexp(0)
        assert curve.entropy[k] == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)
        assert curve.answer_logprob[k] == pytest.approx(logp[2].item(), abs=1e-4)
        assert curve.extras["choice_probs"][k] == pytest.approx(logp.exp().tolist(), abs=1e-5)
    assert curve.answer_set_size == 4


def test_multi_token_choices_sum_their_token_logprobs(model):
    tok = smollm2_tokenizer()
    choices = ["7", "12", "3.5"]  # 1, 2 and 3 digit tokens after the space token
    curve = answer_curve(model, tok, QUESTION, TRACE, "7", choices=choices, answer_kind="number",
                         config=config(estimator="choices", probe="\nSo the total is"))
    probe = tok("\nSo the total is", add_special_tokens=False)["input_ids"]
    context = brute_prompt(tok) + prefixes(tok)[-1] + probe
    ll = torch.tensor([brute_sequence(model, context, tok(f"\nSo the total is {c}", add_special_tokens=False)
                                      ["input_ids"][len(probe):])[0] for c in choices], dtype=torch.float64)
    logp = ll - ll.logsumexp(0)
    assert curve.entropy[-1] == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)


@pytest.mark.parametrize("estimator,segmentation,kw", [
    ("next_token", "tokens", {"every": 3}), ("choices", "tokens", {"every": 3}), ("sampled", "sentence", {}),
    ("next_token", "sentence", {}),
])
def test_packed_equals_naive(model, estimator, segmentation, kw):
    tok = smollm2_tokenizer()
    args = dict(choices=["5", "6", "7", "8"], answer_kind="number", id="t1")
    cfg = dict(estimator=estimator, segmentation=segmentation, instruction=INSTRUCTION, num_samples=6,
               max_answer_tokens=3, sample_temperature=1.5, **kw)
    packed = answer_curve(model, tok, QUESTION, TRACE, "7", config=SIAConfig(method="packed", **cfg), **args)
    naive = answer_curve(model, tok, QUESTION, TRACE, "7", config=SIAConfig(method="naive", **cfg), **args)
    assert packed.num_steps >= (8 if segmentation == "tokens" else 3)
    for field in ("entropy", "answer_logprob"):
        diff = max(abs(a - b) for a, b in zip(getattr(packed, field), getattr(naive, field)))
        assert diff < 1e-4, (field, diff)
    if estimator == "sampled":
        assert packed.extras["samples"] == naive.extras["samples"]
    # One pass over the trace: the packed method runs far fewer tokens through the model.
    assert packed.tokens_processed * 2 < naive.tokens_processed


def test_packed_equals_naive_with_eager_attention():
    tok = smollm2_tokenizer()
    model = peaky_tiny_llama(seed=3, attn="eager")
    cfgs = [SIAConfig(method=m, instruction=INSTRUCTION, segmentation="newline") for m in ("packed", "naive")]
    a, b = (answer_curve(model, tok, QUESTION, TRACE, "7", answer_kind="number", config=c) for c in cfgs)
    assert max(abs(x - y) for x, y in zip(a.entropy + a.answer_logprob, b.entropy + b.answer_logprob)) < 1e-4


def test_sampled_entropy_is_miller_madow_of_the_samples(model):
    tok = smollm2_tokenizer()
    cfg = config(estimator="sampled", num_samples=8, max_answer_tokens=3, sample_temperature=2.0, seed=5)
    curve = answer_curve(model, tok, QUESTION, TRACE, "7", answer_kind="number", config=cfg, id="x")
    samples = curve.extras["samples"]
    assert len(samples) == curve.num_steps + 1 and all(len(s) == 8 for s in samples)
    for k, per_k in enumerate(samples):
        keys = [normalize_short_answer(s, "number") for s in per_k]
        counts = Counter(keys)
        plug_in = -sum(c / 8 * math.log(c / 8) for c in counts.values())
        assert curve.entropy[k] == pytest.approx(plug_in + (len(counts) - 1) / 16)
        assert curve.extras["answer_freq"][k] == counts.get("7", 0) / 8
        assert all("\n" not in s for s in per_k)
    again = answer_curve(model, tok, QUESTION, TRACE, "7", answer_kind="number", config=cfg, id="x")
    assert again.extras["samples"] == samples  # seeded
    other = answer_curve(model, tok, QUESTION, TRACE, "7", answer_kind="number", config=cfg, id="y")
    assert other.extras["samples"] != samples  # the seed depends on the trace id


def test_miller_madow_entropy():
    assert miller_madow_entropy(["a"] * 4) == 0.0
    assert miller_madow_entropy(["a", "b", "a", "b"]) == pytest.approx(math.log(2) + 1 / 8)
    with pytest.raises(ValueError):
        miller_madow_entropy([])


def test_plain_prompt_without_chat_template(model):
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        answer_curve(model, tok, QUESTION, TRACE, "7", config=config())
    curve = answer_curve(model, tok, QUESTION, TRACE, "7", config=config(use_chat_template=False))
    prompt = tok(f"Question: {QUESTION}\n\n{INSTRUCTION}\nAnswer:\n")["input_ids"]
    probe = tok("\nThe answer is", add_special_tokens=False)["input_ids"]
    answer = tok(" 7", add_special_tokens=False)["input_ids"]
    ll, _ = brute_sequence(model, prompt + prefixes(tok)[0] + probe, answer)
    assert curve.answer_logprob[0] == pytest.approx(ll, abs=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(answer=None), "answer is missing"),
    (dict(answer="  "), "answer is missing"),
    (dict(answer="9", choices=["5", "6", "7"], config=config(estimator="choices")), "not in choices"),
    (dict(answer="7", config=config(estimator="choices")), "needs a finite answer set"),
    (dict(answer="7", choices=["7", "7.0"], config=config(estimator="choices")), "duplicates"),
    (dict(answer="7", trace="  \n"), "empty"),
    (dict(answer="7", config=SIAConfig(estimator="guess")), "unknown estimator"),
    (dict(answer="7", config=SIAConfig(estimator="sampled", num_samples=1)), "num_samples"),
    (dict(answer="7", config=SIAConfig(method="fast")), "unknown method"),
])
def test_bad_input(model, kwargs, match):
    kwargs = {"trace": TRACE, "answer_kind": "number", "config": config(), **kwargs}
    with pytest.raises(ValueError, match=match):
        answer_curve(model, smollm2_tokenizer(), QUESTION, **kwargs)


def test_attention_without_masks_is_refused_for_packed(model):
    m = peaky_tiny_llama(seed=1)
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="arbitrary mask"):
        answer_curve(m, smollm2_tokenizer(), QUESTION, TRACE, "7", config=config())


def test_analyze_traces_carries_labels_and_names_failing_traces(model):
    tok = smollm2_tokenizer()
    problem = Problem("p1", QUESTION, "7", "number")
    traces = [Trace(problem, TRACE, "greedy", correct=True, predicted="7"),
              Trace(problem, "3 + 3 = 6.\nSo 6.", "greedy", correct=False, predicted="6")]
    curves = analyze_traces(model, tok, traces, config(), progress=False)
    assert [c.correct for c in curves] == [True, False] and curves[1].predicted == "6"
    assert all(isinstance(c, AnswerCurve) and c.source == "greedy" for c in curves)
    record = curves[0].to_dict()
    assert set(record["signatures"]) >= {"final_entropy", "slope", "fano_bound"}
    assert record["steps"][0]["token_start"] == 0
    with pytest.raises(ValueError, match="trace 'p1'.*empty"):
        analyze_traces(model, tok, [Trace(problem, "", "greedy")], config(), progress=False)


def test_token_tree_paths_depths_and_ancestors():
    from entropy_gpu.analysis.sia.tree import TokenTree

    tree = TokenTree()
    trunk = tree.extend([5, 6, 7])
    branch = tree.extend([8, 9], parent=trunk[1])
    assert tree.extend([], parent=trunk[0]) == [] and len(tree) == 5
    leaf = tree.extend([10], parent=branch[0])
    assert tree.path(leaf[0]) == [trunk[0], trunk[1], branch[0], leaf[0]]
    assert tree.depths == [0, 1, 2, 2, 3, 3] and tree.parents == [-1, 0, 1, 1, 3, 3]
    brute = torch.tensor([[j in tree.path(i) for j in range(len(tree))] for i in range(len(tree))])
    assert torch.equal(tree.ancestors, brute)
    with pytest.raises(IndexError):
        tree.extend([1], parent=99)
