"""Train with CorR-PO (correlation-regularized GRPO) through TRL.

The task is generated here: two-number additions, rewarded 1 for the right answer and
0.2 for answering with a number at all. Nothing is downloaded by the default run.

CPU, about a minute: a tiny randomly initialised Llama with the SmolLM2 tokenizer (read
from the bundled GGUF). It learns nothing useful; it shows the loop and the corrpo/* logs::

    .venv/bin/python examples/corrpo_trl.py

The script runs offline (it sets HF_HUB_OFFLINE and turns off the hub telemetry TRL
would send) unless ``--allow-download`` is given. A real model on a GPU (any causal LM
you have locally, or can download with ``--allow-download``; bf16)::

    python examples/corrpo_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --allow-download --steps 200 \\
        --batch-size 16 --num-generations 8 --max-completion-length 256 \\
        --learning-rate 1e-6 --bf16 --entropy-gpu-logprobs --output-dir runs/corrpo-qwen

``--model smollm2`` trains the bundled SmolLM2-135M-Instruct (slow on CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time

# Offline unless asked, decided before the hub libraries are imported (they read these
# variables at import time). HF_HUB_DISABLE_TELEMETRY stops TRL's usage report.
if "--allow-download" not in sys.argv[1:]:
    for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(_key, "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from entropy_gpu.analysis.models import load_model, load_tokenizer, tiny_llama
from entropy_gpu.cli.support import UsageError, writable_dir
from entropy_gpu.corrpo import GRADIENT_MEASURES, PARAM_GRAD_METHODS, CorrPOConfig, ParamGradMeasure
from entropy_gpu.integrations.trl import CorrPOTrainer


def addition_dataset(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]
                   for a, b in pairs],
        "answer": [str(a + b) for a, b in pairs],
    })


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct_answer(completions, answer, **kwargs) -> list[float]:
    """1 when the first number in the reply is the sum."""
    found = [re.search(r"-?\d+", _text(c)) for c in completions]
    return [float(m is not None and m.group() == a) for m, a in zip(found, answer)]


def answers_with_a_number(completions, **kwargs) -> list[float]:
    return [float(re.search(r"\d", _text(c)) is not None) for c in completions]


def build_model(name: str, bf16: bool, allow_download: bool = False):
    if name == "tiny":
        tokenizer = load_tokenizer()
        model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, layers=2, heads=4)
        with torch.no_grad():  # sharper next-token distributions than the default init's near-uniform ones
            model.get_output_embeddings().weight.mul_(12.0)
        return model, tokenizer
    model, tokenizer = load_model(name, dtype=torch.bfloat16 if bf16 else torch.float32,
                                  allow_download=allow_download)
    return model.train(), tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (random, CPU demo), 'smollm2', a local model path, or a hub name (cached, "
                        "or with --allow-download)")
    p.add_argument("--allow-download", action="store_true", help="let --model be downloaded from the hub")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="completions per device per step")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO group)")
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--coef", type=float, default=CorrPOConfig.coef, help="lambda, weight of phi(rho)")
    p.add_argument("--measure", choices=GRADIENT_MEASURES + ("param_grad_fro",), default="param_grad_fro",
                   help="param_grad_fro: the paper's parameter-gradient norm (see --method, --k)")
    p.add_argument("--method", choices=PARAM_GRAD_METHODS, default=ParamGradMeasure.method,
                   help="how param_grad_fro is computed (docs/corrpo.md)")
    p.add_argument("--k", type=int, default=ParamGradMeasure.k, help="forward_mode: random directions")
    p.add_argument("--pooling", choices=("completion", "group"), default=CorrPOConfig.pooling)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--entropy-gpu-logprobs", action="store_true",
                   help="serve TRL's log-prob passes with entropy_gpu")
    p.add_argument("--output-dir", default="/tmp/corrpo-example",
                   help="TRL's output folder (checked for writing before the model loads)")
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "num_generations", "max_completion_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_size % args.num_generations:
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of --num-generations "
                f"({args.num_generations})")
    for flag in ("learning_rate", "temperature"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
    # The regularizer's own checks, before any model is built.
    try:
        measure = (ParamGradMeasure(method=args.method, k=args.k) if args.measure == "param_grad_fro"
                   else args.measure)
    except ValueError as exc:
        p.error(f"--k {args.k}: {exc}")  # (--method is one of its choices)
    try:
        corrpo = CorrPOConfig(coef=args.coef, pooling=args.pooling, measure=measure)
    except ValueError as exc:
        p.error(f"--coef {args.coef}: {exc}")  # (--pooling, --measure are choices)
    try:
        writable_dir(args.output_dir, "--output-dir")
    except UsageError as exc:
        p.error(str(exc))
    if args.model != "tiny":
        from entropy_gpu.analysis.models import resolve_model
        try:
            resolve_model(args.model, allow_download=args.allow_download)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
            p.error(f"--model {args.model}: {exc}")

    model, tokenizer = build_model(args.model, args.bf16, args.allow_download)
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate, temperature=args.temperature, bf16=args.bf16,
        reward_weights=[1.0, 0.2], logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = CorrPOTrainer(
        model=model, reward_funcs=[correct_answer, answers_with_a_number], args=config,
        train_dataset=addition_dataset(args.steps * args.batch_size), processing_class=tokenizer,
        corrpo=corrpo,
        entropy_gpu_logprobs=args.entropy_gpu_logprobs,
    )
    start = time.perf_counter()
    trainer.train()
    print(f"\n{args.steps} steps in {time.perf_counter() - start:.1f} s")
    keys = ("reward", "corrpo/correlation", "corrpo/inversion_rate", "corrpo/undefined_fraction",
            "corrpo/entropy", f"corrpo/{args.measure}", "corrpo/bonus")
    print("step  " + "  ".join(k.removeprefix("corrpo/") for k in keys))
    for h in trainer.state.log_history:
        if "reward" in h:
            print(f"{h['step']:4d}  " + "  ".join(f"{h.get(k, float('nan')):.3f}" for k in keys))


if __name__ == "__main__":
    main()
