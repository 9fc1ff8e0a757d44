"""One rank of the 2-process CorR-PO run in tests/integrations/test_trl.py (launched by
torch.distributed.run, gloo on CPU). Saves, per generation batch, this rank's slice of
TRL's scored batch, the corrpo reward column and the weights that sampled it."""

import sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama
from entropy_gpu.corrpo.reward import CorrPOConfig
from entropy_gpu.integrations.trl import CorrPOTrainer


class Recording(CorrPOTrainer):
    def _generate_and_score_completions(self, inputs):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        out = super()._generate_and_score_completions(inputs)
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
        self.records.append({"weights": weights, "corrpo": self.corrpo_reward.last_term.clone(),
                             **{k: out[k].clone() for k in keys}})
        return out


def main(out_dir: str) -> None:
    tokenizer = load_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, layers=1, heads=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    # 4 completions per optimizer step over 2 ranks: every group straddles the ranks.
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4,
                      generation_batch_size=4,
                      max_completion_length=5, max_steps=1, temperature=0.9, bf16=False, report_to=[],
                      save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    trainer = Recording(model=model,
                        reward_funcs=lambda completion_ids, **k: [len(c) / 5 for c in completion_ids],
                        args=args,
                        train_dataset=Dataset.from_dict({"prompt": ["Tell a story", "Name a color"]}),
                        processing_class=tokenizer,
                        corrpo=CorrPOConfig(coef=0.5, measure="nll_grad_norm", pooling="group"))
    trainer.records = []
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"world": trainer.accelerator.num_processes, "records": trainer.records,
                "logs": trainer.state.log_history}, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        # Leave together and tear the group down (see corrpo_accelerate_worker.py).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
