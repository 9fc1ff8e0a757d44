"""A reasoning testbed cheap enough for many seeds on a CPU: a tiny Llama trained from scratch
on chained two-digit arithmetic with shuffled lines (``task``), SFT checkpoints (``sft``), the
papers' observational claims across them (``observe``), GRPO arms that differ only in the reward
term (``rl``), and a report from the raw records (``report``). One command runs it all:
``python -m entropy_gpu.experiments.reasoning_testbed --config CONFIG --out DIR``.
Results: docs/results/corrpo_testbed/."""
