"""``python -m entropy_gpu.experiments.reasoning_testbed --config CONFIG.json --out DIR``

Runs every stage of the reasoning testbed into DIR, resuming whatever a killed run left:

1. SFT of a tiny Llama from scratch (``DIR/sft/checkpoint-N``), the starting policy copied to
   ``DIR/start``, with the CorR-PO term's spread on it (``calibration.json``) and its
   evaluation (``evaluation.json``, step 0 of every run);
2. observation across the SFT checkpoints (``DIR/observe/records.jsonl``);
3. the RL runs, seed by seed over all arms (``DIR/runs/ARM-sSEED/{steps,evals}.jsonl``);
4. the report (``summary.json``, ``summary.md``, plots), from the raw records.

``--shard I/N`` shares DIR between N processes (1 thread each): shard 0 runs stage 1, then the
observation and the runs are dealt out in turn; other shards wait for stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from .config import TestbedConfig


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m entropy_gpu.experiments.reasoning_testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="JSON file with TestbedConfig fields (unset fields: defaults)")
    p.add_argument("--out", help="output folder (a rerun with the same config resumes)")
    p.add_argument(
        "--shard",
        type=_parse_shard,
        default=(0, 1),
        metavar="I/N",
        help="this process's share of the work (default 0/1: everything)",
    )
    p.add_argument("--report-only", action="store_true", help="rebuild the report from DIR's records")
    p.add_argument("--print-config", action="store_true", help="print the default config as JSON and exit")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="DIR holds a run with another config: delete its records and start over",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    return p


def prepare_start(config: TestbedConfig, out: Path, progress: bool) -> Path:
    """Stage 1 (shard 0): SFT, the starting policy, calibration and its evaluation."""
    from entropy_gpu.analysis.runs import write_json

    from .policy import ModelShape
    from .rl import calibrate, start_evaluation
    from .sft import SFTConfig, train_sft

    start_dir = out / "start"
    if not (start_dir / "READY").is_file():
        shape = ModelShape(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
        )
        sft = SFTConfig(
            steps=config.sft_steps,
            batch_size=config.sft_batch_size,
            learning_rate=config.sft_learning_rate,
            save_every=config.sft_save_every,
            seed=config.sft_seed,
        )
        train_sft(
            sft, shape, tuple(config.difficulties), out / "sft", config.max_new_tokens, progress=progress
        )
        shutil.rmtree(start_dir, ignore_errors=True)
        shutil.copytree(
            out / "sft" / f"checkpoint-{config.start}",
            start_dir,
            ignore=shutil.ignore_patterns("training_state.pt"),
        )
        (start_dir / "READY").write_text(f"SFT checkpoint {config.start}\n")
    if not (out / "start" / "calibration.json").is_file():
        if progress:
            print("calibrating the null and entropy_bonus terms on the starting policy", flush=True)
        write_json(out / "start" / "calibration.json", calibrate(config, start_dir))
    if progress and not (out / "start" / "evaluation.json").is_file():
        print(f"evaluating the starting policy on {config.heldout_n} held-out problems", flush=True)
    start_evaluation(config, out, start_dir)
    return start_dir


def run(config: TestbedConfig, out: Path, shard: tuple[int, int], progress: bool) -> None:
    from .observe import observe_checkpoints
    from .report import write_report
    from .rl import run_arm

    if shard[0] == 0:
        prepare_start(config, out, progress)
    else:
        while not all(
            p.is_file()
            for p in (
                out / "start" / "READY",
                out / "start" / "calibration.json",
                out / "start" / "evaluation.json",
            )
        ):
            if progress:
                print(f"shard {shard[0]}/{shard[1]}: waiting for shard 0 to finish SFT", flush=True)
            time.sleep(30)
    calibration = json.loads((out / "start" / "calibration.json").read_text())
    start_eval = json.loads((out / "start" / "evaluation.json").read_text())
    jobs: list = ["observe"] + [(arm, seed) for seed in config.seeds for arm in config.arms]
    mine = jobs[shard[0] :: shard[1]]
    for i, job in enumerate(mine):
        if progress:
            print(
                f"[{i + 1}/{len(mine)}] {job if job == 'observe' else f'arm {job[0]}, seed {job[1]}'}",
                flush=True,
            )
        if job == "observe":
            observe_checkpoints(config, out, progress=progress)
        else:
            run_arm(config, job[0], job[1], out, out / "start", calibration, start_eval, progress=progress)
    paths = write_report(out)
    if progress:
        print("report: " + ", ".join(str(p) for p in paths), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_config:
        print(json.dumps(TestbedConfig().to_dict(), indent=1))
        return 0
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    if args.report_only:
        if not (out / "run.json").is_file():
            parser.error(f"--out {args.out}: no testbed records there (no run.json)")
        from .report import write_report

        for path in write_report(out):
            print(path)
        return 0
    try:
        config = TestbedConfig.from_json(Path(args.config).read_text()) if args.config else TestbedConfig()
    except FileNotFoundError:
        parser.error(f"--config {args.config}: no such file")
    except (ValueError, TypeError) as exc:
        parser.error(f"--config {args.config}: {exc}")
    from entropy_gpu.analysis.runs import check_run_config

    try:
        out.mkdir(parents=True, exist_ok=True)
        check_run_config(
            out, config.to_dict(), overwrite=args.overwrite, record_dirs=("sft", "start", "runs", "observe")
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(config.threads)
    # transformers' deprecation notices about its own checkpointing API, once per step otherwise
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        run(config, out, args.shard, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
