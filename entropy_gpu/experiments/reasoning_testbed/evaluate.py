"""What the testbed measures on a policy: held-out accuracy by difficulty (greedy and sampled),
the exact per-response rho and the fast measure's rho on fresh samples of probe problems, KL to
the starting policy, degeneration, and SIA answer-entropy curves along sampled traces."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from entropy_gpu import pearson, token_stats
from entropy_gpu.corrpo import CorrPOConfig, ParamGradMeasure, completion_stats
from entropy_gpu.experiments.corrpo_training import degeneration

from . import task
from .policy import generate

#: Length buckets (completion tokens) of the rho report.
LENGTH_BUCKETS = ((0, 39), (40, 59), (60, 79), (80, 10_000))


def bucket_name(length: int) -> str:
    for lo, hi in LENGTH_BUCKETS:
        if lo <= length <= hi:
            return f"{lo}-{hi}" if hi < 10_000 else f">={lo}"
    raise ValueError(length)


def _by_difficulty(problems: Sequence[task.Problem], correct: Sequence[bool]) -> dict[str, float]:
    hits: dict[int, list[bool]] = defaultdict(list)
    for p, c in zip(problems, correct):
        hits[p.steps].append(c)
    return {str(k): sum(v) / len(v) for k, v in sorted(hits.items())}


def heldout_accuracy(
    model,
    tokenizer,
    problems: Sequence[task.Problem],
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> dict:
    """Greedy and sampled (one sample per problem at ``temperature``) accuracy, overall and by
    difficulty, with length, truncation and degeneration of the sampled completions."""
    prompts = [p.prompt for p in problems]
    greedy = generate(model, tokenizer, prompts, sample=False, max_new_tokens=max_new_tokens)
    sampled = generate(
        model,
        tokenizer,
        prompts,
        sample=True,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    eos = tokenizer.eos_token_id
    g_ok = [task.is_correct(task.decode(tokenizer, c), p.answer) for c, p in zip(greedy, problems)]
    s_ok = [task.is_correct(task.decode(tokenizer, c), p.answer) for c, p in zip(sampled, problems)]
    deg = [degeneration(c) for c in sampled]
    return {
        "heldout_n": len(problems),
        "acc_greedy": sum(g_ok) / len(problems),
        "acc_sampled": sum(s_ok) / len(problems),
        "acc_greedy_by_difficulty": _by_difficulty(problems, g_ok),
        "acc_sampled_by_difficulty": _by_difficulty(problems, s_ok),
        "length_sampled": sum(len(c) for c in sampled) / len(sampled),
        "at_limit_sampled": sum(eos not in c for c in sampled) / len(sampled),
        "distinct2_sampled": sum(d for d, _ in deg) / len(deg),
        "repeated_trigrams_sampled": sum(r for _, r in deg) / len(deg),
    }


def _padded(prompt_rows: list[list[int]], completions: list[list[int]], pad: int):
    """Right-padded ``[N, T]`` ids of prompt + completion, completion mask, attention mask."""
    rows = [p + c for p, c in zip(prompt_rows, completions)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    completion = torch.tensor(
        [
            [0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
            for p, c in zip(prompt_rows, completions)
        ],
        dtype=torch.bool,
    )
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, completion, attention


def _rho(a: Tensor, b: Tensor) -> float | None:
    r = pearson(a.double(), b.double())
    return float(r.corr) if bool(r.valid) else None


def probe(
    model,
    tokenizer,
    problems: Sequence[task.Problem],
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    ref_model=None,
    fast_measures: Sequence[str] = ("same_position",),
    batch_size: int = 32,
) -> list[dict]:
    """One fresh sample per probe problem; per response: difficulty, length, correct, the exact
    rho (token entropy at ``temperature`` vs the exact Frobenius norm of the sampled token's logit
    gradient over q/k/v/o of every layer: the paper's measure), each fast measure's rho on the
    same tokens, mean entropy and the KL to ``ref_model`` (k1 estimator on the policy's sample)."""
    from entropy_gpu.param_grad.batched_exact import batched_logit_param_grad_norms

    prompts = [tokenizer(p.prompt, add_special_tokens=False).input_ids for p in problems]
    completions = generate(
        model,
        tokenizer,
        [p.prompt for p in problems],
        sample=True,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    for lo in range(0, len(problems), batch_size):
        sl = slice(lo, lo + batch_size)
        ids, mask, attention = _padded(prompts[sl], completions[sl], tokenizer.pad_token_id)
        exact = batched_logit_param_grad_norms(
            model, ids, mask, attention_mask=attention, token_chunk=16
        ).total["fro"]
        fast = {
            name: completion_stats(
                model,
                ids,
                mask,
                attention_mask=attention,
                temperature=temperature,
                config=CorrPOConfig(measure=ParamGradMeasure(method=name)),
            ).measure
            for name in fast_measures
        }
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
            ref_logits = (
                ref_model(input_ids=ids, attention_mask=attention).logits[:, :-1] if ref_model else None
            )
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        stats = token_stats(logits, targets, temperature=temperature, stats=("entropy", "logprob"))
        ref_lp = (
            token_stats(ref_logits, targets, temperature=temperature, stats=("logprob",)).logprob
            if ref_logits is not None
            else None
        )
        for i, problem in enumerate(problems[sl]):
            m = mask[i, 1:]
            completion = completions[lo + i]
            entropy = stats.entropy[i][m]
            row = {
                "difficulty": problem.steps,
                "length": len(completion),
                "correct": task.is_correct(task.decode(tokenizer, completion), problem.answer),
                "mean_entropy": float(entropy.mean()) if entropy.numel() else None,
                "rho_exact": _rho(entropy, exact[i, 1:][m]) if entropy.numel() >= 3 else None,
            }
            for name, values in fast.items():
                row[f"rho_{name}"] = _rho(entropy, values[i, 1:][m]) if entropy.numel() >= 3 else None
            if ref_lp is not None and entropy.numel():
                row["kl"] = float((stats.logprob[i][m] - ref_lp[i][m]).mean())
            rows.append(row)
    model.train(was_training)
    return rows


def summarize_probe(rows: list[dict], fast_measures: Sequence[str] = ("same_position",)) -> dict:
    """Means over responses, overall and by length bucket, and the fast measures' agreement with
    the exact rho (Pearson across responses, sign agreement)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    defined = [r for r in rows if r["rho_exact"] is not None]
    out = {
        "n": len(rows),
        "n_defined": len(defined),
        "rho_exact": mean(r["rho_exact"] for r in defined),
        "inversion_rate_exact": (sum(r["rho_exact"] < 0 for r in defined) / len(defined))
        if defined
        else None,
        "mean_entropy": mean(r["mean_entropy"] for r in rows),
        "kl": mean(r.get("kl") for r in rows),
        "rho_exact_correct": mean(r["rho_exact"] for r in defined if r["correct"]),
        "rho_exact_incorrect": mean(r["rho_exact"] for r in defined if not r["correct"]),
        "by_length": {},
    }
    for lo, hi in LENGTH_BUCKETS:
        name = bucket_name(lo)
        inside = [r for r in defined if lo <= r["length"] <= hi]
        out["by_length"][name] = {"n": len(inside), "rho_exact": mean(r["rho_exact"] for r in inside)}
    for name in fast_measures:
        pairs = [(r["rho_exact"], r[f"rho_{name}"]) for r in defined if r.get(f"rho_{name}") is not None]
        out[f"rho_{name}"] = mean(b for _, b in pairs)
        if len(pairs) >= 3:
            a, b = torch.tensor(pairs, dtype=torch.float64).T
            agree = pearson(a, b)
            out[f"agreement_{name}"] = float(agree.corr) if bool(agree.valid) else None
            out[f"sign_agreement_{name}"] = sum((x < 0) == (y < 0) for x, y in pairs) / len(pairs)
    return out


@torch.no_grad()
def answer_entropy_curve(model, tokenizer, prompt: str, completion: str) -> dict:
    """SIA's conditional answer entropy along one trace: after the prompt and each prefix of ``k``
    worked lines of ``completion`` (split at ``;``), the probe ``#`` and the distribution over the
    100 possible answers 0..99 (each scored by its full token likelihood, then eos; renormalized
    over the set: the ``choices`` estimator). Returns entropies ``H_k`` (nats) and ``log p`` of the
    true answer's value under the model, ``k = 0..K``."""
    lines = [x for x in completion.split(";") if x and not x.startswith(task.ANSWER_MARK)]
    candidates = [str(v) for v in range(task.MAX_VALUE + 1)]
    encoded = [
        tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in candidates
    ]
    entropies, logps = [], []
    for k in range(len(lines) + 1):
        prefix = prompt + "".join(line + ";" for line in lines[:k]) + task.ANSWER_MARK
        base = tokenizer(prefix, add_special_tokens=False).input_ids
        ids, mask, attention = _padded([base] * len(encoded), encoded, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        scores = (logp * mask[:, 1:]).sum(1).double()
        dist = torch.log_softmax(scores, 0)
        entropies.append(float(-(dist.exp() * dist).sum()))
        logps.append(dist)
    return {"entropies": entropies, "log_p": [d.tolist() for d in logps]}


def sia_records(
    model,
    tokenizer,
    problems: Sequence[task.Problem],
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> list[dict]:
    """Answer-entropy curves of one sampled trace per problem: ``H_k`` and ``log p(true answer)``."""
    completions = generate(
        model,
        tokenizer,
        [p.prompt for p in problems],
        sample=True,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    rows = []
    for problem, ids in zip(problems, completions):
        text = task.decode(tokenizer, ids)
        curve = answer_entropy_curve(model, tokenizer, problem.prompt, text)
        rows.append(
            {
                "difficulty": problem.steps,
                "correct": task.is_correct(text, problem.answer),
                "length": len(ids),
                "entropies": curve["entropies"],
                "log_p_answer": [lp[problem.answer] for lp in curve["log_p"]],
            }
        )
    return rows


def summarize_sia(rows: list[dict], bins: int = 5) -> dict:
    """Mean ``H_k`` over normalized position ``k / K`` (``bins`` bins) for correct and incorrect
    traces, final entropy by correctness, the fraction of traces whose entropy ends lower than
    it starts, and the AUROC of the final entropy for correctness (low entropy = correct)."""

    def curve(subset):
        sums, counts = [0.0] * bins, [0] * bins
        for r in subset:
            h = r["entropies"]
            for k, value in enumerate(h):
                b = min(bins - 1, int(bins * k / max(1, len(h) - 1))) if len(h) > 1 else 0
                sums[b] += value
                counts[b] += 1
        return [s / c if c else None for s, c in zip(sums, counts)]

    correct = [r for r in rows if r["correct"]]
    wrong = [r for r in rows if not r["correct"]]
    finals_c = [r["entropies"][-1] for r in correct]
    finals_w = [r["entropies"][-1] for r in wrong]
    auroc = None
    if finals_c and finals_w:
        wins = sum((c < w) + 0.5 * (c == w) for c in finals_c for w in finals_w)
        auroc = wins / (len(finals_c) * len(finals_w))
    falling = [r["entropies"][-1] < r["entropies"][0] for r in rows if len(r["entropies"]) > 1]
    return {
        "n": len(rows),
        "n_correct": len(correct),
        "curve_correct": curve(correct),
        "curve_incorrect": curve(wrong),
        "final_entropy_correct": sum(finals_c) / len(finals_c) if finals_c else None,
        "final_entropy_incorrect": sum(finals_w) / len(finals_w) if finals_w else None,
        "falling_fraction": sum(falling) / len(falling) if falling else None,
        "auroc_final_entropy": auroc,
        "initial_entropy": (sum(r["entropies"][0] for r in rows) / len(rows)) if rows else math.nan,
    }
