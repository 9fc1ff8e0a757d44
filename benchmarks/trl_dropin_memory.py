"""Peak memory of GRPO's training forward + backward, as TRL computes it and as the TRL drop-in
(``use_entropy_gpu_logprobs``) serves it, on CPU.

One ``_get_per_token_logps_and_entropies`` call with grad (the loss's forward: log-probs and
entropies of the completion tokens at the sampling temperature), then the backward of a
GRPO-like loss ``-(adv * logp).sum() / n - 0.01 * (entropy).sum() / n``, on a 1-layer Llama
with SmolLM2's hidden size 576 and a realistic vocabulary (the backbone is common to all, so
the differences are the LM heads). Implementations, each in a fresh process:

- ``trl``: TRL's own method (TRL >= 1.15: its chunked fused LM head, ``add_fused_lm_head``);
- ``entropy_gpu``: the drop-in's ``served_token_stats`` on TRL >= 1.15 (the backbone, then entropy_gpu's
  fused LM head on the completion positions);
- ``logits``: the drop-in's path on TRL 1.13/1.14 (materialized completion logits, then
  ``token_stats``), for scale.

Peak extra memory = the process's peak resident set (``ru_maxrss``) minus its resident set
after the model and inputs exist, with a fixed glibc mmap threshold (freed large blocks go back
to the OS, so the high-water mark is that of live allocations). Also reported: wall seconds of
the call + backward (one run, 1 thread; not a timing benchmark) and the largest log-prob
difference from ``trl``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_dropin_memory.py --vocab 49152 151936 \\
        --batch 8 --prompt 64 --completion 448 --out benchmarks/results/cpu-<date>-trl-dropin-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

IMPLS = ("trl", "entropy_gpu", "logits")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(impl: str, vocab: int, batch: int, prompt: int, completion: int) -> dict:
    """One measured call in this process (a fresh one per implementation)."""
    import torch
    from accelerate import Accelerator
    from trl import GRPOTrainer

    import entropy_gpu.integrations.trl as dropin
    from entropy_gpu.analysis.models import tiny_llama

    torch.set_num_threads(1)
    temperature = 0.9
    model = tiny_llama(vocab_size=vocab, hidden_size=576, layers=1, heads=9).train()
    if dropin.TRL_FUSED_LM_HEAD:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    # What the two methods read from a GRPOTrainer: the accelerator (autocast, unwrap), temperature, args.
    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), temperature=temperature,
                              use_liger_kernel=False, args=SimpleNamespace(cast_lm_head_to_fp32=False),
                              _is_vlm=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt + completion), generator=g)
    mask = torch.ones_like(ids)
    mask[: batch // 2, -completion // 4:] = 0  # some completions end early (right padding)
    advantages = torch.randn(batch, 1, generator=g)

    def step(ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        if impl == "trl":
            logps, entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, ids, mask, keep, compute_entropy=True)
        elif impl == "entropy_gpu":
            call = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep, "compute_entropy": True}
            out = dropin.served_token_stats(trainer, model, call, ("logprob", "entropy"))[0]
            logps, entropy = out["logprob"], out["entropy"]
        else:
            out = dropin.completion_token_stats(trainer, model, ids, mask, keep, ("logprob", "entropy"))
            logps, entropy = out["logprob"], out["entropy"]
        completion_mask = mask[:, -keep:].float()
        n = completion_mask.sum()
        loss = (-(advantages[: len(ids)] * logps * completion_mask).sum()
                - 0.01 * (entropy * completion_mask).sum()) / n
        loss.backward()
        model.zero_grad(set_to_none=True)
        return logps.detach()[completion_mask.bool()]

    step(ids[:1, -16:], mask[:1, -16:], 8)  # loads the code paths (imports, op registration) before measuring
    before = _rss_mib()
    start = time.perf_counter()
    logps = step(ids, mask, completion)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(logps, f"/tmp/trl_dropin_memory_{impl}_{vocab}.pt")
    return {"impl": impl, "vocab": vocab, "peak_extra_mib": round(peak - before, 1),
            "seconds": round(seconds, 2), "completion_tokens": logps.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=448)
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, vocab, batch, prompt, completion = args.child
        print(json.dumps(child(impl, int(vocab), int(batch), int(prompt), int(completion))))
        return
    import torch
    import trl

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    rows = []
    for vocab in args.vocab:
        for impl in args.impl:
            command = [sys.executable, __file__, "--child", impl, str(vocab),
                       str(args.batch), str(args.prompt), str(args.completion)]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{impl} V={vocab}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            reference = f"/tmp/trl_dropin_memory_trl_{vocab}.pt"
            if impl != "trl" and os.path.exists(reference):
                got = torch.load(f"/tmp/trl_dropin_memory_{impl}_{vocab}.pt")
                row["max_abs_logprob_diff_vs_trl"] = float((got - torch.load(reference)).abs().max())
            rows.append(row)
            print(row, flush=True)
    result = {"trl": trl.__version__, "torch": torch.__version__, "batch": args.batch, "prompt": args.prompt,
              "completion": args.completion, "hidden": 576, "layers": 1, "dtype": "fp32",
              "device": "2-core CPU, shared", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
