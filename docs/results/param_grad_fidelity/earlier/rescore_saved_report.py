"""Score the fast candidates on the responses of the committed exact report
(docs/results/param_grad: SmolLM2, first 8 GSM8K test questions, 740 tokens, exact L1 /
Frobenius / nuclear already computed) without recomputing the exact measure.

Rebuilds each sequence as chat-template prompt + the saved response tokens, checks that the
model's own logits of those tokens equal the saved raw logits, then computes the same-position
and last-2-layers candidates (and optionally the forward-mode estimate) and writes rows in the
``partial.jsonl`` format of ``entropy-gpu grad-report --fidelity`` (so ``--from-partial``
summarizes them). Usage::

    PYTHONSAFEPATH=1 python docs/results/param_grad_fidelity/earlier/rescore_saved_report.py \\
        OUT.jsonl [--ks 4 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from entropy_gpu.analysis.grad_report import gsm8k_questions, prompt_ids
from entropy_gpu.analysis.models import load_model
from entropy_gpu.param_grad.estimate import (
    estimate_logit_param_grad_norms,
    last_layers_patterns,
    same_position_grad_norms,
)
from entropy_gpu.param_grad.exact import logit_param_grad_norms

SAVED = Path(__file__).resolve().parent.parent / "param_grad" / "tokens.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ks", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in SAVED.read_text().splitlines()]
    model, tokenizer = load_model()
    questions = gsm8k_questions(8)
    with open(args.out, "w") as sink:
        for i, question in enumerate(questions):
            saved = [r for r in rows if r["response"] == i]
            prompt = prompt_ids(tokenizer, question)
            assert saved[0]["position"] == prompt.numel(), "prompt length differs from the saved report"
            ids = torch.cat([prompt, torch.tensor([r["token_id"] for r in saved])])
            start = prompt.numel()
            mask = torch.zeros(ids.numel(), dtype=torch.bool)
            mask[start:] = True
            seconds = {}
            t = time.perf_counter()
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, start - 1:-1].gather(
                    -1, ids[start:, None])[:, 0]
            seconds["forward"] = time.perf_counter() - t
            saved_logits = torch.tensor([r["raw_logit"] for r in saved])
            assert torch.allclose(logits, saved_logits, atol=1e-3, rtol=1e-4), \
                "not the saved model / responses"
            t = time.perf_counter()
            same = same_position_grad_norms(model, ids, mask, norms="fro").total["fro"][0, start:]
            seconds["same_position_fro"] = time.perf_counter() - t
            t = time.perf_counter()
            last2 = logit_param_grad_norms(model, ids, start,
                                           param_patterns=last_layers_patterns(model, n_layers=2),
                                           norms="fro").total["fro"]
            seconds["last2_fro"] = time.perf_counter() - t
            cols = {k: [r[k] for r in saved] for k in ("position", "token_id", "entropy", "exact_fro",
                                                      "exact_l1",
                                                      "exact_nuclear", "nll_grad_norm", "entropy_grad_norm",
                                                      "hidden_norm", "lm_head_grad_norm")}
            cols["same_position_fro"] = same.tolist()
            cols["last2_fro"] = last2.tolist()
            if args.ks:
                est = estimate_logit_param_grad_norms(model, ids, mask, k=max(args.ks), seed=i,
                                                      directions_per_pass=4,
                                                      check_logits=False)
                for k in args.ks:
                    cols[f"estimate_k{k}"] = est.fro(k)[0, start:].tolist()
                    seconds[f"estimate_k{k}"] = float(sum(est.seconds[: -(-k // 4)]))
            sink.write(json.dumps({"model": "model", "response": i, "seconds": seconds, **cols}) + "\n")
            sink.flush()
            print(f"response {i}: {len(saved)} tokens, same-position vs exact Pearson "
                  f"{np.corrcoef(cols['same_position_fro'], cols['exact_fro'])[0, 1]:+.2f}", flush=True)


if __name__ == "__main__":
    main()
