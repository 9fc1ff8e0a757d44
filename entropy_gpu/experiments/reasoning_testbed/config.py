"""The testbed's configuration: one JSON object, stored in ``OUT/config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

ARMS = (
    "grpo",
    "corrpo",
    "corrpo_flipped",
    "entropy_bonus",
    "null",
    "corrpo_exact",
    "grpo_group",
    "corrpo_group",
)
#: Reward placement per arm: TRL's ``scale_rewards``. "none" everywhere but the two "_group" arms,
#: which show what TRL's default "group" does to the same term (docs/results/corrpo_testbed/PLAN.md).
GROUP_ARMS = ("grpo_group", "corrpo_group")
MEASURES = ("same_position", "one_hop", "exact")


@dataclass
class TestbedConfig:
    """Every stage of the testbed: SFT, observation across SFT checkpoints, RL arms, report."""

    # -- task
    difficulties: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    max_new_tokens: int = 96
    # -- model and SFT
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    sft_steps: int = 2000
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sft_save_every: int = 250
    sft_seed: int = 0
    start_step: int = 0  #: SFT checkpoint that starts RL; 0: the last (sft_steps)
    # -- observation (across SFT checkpoints)
    observe_probe_problems: int = 64  #: distinct held-out problems, one fresh sample each
    observe_heldout: int = 1000
    observe_sia_problems: int = 64
    # -- RL
    arms: list[str] = field(
        default_factory=lambda: [
            "grpo",
            "corrpo",
            "corrpo_flipped",
            "entropy_bonus",
            "null",
            "grpo_group",
            "corrpo_group",
        ]
    )
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    rl_steps: int = 200
    prompts_per_step: int = 8
    num_generations: int = 4
    learning_rate: float = 5e-5
    temperature: float = 1.0
    coef: float = 0.1
    measure: str = "same_position"  #: the corrpo arms' measure; "corrpo_exact" always uses "exact"
    save_every: int = 20  #: RL checkpoints (resume)
    eval_every: int = 50
    heldout_n: int = 1000  #: held-out problems of each RL evaluation
    probe_problems: int = 64  #: distinct probe problems for the exact rho at each evaluation
    threads: int = 1

    def __post_init__(self) -> None:
        ints = (
            "max_new_tokens",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "sft_steps",
            "sft_batch_size",
            "sft_save_every",
            "observe_probe_problems",
            "observe_heldout",
            "observe_sia_problems",
            "rl_steps",
            "prompts_per_step",
            "save_every",
            "eval_every",
            "heldout_n",
            "probe_problems",
            "threads",
        )
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.num_generations, bool)
            or not isinstance(self.num_generations, int)
            or self.num_generations < 2
        ):
            raise ValueError(
                f"num_generations must be an int >= 2 (a GRPO group), got {self.num_generations!r}"
            )
        if not self.difficulties or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 20 for d in self.difficulties
        ):
            raise ValueError(
                f"difficulties must be a non-empty list of ints in 1..20, got {self.difficulties!r}"
            )
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names from {ARMS}, got {self.arms!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")
        for name in ("sft_learning_rate", "learning_rate", "temperature", "coef"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if (
            isinstance(self.start_step, bool)
            or not isinstance(self.start_step, int)
            or self.start_step < 0
            or (self.start_step and self.start_step % self.sft_save_every)
            or self.start_step > self.sft_steps
        ):
            raise ValueError(
                f"start_step must be 0 or a multiple of sft_save_every up to sft_steps, "
                f"got {self.start_step!r}"
            )
        if self.probe_problems > self.heldout_n or self.observe_probe_problems > self.observe_heldout:
            raise ValueError("probe problems are drawn from the held-out set: at most heldout_n")

    @property
    def start(self) -> int:
        """The SFT step whose checkpoint starts RL."""
        return self.start_step or self.sft_steps

    @classmethod
    def from_json(cls, text: str) -> TestbedConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the config file must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
