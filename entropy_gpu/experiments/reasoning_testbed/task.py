"""The testbed's task: programs of chained two-digit arithmetic whose lines come shuffled.

A problem with ``k`` steps (its difficulty) is a little program over distinct variables::

    prompt      q=s-4;s=p+w;w=17;p=53;?q>
    completion  w=17;p=53;s=53+17=70;q=70-4=66;#66<eos>

Each step after the first assignments reads earlier variables (the previous step's always,
so the program is one chain of ``k`` dependent steps) and either a constant or another
earlier variable, with ``+`` or ``-``; every value stays in 0..99. The prompt lists the lines
in a random order, so the solution has to find an order in which every variable is known
before it is used (variable tracking), substitute values and add or subtract two-digit
numbers. The reward checks only the final answer after ``#``: any order, any working.

Training and held-out problems are disjoint by construction: a problem's canonical form (its
computation in dependency order, with variables renamed by position and the operands of
``+`` sorted) is hashed, and one hash class in :data:`HELDOUT_CLASSES` is held out. So no
held-out problem appears in training up to renaming, reordering of lines or commuting a sum.

The tokenizer is character level (one token per character, a real ``PreTrainedTokenizerFast``
saved with the model).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

VARIABLES = "abcdefghijklmnopqrstuvwxyz"
CHARACTERS = VARIABLES + "0123456789+-=;?>#"
PAD, EOS = "<pad>", "<eos>"
ANSWER_MARK = "#"
PROMPT_END = ">"
MAX_VALUE = 99
HELDOUT_CLASSES = 8  #: one canonical-hash class in 8 is held out

_ANSWER = re.compile(r"#(\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    """One program: ``prompt`` (shuffled lines, query), ``solution`` (the lines in dependency
    order, worked), ``answer`` (the final variable's value), ``steps`` (its difficulty)."""

    prompt: str
    solution: str
    answer: int
    steps: int
    key: str  #: canonical form (see module docstring)

    @property
    def text(self) -> str:
        return self.prompt + self.solution


def _new_problem(rng: random.Random, steps: int) -> Problem:
    """A random ``steps``-step chain (see the module docstring)."""
    names = rng.sample(VARIABLES, steps + 2)
    # Each line: (name, first operand, op, second operand); operands are ("var", i) or ("const", c).
    values: list[int] = []
    lines: list[tuple] = []
    canonical: list[str] = []
    first = rng.randint(10, MAX_VALUE)
    values.append(first)
    lines.append((names[0], ("const", first), None, None))
    canonical.append(str(first))
    seeds = 1
    # A second leaf variable half the time, so some steps combine two variables.
    if steps >= 2 and rng.random() < 0.5:
        second = rng.randint(10, MAX_VALUE)
        values.append(second)
        lines.append((names[1], ("const", second), None, None))
        canonical.append(str(second))
        seeds = 2
    while len(values) < seeds + steps:
        i = len(values)
        for _ in range(100):
            prev = i - 1
            if i >= 2 and rng.random() < 0.4:
                other = ("var", rng.randrange(0, i - 1))
                other_value = values[other[1]]
            else:
                other_value = rng.randint(2, MAX_VALUE) if rng.random() < 0.6 else rng.randint(2, 9)
                other = ("const", other_value)
            ops = [
                op
                for op, v in (("+", values[prev] + other_value), ("-", values[prev] - other_value))
                if 0 <= v <= MAX_VALUE
            ]
            if ops:
                break
        else:  # pragma: no cover - 100 draws without a valid op is practically impossible
            raise RuntimeError("could not extend the chain")
        op = rng.choice(ops)
        value = values[prev] + other_value if op == "+" else values[prev] - other_value
        values.append(value)
        lines.append((names[i], ("var", prev), op, other))
        refs = [f"v{prev}", f"v{other[1]}" if other[0] == "var" else str(other[1])]
        canonical.append(f"{'+'.join(sorted(refs))}" if op == "+" else f"{refs[0]}-{refs[1]}")
    final = len(values) - 1

    def operand(ref: tuple) -> str:
        return names[ref[1]] if ref[0] == "var" else str(ref[1])

    def literal(ref: tuple) -> str:
        return str(values[ref[1]]) if ref[0] == "var" else str(ref[1])

    source = [
        f"{name}={operand(a)}" if op is None else f"{name}={operand(a)}{op}{operand(b)}"
        for name, a, op, b in lines
    ]
    worked = [
        f"{name}={literal(a)}" if op is None else f"{name}={literal(a)}{op}{literal(b)}={values[i]}"
        for i, (name, a, op, b) in enumerate(lines)
    ]
    shuffled = source[:]
    while len(shuffled) > 1 and shuffled == source:
        rng.shuffle(shuffled)
    prompt = ";".join(shuffled) + f";?{names[final]}{PROMPT_END}"
    solution = ";".join(worked) + f";{ANSWER_MARK}{values[final]}"
    return Problem(prompt, solution, values[final], steps, "|".join(canonical))


def is_heldout(problem: Problem) -> bool:
    """Whether ``problem``'s canonical form falls in the held-out hash class."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_CLASSES == 0


def generate(
    n: int, seed: int, difficulties: tuple[int, ...], *, heldout: bool, distinct: bool = False
) -> list[Problem]:
    """``n`` problems from stream ``seed``, difficulties cycling through ``difficulties`` (so each
    appears equally often), all training problems (``heldout=False``) or all held-out ones.
    ``distinct``: no two share a canonical form (for evaluation sets)."""
    rng = random.Random(f"{seed}:{heldout}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        steps = difficulties[len(out) % len(difficulties)]
        problem = _new_problem(rng, steps)
        if is_heldout(problem) != heldout or (distinct and problem.key in seen):
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


def parse_answer(completion: str) -> int | None:
    """The integer after the final ``#`` of a completion, or None (no answer: wrong)."""
    match = _ANSWER.search(completion.replace(EOS, "").replace(PAD, ""))
    return int(match.group(1)) if match else None


def is_correct(completion: str, answer: int) -> bool:
    return parse_answer(completion) == answer


def copied_fraction(prompt: str, completion: str, n: int = 4) -> float:
    """Fraction of the completion's characters that lie inside some ``n``-character substring
    of the completion that also occurs in the prompt (text copied rather than produced)."""
    if not completion:
        return 0.0
    covered = [False] * len(completion)
    for i in range(len(completion) - n + 1):
        if completion[i : i + n] in prompt:
            for j in range(i, i + n):
                covered[j] = True
    return sum(covered) / len(completion)


def build_tokenizer():
    """The character-level tokenizer: a ``PreTrainedTokenizerFast`` (pad id 0, eos id 1)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters back to text, without spaces between them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    tokenizer.padding_side = "left"
    return tokenizer


def decode(tokenizer, ids) -> str:
    """Completion text without pad/eos tokens."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def save_tokenizer(folder: str | Path) -> None:
    build_tokenizer().save_pretrained(str(folder))
