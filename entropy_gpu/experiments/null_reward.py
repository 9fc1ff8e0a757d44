"""The ``null`` arm's reward column, shared by the reasoning testbed (``reasoning_testbed/rl.py``)
and the CorR-PO training runner (``corrpo_training.py``): one design for both.

Weighted by ``coef``, it adds ``coef * N(0, spread^2)`` per completion, ``spread`` the std of rho
on the starting policy: a term of CorR-PO's size that carries no information.
"""

from __future__ import annotations

import torch


class NullReward:
    """``null`` arm: an independent ``N(0, spread^2)`` draw per completion, from its own
    generator (seeded per run; the training RNG stream is untouched)."""

    __name__ = "null"

    def __init__(self, spread: float, seed: int) -> None:
        self.spread = spread
        self.generator = torch.Generator().manual_seed(1_000_003 * (seed + 1))
        self.calls = 0

    def reseed_for_step(self, step: int, seed: int) -> None:
        """Resuming: the draws of a step depend on (seed, step) only."""
        self.generator.manual_seed(1_000_003 * (seed + 1) + step)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return (
            torch.randn(len(completions), generator=self.generator, dtype=torch.float64) * self.spread
        ).tolist()
