"""Cost of the parameter-gradient measures at RL lengths (256 to 2,048 tokens per sequence),
side by side with one no-grad forward and one policy forward+backward of the same sequence.

The fidelity report (``entropy-gpu grad-report --fidelity``) times every measure on responses
of about 100 tokens. Their costs grow differently with the sequence length ``T``: the exact
measure is one backward per response token over that token's prefix (``~T^2``), the
forward-mode estimate ``k`` forward-mode passes over the sequence (``~k T``), same-position one
forward+backward (``~T``). This script measures them at the lengths RL runs use:

- ``forward``: one no-grad forward (the unit of "forward equivalents");
- ``fwd_bwd``: one policy forward + backward of the summed response log-probs (the loss pass
  of a GRPO step: the yardstick of the issue's "at most one forward+backward");
- ``same_position``: :func:`same_position_grad_norms`, Frobenius;
- ``one_hop``: the same with ``one_hop_values=True`` (CorR-PO's ``method="one_hop"``);
- ``calibrated``: the features of the calibrated measure (a same-position pass that also
  records attention entropies; the calibration's weights cost nothing);
- ``forward_mode_k<directions_per_pass>``: one forward-mode pass of ``--directions-per-pass``
  directions; ``k`` directions cost ``k / directions_per_pass`` of it (the passes are identical,
  so this is a multiplication, not a model);
- ``exact``: :func:`logit_param_grad_norms`, Frobenius, timed on ``--exact-tokens`` response
  tokens at the start and at the end of the response (shortest and longest prefixes); the
  whole response's cost is their mean per token times the response length (the per-token cost
  grows about linearly with the prefix, so the mean of the two ends is its average; the
  attention part grows faster, which this slightly underestimates).

One sequence of random token ids (the cost does not depend on them), prompt ``--prompt-tokens``
long, the rest response. Writes ``<out>.json`` and ``<out>.md``::

    .venv/bin/python benchmarks/param_grad_cost_vs_length.py --model smollm2 \\
        --lengths 256 512 1024 2048 --threads 2 --out benchmarks/results/cpu-param-grad-cost-vs-length
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from entropy_gpu import estimate_logit_param_grad_norms, logit_param_grad_norms, token_stats
from entropy_gpu.param_grad.calibrated import calibration_features
from entropy_gpu.param_grad.estimate import same_position_grad_norms


def _seconds(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


MEASURES = ("forward", "fwd_bwd", "same_position", "one_hop", "calibrated", "forward_mode", "exact")


def measure_length(model: torch.nn.Module, length: int, prompt_tokens: int, *, directions_per_pass: int,
                   exact_tokens: int, seed: int = 0, measures: tuple[str, ...] = MEASURES) -> dict:
    """Seconds of ``measures`` on one sequence of ``length`` tokens (see the module docstring)."""
    if not 0 < prompt_tokens < length:
        raise ValueError(f"need 0 < prompt tokens ({prompt_tokens}) < length ({length})")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size, (1, length), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt_tokens:] = True
    n_response = length - prompt_tokens
    out: dict = {"length": length, "prompt_tokens": prompt_tokens, "response_tokens": n_response}

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits[0, prompt_tokens - 1:-1]
        token_stats(logits, ids[0, prompt_tokens:], stats=("logprob",)).logprob.sum().backward()
        model.zero_grad(set_to_none=True)

    forward()  # warm-up (allocator, thread pool)
    if "forward" in measures:
        out["forward"] = _seconds(forward, repeats=2)
    if "fwd_bwd" in measures:
        out["fwd_bwd"] = _seconds(fwd_bwd)
    if "same_position" in measures:
        out["same_position"] = _seconds(lambda: same_position_grad_norms(model, ids, mask, norms="fro",
                                                                         check_logits=False))
    if "one_hop" in measures:
        out["one_hop"] = _seconds(lambda: same_position_grad_norms(model, ids, mask, norms="fro",
                                                                   check_logits=False, one_hop_values=True))
    if "calibrated" in measures:
        out["calibrated"] = _seconds(lambda: calibration_features(model, ids, mask, check_logits=False))
    if "forward_mode" in measures:
        out[f"forward_mode_k{directions_per_pass}"] = _seconds(lambda: estimate_logit_param_grad_norms(
            model, ids, mask, k=directions_per_pass, directions_per_pass=directions_per_pass,
            check_logits=False))
    if "exact" not in measures:
        return out
    n = min(exact_tokens, n_response)
    first = _seconds(lambda: logit_param_grad_norms(model, ids[0, :prompt_tokens + n], prompt_tokens,
                                                    norms="fro"))
    last = _seconds(lambda: logit_param_grad_norms(model, ids[0], length - n, norms="fro"))
    out["exact_first_tokens"], out["exact_last_tokens"], out["exact_tokens_timed"] = first, last, n
    out["exact"] = (first + last) / (2 * n) * n_response
    return out


def table(rows: list[dict], directions_per_pass: int, ks: list[int]) -> str:
    """Markdown: seconds, and multiples of one policy forward+backward (n/a: not measured)."""
    fm = f"forward_mode_k{directions_per_pass}"
    head = ["T (prompt + response)", "forward", "policy fwd+bwd", "same-position", "one-hop", "calibrated"]
    head += [f"forward-mode k={k}" for k in ks] + ["exact (extrapolated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['length']} ({r['prompt_tokens']} + {r['response_tokens']})",
                 _cell(r, "forward", ratio=False), _cell(r, "fwd_bwd", ratio=False),
                 _cell(r, "same_position"), _cell(r, "one_hop"), _cell(r, "calibrated")]
        cells += [_cell(r, fm, k / directions_per_pass) for k in ks] + [_cell(r, "exact")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str, times: float = 1.0, ratio: bool = True) -> str:
    """``row[key] * times`` seconds, with its multiple of ``fwd_bwd`` where both exist."""
    if key not in row:
        return "n/a"
    seconds = row[key] * times
    multiple = f" ({seconds / row['fwd_bwd']:.2g}x)" if ratio and "fwd_bwd" in row else ""
    return f"{seconds:.3g} s{multiple}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2, tiny (random, for a smoke run) or a path")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--directions-per-pass", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64], help="forward-mode k to report")
    parser.add_argument("--exact-tokens", type=int, default=8, help="exact: tokens timed at each end")
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    # User errors before the (slow) model load: one line, exit 2.
    if not all(0 < args.prompt_tokens < length for length in args.lengths):
        parser.error(f"every --lengths value must exceed --prompt-tokens ({args.prompt_tokens}) > 0")
    if min(args.directions_per_pass, args.exact_tokens, *args.ks) < 1 or args.threads < 0:
        parser.error("--directions-per-pass, --exact-tokens and --ks must be >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from entropy_gpu.analysis.models import tiny_llama

        model = tiny_llama(vocab_size=512, hidden_size=32, layers=2, heads=2)
    else:
        from entropy_gpu.analysis.models import load_model

        model = load_model(args.model)[0]
    model.eval()
    options = {"directions_per_pass": args.directions_per_pass, "exact_tokens": args.exact_tokens,
               "measures": tuple(args.measures)}
    # Warm-up on a short sequence: the first forward-mode pass and backward pay one-off costs.
    measure_length(model, args.prompt_tokens + 2 * args.exact_tokens, args.prompt_tokens, **options)
    rows = []
    for length in args.lengths:
        rows.append(measure_length(model, length, args.prompt_tokens, **options))
        print(json.dumps(rows[-1]), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    report = {"model": args.model, "date": datetime.date.today().isoformat(), "commit": commit,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "directions_per_pass": args.directions_per_pass,
              "command": "python benchmarks/param_grad_cost_vs_length.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(rows, args.directions_per_pass, args.ks)
    Path(f"{out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
