"""One CorR-PO run for test_scale_corrpo.py: launched by ``accelerate launch --num_processes 2
--cpu`` (gloo), or called in one process. Every run sees the same 4 completions: TRL's
``rollout_func`` hook returns fixed token ids, row ``i`` of the global generation batch
getting completion ``i`` whichever process holds it, so the runs differ only in how the
GRPO group is split over processes. The main process saves TRL's completion log (global
rows: completions, per-function rewards, advantages) and the logged metrics."""

import sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama
from entropy_gpu.corrpo.reward import CorrPOConfig
from entropy_gpu.integrations.trl import CorrPOTrainer

TEXTS = ["Blue, like the sky at noon.", "Red.", "A green leaf in the rain, and a grey stone.",
         "Yellow, mostly yellow."]


def fixed_rollout(prompts, trainer):
    """Completion ``TEXTS[i]`` (plus EOS) for global row ``i``; this process holds rows
    ``[process_index * n, (process_index + 1) * n)``."""
    tokenizer = trainer.processing_class
    rows = len(prompts)
    first = trainer.accelerator.process_index * rows
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(TEXTS[(first + j) % len(TEXTS)], add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id] for j in range(rows)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def run(out_dir: str, world_size: int) -> dict | None:
    tokenizer = load_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, layers=1, heads=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    # One GRPO group of 4 completions per step; with 2 processes it straddles them (2 + 2).
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4 // world_size, num_generations=4,
                      generation_batch_size=4, max_completion_length=16, max_steps=1, temperature=0.9,
                      bf16=False, report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                      disable_tqdm=True, log_completions=True)

    def length(completion_ids, **kwargs):
        return [len(c) / 16 for c in completion_ids]

    trainer = CorrPOTrainer(model=model, reward_funcs=length, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["Name a color."] * 2}),
                            processing_class=tokenizer, corrpo=CorrPOConfig(coef=0.5, pooling="group"),
                            rollout_func=fixed_rollout)
    trainer.train()
    if not trainer.accelerator.is_main_process:
        return None
    result = {"world": trainer.accelerator.num_processes, "completions": list(trainer._logs["completion"]),
              "rewards": {k: list(v) for k, v in trainer._logs["rewards"].items()},
              "advantages": list(trainer._logs["advantages"]), "logs": trainer.state.log_history}
    torch.save(result, f"{out_dir}/result.pt")
    return result


if __name__ == "__main__":
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        run(sys.argv[1], int(os.environ.get("WORLD_SIZE", "1")))
    finally:
        # Leave together and tear the group down: a rank that exits while the other still
        # holds the group can abort in gloo's destructor ("terminate called without an
        # active exception", seen once in CI).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
