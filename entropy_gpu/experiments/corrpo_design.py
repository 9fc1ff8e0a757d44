"""The CorR-PO experiment's design, shared by its runner (``corrpo_training``) and its report
(``corrpo_report``): the arms, the reward placements and the addition task's train/held-out
split. Plain Python, no torch: the report reads records without training anything."""

from __future__ import annotations

import random

ARMS = ("grpo", "corrpo", "corrpo_flipped", "entropy_bonus", "corrpo_logit", "null", "grpo_group",
        "corrpo_group")
#: Arms trained under TRL's default ``scale_rewards="group"`` whatever the config's placement.
GROUP_ARMS = ("grpo_group", "corrpo_group")
CORRPO_ARMS = ("corrpo", "corrpo_flipped", "corrpo_logit", "corrpo_group")
SCALE_REWARDS = ("none", "group", "batch")
ADDITION_SPLITS = ("pair", "ordered")
TASKS = ("addition", "gsm8k")


def addition_problems(heldout: int, seed: int = 1234, split: str = "pair") -> tuple[list[dict], list[dict]]:
    """All 81 single-digit additions ``a + b`` (a, b in 1..9), split into training and
    ``heldout`` held-out problems with a fixed shuffle (the same for every arm and seed).

    ``split="pair"`` (the default): split by unordered pair, so a held-out question's
    commuted form ``b + a`` is held out too and no held-out sum is seen in training in either
    order. The held-out list starts with one order of each held-out pair (pairs in shuffled
    order), then the commuted forms, so its first questions (the probe set) are distinct pairs.

    ``split="ordered"``: the split used by the records in docs/results/corrpo_training (the
    only one before the fix, and what their config meant): the 81 ordered pairs shuffled and
    the first ``heldout`` held out. It leaks: 13 of its 16 held-out questions have their
    commuted form among the training prompts. Kept to read and reproduce those records.
    """
    if split == "ordered":
        pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
        random.Random(seed).shuffle(pairs)
        held_pairs, train_pairs = pairs[:heldout], pairs[heldout:]
    elif split == "pair":
        rng = random.Random(seed)
        unordered = [(a, b) for a in range(1, 10) for b in range(a, 10)]
        rng.shuffle(unordered)
        need, taken = heldout, []
        doubles_left = sum(a == b for a, b in unordered)
        for a, b in unordered:
            doubles_left -= a == b
            size = 1 if a == b else 2
            # A double (a + a) makes the count left odd; take one at an even count only while
            # another double remains to make it even again, so the count is always reached.
            if size > need or (a == b and need % 2 == 0 and doubles_left == 0):
                continue
            taken.append((a, b) if rng.random() < 0.5 else (b, a))
            need -= size
            if need == 0:
                break
        if need:
            raise ValueError(f"heldout={heldout}: cannot hold out that many questions by pair")
        held_pairs = taken + [(b, a) for a, b in taken if a != b]
        held = set(held_pairs)
        train_pairs = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a, b) not in held]
        rng.shuffle(train_pairs)
    else:
        raise ValueError(f"split must be 'pair' or 'ordered', got {split!r}")
    problem = lambda a, b: {"question": f"What is {a} + {b}? Answer with the number.", "answer": str(a + b)}
    return [problem(a, b) for a, b in train_pairs], [problem(a, b) for a, b in held_pairs]
