"""verl reward function of the ``null`` arm: GSM8K's rule reward + ``coef * N(0, spread^2)``.

Passed to verl by run_corrpo_gsm8k.sh (ARMS=null) as ``reward.custom_reward_function``:

    reward.custom_reward_function.path=examples/verl/null_reward.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.coef=0.1
    +reward.custom_reward_function.reward_kwargs.spread=S    # std of rho on the starting policy
    +reward.custom_reward_function.reward_kwargs.seed=0

The task reward is verl's own (``default_compute_score``, the other arms' reward). The noise is
added to training rows only (``extra_info["split"] == "train"``, as prepare_gsm8k.py writes
them): validation scores stay the task reward. The draw of a completion depends on (seed,
problem index, the response text, how many times this process has scored that same response
to that problem) only, so it does not depend on the order verl's reward workers score in, and
two identical responses in one group get independent draws.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np

_SEEN: Counter = Counter()  # (seed, index, response) -> times scored in this process


def null_draw(seed: int, index: Any, response: str, occurrence: int) -> float:
    """One standard normal draw, a function of its arguments only."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{occurrence}\x00{response}".encode()).digest()
    return float(np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal())


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  coef: float = 0.1, spread: float = 0.0, seed: int = 0, **kwargs: Any) -> dict[str, float]:
    """``{"score": acc + coef * spread * z (training rows), "acc", "null_term"}``."""
    from verl.utils.reward_score import default_compute_score

    if not spread > 0:
        raise ValueError(f"null arm: spread must be > 0 (the std of rho on the starting policy), "
                         f"got {spread}")
    result = default_compute_score(data_source, solution_str, ground_truth, extra_info)
    acc = float(result["score"] if isinstance(result, dict) else result)
    info = extra_info or {}
    term = 0.0
    if info.get("split") == "train":
        key = (seed, info.get("index"), solution_str)
        _SEEN[key] += 1
        term = coef * spread * null_draw(seed, info.get("index"), solution_str, _SEEN[key])
    return {"score": acc + term, "acc": acc, "null_term": term}
