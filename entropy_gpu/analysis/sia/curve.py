"""Conditional answer entropy along the prefixes of one reasoning trace (SPEC section 5).

For ``k = 0..K`` the context is ``prompt + trace[:step k] + probe``; the answer
distribution after it is estimated by one of three estimators:

- ``choices``: each candidate of a finite answer set scored by its full token
  log-likelihood, renormalized over the set.
- ``next_token``: the full-vocabulary entropy of the first answer token. Leading
  whitespace tokens of the answer (``" 18"`` is ``" ", "1", "8"`` in SmolLM2's
  tokenizer) are teacher-forced first, so the entropy is over the first token that
  carries content.
- ``sampled``: ``num_samples`` answers sampled after each probe, clustered by their
  normalized string; plug-in entropy with the Miller-Madow correction ``(m - 1) / 2n``.

``answer_logprob[k]`` is log p(true answer): renormalized over the set for
``choices``, the exact token log-likelihood of ``answer_prefix + answer`` otherwise.
All ``K + 1`` probes share one forward pass over the trace (``tree.PackedRunner``).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import torch

from entropy_gpu import token_stats  # the public API (kernels on GPU, blocked torch on CPU)

from .answers import ANSWER_KINDS, normalize_short_answer
from .data import Trace
from .segment import SEGMENTATIONS, Step, segment_trace
from .signatures import json_ready, trace_signatures
from .tree import NaiveRunner, PackedRunner, TokenTree

ESTIMATORS = ("choices", "next_token", "sampled")
METHODS = ("packed", "naive")


@dataclass
class SIAConfig:
    """How a trace is cut, probed and scored. Defaults are documented in docs/usage/sia.md."""

    estimator: str = "next_token"        #: choices | next_token | sampled
    segmentation: str = "sentence"       #: newline | sentence | regex | tokens
    pattern: str | None = None           #: separator regex for segmentation="regex"
    every: int | None = None             #: step length for segmentation="tokens"
    probe: str = "\nThe answer is"       #: appended after each prefix
    answer_prefix: str = " "             #: put between the probe and an answer
    instruction: str | None = None       #: appended to the question in the user turn
    use_chat_template: bool = True       #: False: plain "Question: ...\nAnswer:\n" prompt
    system_prompt: str | None = None     #: system turn (None: the template's default)
    num_samples: int = 16                #: sampled: answers per prefix
    sample_temperature: float = 1.0      #: sampled: temperature of the answer samples
    max_answer_tokens: int = 8           #: sampled: longest answer
    seed: int = 0                        #: sampled: combined with the trace id
    method: str = "packed"               #: packed (one pass) | naive (re-encode each prefix)

    def validate(self) -> SIAConfig:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose from {ESTIMATORS}")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"unknown segmentation {self.segmentation!r}; choose from {SEGMENTATIONS}")
        if self.segmentation == "regex" and not self.pattern:
            raise ValueError("segmentation 'regex' needs a separator pattern (CLI: --pattern)")
        if self.segmentation == "tokens" and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError("segmentation 'tokens' needs every=<positive int> (CLI: --every), "
                             f"got {self.every!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.estimator == "sampled":
            if self.num_samples < 2:
                raise ValueError(f"num_samples must be >= 2, got {self.num_samples}")
            if self.max_answer_tokens < 1:
                raise ValueError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
            if not (self.sample_temperature > 0 and math.isfinite(self.sample_temperature)):
                raise ValueError(f"sample_temperature must be finite and > 0, got {self.sample_temperature}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnswerCurve:
    """SIA curve of one trace: ``entropy[k]`` and ``answer_logprob[k]`` for ``k = 0..K``
    (nats; ``k = 0`` is the question alone), step offsets, and correctness if known."""

    id: str
    estimator: str
    steps: list[Step]
    entropy: list[float]
    answer_logprob: list[float]
    answer: str
    answer_set_size: int | None = None   #: |A| for the Fano bound (None: unknown)
    correct: bool | None = None
    predicted: str | None = None
    source: str | None = None
    tokens_processed: int = 0            #: tokens run through the model for this trace
    forward_passes: int = 0              #: model calls for this trace
    extras: dict = field(default_factory=dict)  #: choice_probs | answer_freq, samples

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def gains(self) -> list[float]:
        """``H_{k-1} - H_k`` for ``k = 1..K`` (positive: the step was informative)."""
        return [a - b for a, b in zip(self.entropy[:-1], self.entropy[1:])]

    @property
    def signatures(self) -> dict[str, float]:
        return trace_signatures(self.entropy, self.answer_set_size)

    def to_dict(self) -> dict:
        """JSON-ready record (non-finite numbers become None)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "steps"}
        record["steps"] = [asdict(s) for s in self.steps]
        record["gains"] = self.gains
        record["signatures"] = self.signatures
        return json_ready(record)


def prompt_ids(tokenizer, question: str, *, instruction: str | None = None, use_chat_template: bool = True,
               system_prompt: str | None = None) -> list[int]:
    """Token ids of the question turn, ending where the model's reasoning starts."""
    content = question.strip() + (f"\n\n{instruction.strip()}" if instruction and instruction.strip() else "")
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: pass use_chat_template=False (CLI: --no-chat-template) "
                "to use the plain 'Question: ...\\nAnswer:' prompt, or set tokenizer.chat_template")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"Question: {content}\nAnswer:\n")["input_ids"])


def continuation_ids(tokenizer, probe: str, probe_ids: list[int], text: str) -> list[int]:
    """Tokens of ``text`` as it is tokenized right after ``probe`` (so ``" A"`` stays one
    token); ``text`` alone where the joint tokenization does not extend the probe's."""
    joint = list(tokenizer(probe + text, add_special_tokens=False)["input_ids"])
    if len(joint) > len(probe_ids) and joint[:len(probe_ids)] == probe_ids:
        return joint[len(probe_ids):]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_answer(answer, choices, estimator: str, kind: str) -> tuple[str, list[str] | None, int | None]:
    if answer is None or not str(answer).strip():
        raise ValueError("answer is missing: the SIA curve needs the true answer (answer='...')")
    if kind not in ANSWER_KINDS:
        raise ValueError(f"unknown answer_kind {kind!r}; choose from {ANSWER_KINDS}")
    answer = str(answer).strip()
    if estimator != "choices":
        return answer, choices, None
    if not choices:
        raise ValueError("estimator 'choices' needs a finite answer set: pass choices=[...] "
                         "(ARC: the option letters), or use estimator 'next_token' or 'sampled'")
    choices = [str(c).strip() for c in choices]
    keys = [normalize_short_answer(c, kind, choices) for c in choices]
    if len(set(keys)) != len(keys):
        raise ValueError(f"choices {choices} contain duplicates (after normalization)")
    key = normalize_short_answer(answer, kind, choices)
    if key not in keys:
        raise ValueError(f"answer {answer!r} is not in choices {choices}")
    return answer, choices, keys.index(key)


def _stop_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _probe_tree(prompt: list[int], trace: list[int], prefix_lengths: list[int], probe_ids: list[int],
                cand_ids: list[list[int]]) -> tuple[TokenTree, list[int], list[list[list[int]]]]:
    """The token tree of one trace: prompt + trace as the trunk, a probe after each
    prefix, every candidate answer after each probe. Returns the tree, the probe's
    last node per prefix, and ``branches[k][c]``: the nodes whose logits predict
    candidate ``c``'s tokens after prefix ``k``."""
    tree = TokenTree()
    trunk = tree.extend(prompt + trace)
    probe_ends, branches = [], []
    for length in prefix_lengths:
        parent = trunk[len(prompt) + length - 1]
        probe_end = tree.extend(probe_ids, parent)[-1] if probe_ids else parent
        probe_ends.append(probe_end)
        branches.append([[probe_end] + tree.extend(ids, probe_end)[:-1] for ids in cand_ids])
    return tree, probe_ends, branches


def answer_curve(
    model,
    tokenizer,
    question: str,
    trace: str,
    answer: str,
    *,
    choices: list[str] | None = None,
    answer_kind: str = "text",
    config: SIAConfig | None = None,
    id: str = "",
) -> AnswerCurve:
    """The SIA curve of one trace: ``H_k`` and ``log p(answer)_k`` for ``k = 0..K``.

    Args:
        model: a Hugging Face causal LM (eval mode; sdpa or eager attention for the
            one-pass method).
        tokenizer: its fast tokenizer (with a chat template unless
            ``config.use_chat_template`` is False).
        question: the problem as shown to the model.
        trace: the reasoning to teacher-force (gold, or generated by any model).
        answer: the true answer.
        choices: the finite answer set; required by the ``choices`` estimator.
        answer_kind: ``number | boxed | letter | text``: how answers are normalized
            (matching ``answer`` to ``choices``; clustering sampled answers).
        config: ``SIAConfig`` (estimator, segmentation, probe, ...).
        id: a name carried into the result.

    Raises:
        ValueError: missing answer, answer not in choices, empty trace, a tokenizer
            without a chat template (with ``use_chat_template``), bad config.
    """
    config = (config or SIAConfig()).validate()
    answer, choices, true_index = _check_answer(answer, choices, config.estimator, answer_kind)
    seg = segment_trace(trace, tokenizer, config.segmentation, pattern=config.pattern, every=config.every)
    prompt = prompt_ids(tokenizer, question, instruction=config.instruction,
                        use_chat_template=config.use_chat_template, system_prompt=config.system_prompt)
    probe_ids = list(tokenizer(config.probe, add_special_tokens=False)["input_ids"]) if config.probe else []
    candidates = choices if config.estimator == "choices" else [answer]
    true_index = true_index or 0
    cand_ids = [continuation_ids(tokenizer, config.probe, probe_ids, config.answer_prefix + c)
                for c in candidates]

    tree, probe_ends, branches = _probe_tree(prompt, seg.token_ids, seg.prefix_lengths, probe_ids, cand_ids)
    runner = PackedRunner(model) if config.method == "packed" else NaiveRunner(model)
    wanted = sorted({n for per_k in branches for nodes in per_k for n in nodes})
    logits = runner.logits(tree, wanted)
    row_of = {n: i for i, n in enumerate(wanted)}
    flat_nodes = [n for per_k in branches for nodes in per_k for n in nodes]
    flat_targets = [t for _ in branches for ids in cand_ids for t in ids]
    stats = token_stats(logits[[row_of[n] for n in flat_nodes]],
                        torch.tensor(flat_targets, device=logits.device),
                        stats=("entropy", "logprob"))
    token_logprob = stats.logprob.double().cpu().tolist()
    token_entropy = stats.entropy.double().cpu().tolist()

    # Sum token log-probs per (k, candidate); remember where each candidate starts.
    loglik, entropy_rows, pos = [], [], 0
    lead = next((i for i, t in enumerate(cand_ids[true_index]) if tokenizer.decode([t]).strip()), 0)
    for per_k in branches:
        row = []
        for c, nodes in enumerate(per_k):
            row.append(sum(token_logprob[pos:pos + len(nodes)]))
            if c == true_index:
                entropy_rows.append(token_entropy[pos + lead])
            pos += len(nodes)
        loglik.append(row)

    extras: dict = {}
    answer_set_size = None
    if config.estimator == "choices":
        ll = torch.tensor(loglik, dtype=torch.float64)
        logp = ll - ll.logsumexp(-1, keepdim=True)
        entropy = (-(logp.exp() * logp).sum(-1)).tolist()
        answer_logprob = logp[:, true_index].tolist()
        extras["choice_probs"] = logp.exp().tolist()
        extras["choices"] = candidates
        answer_set_size = len(candidates)
    else:
        answer_logprob = [row[0] for row in loglik]
        if config.estimator == "next_token":
            entropy = entropy_rows
            answer_set_size = logits.shape[-1]
        else:
            samples = _sample_answers(model, tokenizer, tree, runner, probe_ends, config,
                                      first_logits=logits[[row_of[n] for n in probe_ends]], seed_key=id)
            keys = [[normalize_short_answer(s, answer_kind, choices) for s in per_k] for per_k in samples]
            true_key = normalize_short_answer(answer, answer_kind, choices)
            entropy = [miller_madow_entropy(k) for k in keys]
            extras["answer_freq"] = [sum(x == true_key for x in k) / len(k) for k in keys]
            extras["samples"] = samples
    return AnswerCurve(
        id=id, estimator=config.estimator, steps=seg.steps, entropy=[float(h) for h in entropy],
        answer_logprob=[float(x) for x in answer_logprob], answer=answer, answer_set_size=answer_set_size,
        tokens_processed=runner.tokens_processed, forward_passes=runner.forward_calls, extras=extras)


def miller_madow_entropy(labels: list) -> float:
    """Plug-in entropy (nats) of the empirical distribution of ``labels`` plus the
    Miller-Madow bias correction ``(m - 1) / (2 n)``, ``m`` = distinct labels."""
    n = len(labels)
    if n == 0:
        raise ValueError("no samples")
    counts = Counter(labels).values()
    plug_in = -sum(c / n * math.log(c / n) for c in counts)
    return plug_in + (len(counts) - 1) / (2 * n)


def _sample_answers(model, tokenizer, tree: TokenTree, runner, probe_ends: list[int], config: SIAConfig,
                    first_logits: torch.Tensor, seed_key: str) -> list[list[str]]:
    """``num_samples`` answers after every probe, all prefixes advancing together: one
    forward per answer token (packed). Gumbel-max sampling with noise drawn for every
    sample at every step keeps the draws identical between the packed and naive runners.
    An answer ends at a newline, a special token, or ``max_answer_tokens``."""
    n = config.num_samples
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(seed_key.encode()))
    stop_ids = _stop_ids(tokenizer)
    newline_cache: dict[int, bool] = {}

    def ends_answer(token: int) -> bool:
        if token in stop_ids:
            return True
        if token not in newline_cache:
            newline_cache[token] = "\n" in tokenizer.decode([token])
        return newline_cache[token]

    total = len(probe_ends) * n
    tokens: list[list[int]] = [[] for _ in range(total)]
    last = [probe_ends[s // n] for s in range(total)]
    active = list(range(total))
    current = first_logits.float().repeat_interleave(n, dim=0)  # rows follow `active`
    for _ in range(config.max_answer_tokens):
        noise = -torch.log(-torch.log(torch.rand(total, current.shape[-1], generator=gen).clamp_(1e-20, 1.0)))
        scores = current.cpu() / config.sample_temperature + noise[active]
        drawn = scores.argmax(-1).tolist()
        next_active, new_nodes = [], []
        for s, token in zip(active, drawn):
            if ends_answer(token):
                continue
            tokens[s].append(token)
            if len(tokens[s]) < config.max_answer_tokens:
                last[s] = tree.extend([token], last[s])[0]
                next_active.append(s)
                new_nodes.append(last[s])
        if not new_nodes:
            break
        current = runner.logits(tree, new_nodes).float()
        active = next_active
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return [texts[k * n:(k + 1) * n] for k in range(len(probe_ends))]


def analyze_traces(model, tokenizer, traces: Iterable[Trace], config: SIAConfig | None = None, *,
                   progress: bool = True, desc: str = "SIA curves") -> list[AnswerCurve]:
    """``answer_curve`` for every trace, with a tqdm progress bar. Each result carries the
    trace's ``correct``, ``predicted`` and ``source``. Errors name the trace."""
    from tqdm.auto import tqdm

    traces = list(traces)
    config = (config or SIAConfig()).validate()
    curves = []
    for trace in tqdm(traces, desc=desc, disable=not progress, unit="trace"):
        p = trace.problem
        try:
            curve = answer_curve(model, tokenizer, p.question, trace.text, p.answer, choices=p.choices,
                                 answer_kind=p.answer_kind, config=config, id=p.id)
        except ValueError as exc:
            raise ValueError(f"trace {p.id!r}: {exc}") from exc
        curve.correct, curve.predicted, curve.source = trace.correct, trace.predicted, trace.source
        curves.append(curve)
    return curves
