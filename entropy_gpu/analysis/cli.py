"""``entropy-gpu grad-report`` (registered by ``entropy_gpu.cli``): the exact parameter-gradient
measure against the cheap ones on sampled responses, and with ``--fidelity`` the report on the
fast estimates (``grad_report.py``). The SIA commands register in ``sia/cli.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli.support import (
    UsageError,
    check_device,
    check_model,
    common_options,
    positive_float,
    positive_int,
    writable_dir,
)


def register(subparsers) -> None:
    from ..param_grad.model_parts import DEFAULT_PARAM_PATTERNS, NORMS

    grad = subparsers.add_parser(
        "grad-report", parents=[common_options()],
        help="exact parameter-gradient measure vs the cheap ones on sampled responses",
        description="Sample responses, compute the exact per-token parameter-gradient "
                    "measure and compare the cheap logit-space measures with it; writes "
                    "summary.json, tokens.jsonl and PNG plots to --out.")
    grad.add_argument("--model", default="smollm2",
                      help="'smollm2' (bundled), a local model path, or a hub name in the local cache")
    grad.add_argument("--out", required=True, help="folder for summary.json, tokens.jsonl and PNG plots")
    grad.add_argument("--prompts", type=int, default=6, help="number of GSM8K test questions (first N)")
    grad.add_argument("--prompt", action="append", help="a prompt (repeatable); replaces the GSM8K questions")
    grad.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    grad.add_argument("--temperature", type=float, default=0.7, help="sampling and token_stats temperature")
    grad.add_argument("--seed", type=int, default=0, help="sampling seed (response i uses seed + i)")
    grad.add_argument("--params", nargs="+", default=list(DEFAULT_PARAM_PATTERNS),
                      help="fnmatch patterns over parameter names (default: q/k/v/o projections)")
    grad.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                      help="matrix norms per parameter")
    grad.add_argument("--token-batch-size", type=int, default=1, help="tokens per vmapped backward")
    grad.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    grad.add_argument("--threads", type=int,
                      help="torch CPU threads (default, or 0: the cores left idle by the current load, at "
                           "least 1; on an oversubscribed machine OpenMP threads wait on each other)")
    grad.add_argument("--quiet", action="store_true", help="no progress bars")
    grad.add_argument("--overwrite", action="store_true",
                      help="start over when --out holds records of a run with other arguments "
                           "(default: resume a run with the same arguments, refuse a different one)")
    _add_fidelity_options(grad.add_argument_group("fidelity of the fast measures (--fidelity)"))
    grad.set_defaults(func=cmd_grad_report, resumable=True)


def _add_fidelity_options(fid) -> None:
    fid.add_argument("--fidelity", action="store_true",
                     help="compare the forward-mode estimate, same-position and last-layers candidates "
                          "and the logit-space measures (and the exact --norms, from the same exact "
                          "pass) with the exact Frobenius measure; writes fidelity.json/.md, frontier.png")
    fid.add_argument("--samples-per-prompt", type=int, default=4,
                     help="responses sampled per prompt (seeds --seed, --seed + 1, ...)")
    fid.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                     help="estimator directions (nested: one run of max(ks) directions)")
    fid.add_argument("--last-layers", type=int, nargs="+", default=[2],
                     help="exact on the last N layers only")
    fid.add_argument("--directions-per-pass", type=int, default=4,
                     help="forward-mode estimator: directions batched into one forward pass (more: "
                          "fewer passes, more memory; the estimate is the same)")
    fid.add_argument("--twin", action="store_true",
                     help="also measure a random-weight twin on the same responses")
    fid.add_argument("--from-partial", nargs="+", metavar="JSONL",
                     help="only write the report from the partial.jsonl files of earlier or parallel runs")
    fid.add_argument("--twin-only", action="store_true", help="measure only the random-weight twin (on the "
                                                                 "model's samples), e.g. in a parallel run")


def cmd_grad_report(args: argparse.Namespace) -> int:
    from .grad_report import gsm8k_questions, run_grad_report

    device = _checked_device(args)
    if args.from_partial:  # a report from earlier runs' rows: no model needed
        return _report_from_partial(args)
    check_model(args.model, args.allow_download)
    _check_param_patterns(args)
    from ..cpu_threads import use_cpu_threads

    threads_line = use_cpu_threads(args.threads, device)
    if threads_line and not args.quiet:
        print(threads_line)
    prompts = args.prompt or gsm8k_questions(args.prompts)
    if args.fidelity:
        from .models import load_model

        model, tokenizer = load_model(args.model, device=str(device), allow_download=args.allow_download)
        return _fidelity_report(args, model, tokenizer, prompts)
    # Resumable; data parallel under torchrun (rank 0 writes and reports).
    from .models import library_progress_bars

    with library_progress_bars(not args.quiet):
        report = run_grad_report(args.model, prompts, args.out, device=str(device),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed, param_patterns=args.params, norms=args.norms,
                                 token_batch_size=args.token_batch_size, progress=not args.quiet,
                                 overwrite=args.overwrite, allow_download=args.allow_download)
    if report is None:
        return 0
    print(f"wrote {args.out}/summary.json, tokens.jsonl, scatter.png, per_layer.png, per_response.png")
    config = report["config"]
    print(f"{config['n_tokens']} tokens, {config['n_responses']} responses; "
          f"across tokens, cheap vs exact total:")
    for measure, by_norm in report["pooled"].items():
        cells = "  ".join(f"{e[6:]}: r={c['pearson']} rho={c['spearman']}" for e, c in by_norm.items())
        print(f"  {measure:18} {cells}")
    return 0


def _check_param_patterns(args: argparse.Namespace) -> None:
    """``--params`` patterns that match no parameter of ``--model``: a user error before the
    model loads, from its config built on the meta device (no weights read). The default
    patterns are not pre-checked (the load checks them), so the common run pays nothing."""
    from ..param_grad.model_parts import DEFAULT_PARAM_PATTERNS, select_parameters
    from .models import meta_model

    if list(args.params) == list(DEFAULT_PARAM_PATTERNS):
        return
    try:
        skeleton = meta_model(args.model, allow_download=args.allow_download)
    except (OSError, ValueError, KeyError):  # a config transformers cannot build: the load will say
        return
    try:
        select_parameters(skeleton, args.params)
    except ValueError as exc:
        raise UsageError(f"--params: {exc}") from None


def _checked_device(args: argparse.Namespace):
    """Every check that needs no model (the model is checked after ``--from-partial``); the device."""
    device = check_device(args.device)
    for flag, value in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens),
                        ("--token-batch-size", args.token_batch_size)):
        positive_int(flag, value)
    positive_int("--threads", args.threads, minimum=0)
    positive_float("--temperature", args.temperature)
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    for flag, value in (("--samples-per-prompt", args.samples_per_prompt),
                        ("--directions-per-pass", args.directions_per_pass), *(("--ks", k) for k in args.ks),
                        *(("--last-layers", n) for n in args.last_layers)):
        positive_int(flag, value)
    writable_dir(args.out, "--out")
    return device


def _report_from_partial(args: argparse.Namespace) -> int:
    from .grad_report import fidelity_report_from_partial, write_fidelity_report

    for path in args.from_partial:
        if not Path(path).is_file():
            raise UsageError(f"--from-partial: {path} is not a file")
    report = fidelity_report_from_partial(args.from_partial, model_name=args.model)
    for path in write_fidelity_report(report, args.out):
        print(f"wrote {path}")
    return 0


def _fidelity_report(args: argparse.Namespace, model, tokenizer, prompts: list[str]) -> int:
    from .grad_report import fidelity_report, write_fidelity_report
    from .models import random_twin

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = fidelity_report(
        model, tokenizer, prompts, model_name=args.model, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, ks=args.ks,
        last_layers=args.last_layers, param_patterns=args.params,
        directions_per_pass=args.directions_per_pass, exact_norms=args.norms,
        twin=random_twin(model, args.seed) if args.twin or args.twin_only else None, twin_only=args.twin_only,
        partial=out / "partial.jsonl",
        progress=not args.quiet)
    report["config"]["command"] = "entropy-gpu " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    for path in write_fidelity_report(report, out):
        print(f"wrote {path}")
    print(Path(out / "fidelity.md").read_text())
    return 0
