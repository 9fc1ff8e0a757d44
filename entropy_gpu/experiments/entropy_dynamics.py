"""Does ``entropy_change`` predict how GRPO moves each token's entropy?

Real GRPO steps through TRL's ``GRPOTrainer`` (SmolLM2-135M-Instruct by default, single-digit
additions, reward: the answer is right, plus half its distinct-2). Each step, for every
completion token ``t`` (TRL's completion mask):

- **predicted, logit space**: ``A * entropy_change``: the first-order entropy change of a
  policy-gradient step of size 1 on the token's own logits (``token_stats``, at the sampling
  temperature, from the policy that sampled the batch);
- **predicted, parameter space** (``--jvp``, the default): ``dH_t/dtheta . (theta' - theta)``,
  one forward-mode JVP of every token's entropy along the update the optimizer actually made;
- **observed**: ``H_t(theta') - H_t(theta)``, the same tokens re-scored after the step.

Per step (``steps.jsonl``): Spearman of each prediction with the observed change across
tokens, sign agreement, the mean predicted and observed changes, and the
``entropy_change_metrics`` the trainer integrations log; per token (``tokens.jsonl``) the
three numbers. ``--report-only`` turns the records of ``--out`` into ``summary.json``,
``summary.md`` and ``entropy_dynamics.png`` (in ``--report``, default ``--out``).

Run: ``python -m entropy_gpu.experiments.entropy_dynamics --out DIR [--steps 40 ...]``.
Not resumable (the optimizer state would have to be checkpointed every step): a run into a
folder that already holds records refuses to start unless ``--restart``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

STEPS_FILE, TOKENS_FILE, CONFIG_FILE = "steps.jsonl", "tokens.jsonl", "config.json"
STARTED_FILE, DONE_FILE = "started.json", "done.json"


@dataclass
class DynamicsConfig:
    """One run; stored in ``OUT/config.json``."""

    model: str = "smollm2"          #: "smollm2" (bundled) or "tiny" (random Llama, for tests)
    steps: int = 40
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 32
    learning_rate: float = 1e-5
    temperature: float = 1.0
    seed: int = 0
    jvp: bool = True                #: also the parameter-space first-order change (one JVP per step)

    def check(self) -> None:
        """Raise ``ValueError`` (one line) on a bad field."""
        if self.model not in ("smollm2", "tiny"):
            raise ValueError(f"--model {self.model!r}: expected 'smollm2' or 'tiny'")
        for name in ("steps", "prompts_per_step", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (GRPO groups), got {self.num_generations}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")


# -- statistics ------------------------------------------------------------------------------------

def spearman(x, y) -> float | None:
    """Spearman (ties averaged) of two 1-D arrays; None when undefined (< 3 pairs, a constant side)."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def pearson(x, y) -> float | None:
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def sign_agreement(predicted, observed) -> tuple[float | None, int]:
    """(fraction of tokens where both are nonzero and agree in sign, how many such tokens)."""
    import numpy as np

    p, o = np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    both = (p != 0) & (o != 0)
    n = int(both.sum())
    return (float((np.sign(p[both]) == np.sign(o[both])).mean()) if n else None), n


def compare(predicted, observed, prefix: str) -> dict[str, Any]:
    import numpy as np

    agree, n_signed = sign_agreement(predicted, observed)
    return {f"{prefix}_spearman": spearman(predicted, observed),
            f"{prefix}_pearson": pearson(predicted, observed), f"{prefix}_sign_agreement": agree,
            f"{prefix}_signed_tokens": n_signed,
            f"{prefix}_mean": float(np.mean(predicted)) if len(predicted) else None}


# -- the run ---------------------------------------------------------------------------------------

def _completion_entropy(model, input_ids, attention_mask, width: int, temperature: float):
    """Entropy ``[B, width]`` of the completion positions, plain differentiable torch ops
    (forward-mode AD goes through them)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _functional_entropy(model, params: dict, input_ids, attention_mask, width: int, temperature: float):
    import torch

    logits = torch.func.functional_call(model, params, (), {"input_ids": input_ids,
                                                             "attention_mask": attention_mask,
                                                             "logits_to_keep": width + 1}).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def build_trainer(config: DynamicsConfig, trainer_dir: Path, on_step):
    """The TRL ``GRPOTrainer`` of the run; ``on_step(before, after_model)`` gets each step's
    pre-step record (``_generate_and_score_completions``) once the optimizer has stepped."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from entropy_gpu import token_stats
    from entropy_gpu.experiments.corrpo_design import addition_problems
    from entropy_gpu.experiments.corrpo_training import ExperimentConfig, build_policy, correct, distinct2

    torch.manual_seed(config.seed)
    model, tokenizer = build_policy(ExperimentConfig(model=config.model))
    train, _ = addition_problems(heldout=0)
    n_prompts = config.steps * config.prompts_per_step
    order = [train[(config.seed * 7 + k) % len(train)] for k in range(n_prompts)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p["question"]}] for p in order],
                                 "answer": [p["answer"] for p in order]})
    batch = config.prompts_per_step * config.num_generations
    args = GRPOConfig(
        output_dir=str(trainer_dir), max_steps=config.steps, per_device_train_batch_size=batch,
        num_generations=config.num_generations, max_completion_length=config.max_completion_length,
        learning_rate=config.learning_rate, temperature=config.temperature, top_k=0, top_p=1.0,
        reward_weights=[1.0, 0.5], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=config.seed, data_seed=config.seed, shuffle_dataset=False, disable_tqdm=True, beta=0.0,
        bf16=False, fp16=False, gradient_checkpointing=False,
    )

    class Trainer(GRPOTrainer):
        pending: dict | None = None

        def _generate_and_score_completions(self, inputs):
            out_batch = super()._generate_and_score_completions(inputs)
            m = self.model
            ids = torch.cat([out_batch["prompt_ids"], out_batch["completion_ids"]], 1)
            mask = out_batch["completion_mask"].bool()
            if out_batch.get("tool_mask") is not None:
                mask &= out_batch["tool_mask"].bool()
            attention = torch.cat([out_batch["prompt_mask"], out_batch["completion_mask"]], 1)
            width = out_batch["completion_ids"].size(1)
            was_training = m.training
            m.eval()
            with torch.no_grad():
                logits = m(input_ids=ids, attention_mask=attention, logits_to_keep=width + 1).logits[:, :-1]
                stats = token_stats(logits, out_batch["completion_ids"], temperature=self.temperature,
                                    stats=("entropy", "entropy_change"))
            m.train(was_training)
            params = ({k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
                      if config.jvp else None)
            self.pending = {"input_ids": ids, "attention_mask": attention, "mask": mask, "width": width,
                            "advantages": out_batch["advantages"].detach().clone(),
                            "entropy": stats.entropy, "entropy_change": stats.entropy_change,
                            "params": params, "start": time.process_time()}
            return out_batch

    trainer = Trainer(model=model, reward_funcs=[correct, distinct2], args=args, train_dataset=dataset,
                      processing_class=tokenizer)

    class AfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if trainer.pending is not None:
                on_step(state.global_step, trainer.pending, trainer.model, trainer.temperature)
                trainer.pending = None

    trainer.add_callback(AfterStep())
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def step_record(step: int, before: dict, model, temperature: float, jvp: bool) -> tuple[dict, dict]:
    """(steps.jsonl record, tokens.jsonl record) of one optimizer step."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from entropy_gpu import entropy_change_metrics

    ids, attention = before["input_ids"], before["attention_mask"]
    width, mask = before["width"], before["mask"]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        after = _completion_entropy(model, ids, attention, width, temperature)
    jvp_change = None
    if jvp:
        # dH/dtheta . (theta' - theta) at theta, forward mode; the math SDPA backend has the formula.
        params = before["params"]
        current = dict(model.named_parameters())
        delta = {k: (current[k].detach() - v) for k, v in params.items()}
        # fwAD rather than torch.func.jvp: TRL's input-embedding hook calls requires_grad_, which
        # functorch transforms refuse.
        import torch.autograd.forward_ad as fwAD

        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
            duals = {k: fwAD.make_dual(v, delta[k]) for k, v in params.items()}
            entropy = _functional_entropy(model, duals, ids, attention, width, temperature)
            jvp_change = fwAD.unpack_dual(entropy).tangent
    model.train(was_training)
    adv = before["advantages"]
    adv_tok = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(before["entropy_change"])
    predicted = (adv_tok * before["entropy_change"])[mask].double()
    observed = (after.double() - before["entropy"].double())[mask]
    record: dict[str, Any] = {"step": step, "tokens": int(mask.sum()),
                              "responses": int(mask.any(1).sum()),
                              "nonzero_advantage_tokens": int((adv_tok[mask] != 0).sum()),
                              "entropy_before": float(before["entropy"][mask].double().mean()),
                              "observed_mean": float(observed.mean())}
    record.update(compare(predicted.tolist(), observed.tolist(), "logit"))
    tokens = {"step": step, "predicted_logit": [float(f"{v:.5g}") for v in predicted.tolist()],
              "observed": [float(f"{v:.5g}") for v in observed.tolist()],
              "advantage": [float(f"{v:.5g}") for v in adv_tok[mask].tolist()]}
    if jvp_change is not None:
        predicted_jvp = jvp_change.double()[mask]
        record.update(compare(predicted_jvp.tolist(), observed.tolist(), "jvp"))
        record["jvp_vs_logit_spearman"] = spearman(predicted_jvp.tolist(), predicted.tolist())
        tokens["predicted_jvp"] = [float(f"{v:.5g}") for v in predicted_jvp.tolist()]
    record.update(entropy_change_metrics(before["entropy_change"], adv, mask))
    record["cpu_seconds_measure"] = time.process_time() - before["start"]
    return record, tokens


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run(config: DynamicsConfig, out: Path, restart: bool = False, argv: list[str] | None = None) -> Path:
    """Train and record ``config`` into ``out``; returns ``out``."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    steps_file, tokens_file = out / STEPS_FILE, out / TOKENS_FILE
    if (steps_file.exists() or tokens_file.exists()) and not restart:
        raise ValueError(f"{out} already holds records (a run is not resumable); pass --restart to "
                         "overwrite them, or --report-only to summarize them")
    for f in (steps_file, tokens_file, out / DONE_FILE):
        f.unlink(missing_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=1) + "\n")
    wall, cpu = time.perf_counter(), time.process_time()
    command = "python -m entropy_gpu.experiments.entropy_dynamics " + " ".join(argv or [])
    from entropy_gpu.analysis.runs import code_commit

    commit = code_commit()["commit"]  # the code that runs, read before the hours of training
    (out / STARTED_FILE).write_text(json.dumps({"command": command, "commit": commit}, indent=1) + "\n")

    def on_step(step, before, model, temperature):
        record, tokens = step_record(step, before, model, temperature, config.jvp)
        record["cpu_seconds_total"] = time.process_time() - cpu
        _append(steps_file, record)
        _append(tokens_file, tokens)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="entropy_dynamics_") as trainer_dir:  # TRL's output_dir: unused
        build_trainer(config, Path(trainer_dir), on_step).train()
    (out / DONE_FILE).write_text(json.dumps({
        "command": command, "commit": commit, "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu, "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
    }, indent=1) + "\n")
    return out


# -- the report --------------------------------------------------------------------------------------

def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _quantiles(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"median": None, "q25": None, "q75": None, "n": 0}
    return {"median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
            "q75": float(np.quantile(v, 0.75)), "n": int(v.size)}


def summarize(out: Path) -> dict[str, Any]:
    """The summary of the records in ``out`` (computed from the records only)."""
    import numpy as np

    steps, tokens = _read(out / STEPS_FILE), _read(out / TOKENS_FILE)
    if not steps:
        raise ValueError(f"{out}: no {STEPS_FILE} records to summarize")
    config = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else {}
    done = json.loads((out / DONE_FILE).read_text()) if (out / DONE_FILE).is_file() else None
    started = json.loads((out / STARTED_FILE).read_text()) if (out / STARTED_FILE).is_file() else {}
    observed = np.concatenate([np.asarray(t["observed"]) for t in tokens])
    summary: dict[str, Any] = {"config": config, "run": done or started or None, "finished": done is not None,
                               "steps": len(steps), "tokens": int(observed.size),
                               "cpu_seconds_to_last_step": steps[-1].get("cpu_seconds_total")}
    kinds = ["logit"] + (["jvp"] if any("predicted_jvp" in t for t in tokens) else [])
    obs_means = np.asarray([s["observed_mean"] for s in steps])
    nonzero = np.concatenate([np.asarray(t["advantage"]) for t in tokens]) != 0  # A != 0 tokens
    for kind in kinds:
        pred = np.concatenate([np.asarray(t[f"predicted_{kind}"]) for t in tokens])
        agree, n_signed = sign_agreement(pred, observed)
        summary[kind] = {
            "pooled_spearman": spearman(pred, observed),
            "pooled_spearman_nonzero_advantage": spearman(pred[nonzero], observed[nonzero]),
            "pooled_sign_agreement": agree, "pooled_signed_tokens": n_signed,
            "per_step_spearman": _quantiles([s[f"{kind}_spearman"] for s in steps]),
            "per_step_sign_agreement": _quantiles([s[f"{kind}_sign_agreement"] for s in steps]),
            "step_means_pearson": pearson([s[f"{kind}_mean"] for s in steps], obs_means),
            "step_means_spearman": spearman([s[f"{kind}_mean"] for s in steps], obs_means),
            "step_mean_sign_agreement": sign_agreement([s[f"{kind}_mean"] for s in steps], obs_means)[0],
        }
    summary["observed_mean_change"] = {"mean_over_steps": float(obs_means.mean()),
                                       "entropy_first_step": steps[0]["entropy_before"],
                                       "entropy_last_step": steps[-1]["entropy_before"]}
    summary["frac_pushing_down"] = _quantiles([s["entropy_change/frac_pushing_down"] for s in steps])
    return summary


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def write_report(out: Path, report: Path) -> dict[str, Any]:
    """``summary.json``, ``summary.md`` and ``entropy_dynamics.png`` in ``report``, from the
    records in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarize(out)
    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    steps, tokens = _read(out / STEPS_FILE), _read(out / TOKENS_FILE)
    kinds = [k for k in ("logit", "jvp") if k in summary]
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(5 * (1 + len(kinds)), 4))
    observed = np.concatenate([np.asarray(t["observed"]) for t in tokens])
    for ax, kind in zip(axes[1:], kinds):
        pred = np.concatenate([np.asarray(t[f"predicted_{kind}"]) for t in tokens])
        ax.scatter(pred, observed, s=3, alpha=0.3)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xscale("symlog", linthresh=max(1e-6, float(np.quantile(np.abs(pred), 0.1)) or 1e-6))
        ax.set_yscale("symlog", linthresh=max(1e-6, float(np.quantile(np.abs(observed), 0.1)) or 1e-6))
        label = "A * entropy_change (logit space)" if kind == "logit" else "JVP along the update"
        ax.set_xlabel(f"predicted: {label}")
        ax.set_ylabel("observed H(after) - H(before)")
        ax.set_title(f"per token: Spearman {_fmt(summary[kind]['pooled_spearman'])}")
    ax = axes[0]
    x = [s["step"] for s in steps]
    ax.plot(x, [s["observed_mean"] for s in steps], label="observed mean dH", color="k")
    ax2 = ax.twinx()
    ax2.plot(x, [s["logit_mean"] for s in steps], label="mean A * entropy_change", color="C1", alpha=0.8)
    if "jvp" in kinds:
        ax.plot(x, [s["jvp_mean"] for s in steps], label="mean JVP prediction", color="C0", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy change per token (nats)")
    ax2.set_ylabel("A * entropy_change (per unit logit step)", color="C1")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_title("per step means")
    fig.tight_layout()
    fig.savefig(report / "entropy_dynamics.png", dpi=110)
    plt.close(fig)

    run = summary["run"] or {}
    cfg = summary["config"]
    lines = [
        "# Does entropy_change predict GRPO's per-token entropy change?",
        "",
        "Generated by `python -m entropy_gpu.experiments.entropy_dynamics --report-only` from the records "
        "(`steps.jsonl`, `tokens.jsonl`); nothing here is written by hand.",
        "",
        f"- run: `{run.get('command', 'n/a')}`",
        f"- commit: `{run.get('commit', 'n/a')}`; finished: {summary['finished']}",
        f"- CPU time: {_fmt(run.get('cpu_seconds', summary['cpu_seconds_to_last_step']))} s of this process "
        f"(wall {_fmt(run.get('wall_seconds'))} s, "
        f"{run.get('torch_threads', 'n/a')} torch thread(s), {run.get('cpu_count', 'n/a')}-core shared CPU)",
        f"- config: model {cfg.get('model')}, {summary['steps']} steps x {cfg.get('prompts_per_step')} "
        f"prompts x "
        f"{cfg.get('num_generations')} generations, <= {cfg.get('max_completion_length')} completion tokens, "
        f"lr {cfg.get('learning_rate')} (AdamW, TRL defaults), temperature {cfg.get('temperature')}, "
        f"seed {cfg.get('seed')}",
        f"- tokens compared: {summary['tokens']}",
        "",
        "| prediction | pooled Spearman | same, A != 0 tokens | pooled sign agreement (n) | "
        "per-step Spearman median [q25, q75] | per-step sign agreement median | step means: Pearson / "
        "Spearman / sign agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"logit": "`A * entropy_change` (logit space)", "jvp": "JVP along the actual update"}
    for kind in kinds:
        s = summary[kind]
        ps, pa = s["per_step_spearman"], s["per_step_sign_agreement"]
        lines.append(
            f"| {names[kind]} | {_fmt(s['pooled_spearman'])} | "
            f"{_fmt(s['pooled_spearman_nonzero_advantage'])} | "
            f"{_fmt(s['pooled_sign_agreement'])} ({s['pooled_signed_tokens']}) | {_fmt(ps['median'])} "
            f"[{_fmt(ps['q25'])}, {_fmt(ps['q75'])}] | {_fmt(pa['median'])} | "
            f"{_fmt(s['step_means_pearson'])} / {_fmt(s['step_means_spearman'])} / "
            f"{_fmt(s['step_mean_sign_agreement'])} |")
    obs = summary["observed_mean_change"]
    lines += [
        "",
        f"Observed mean entropy change per token per step: {obs['mean_over_steps']:.3g} nats "
        f"(mean entropy {obs['entropy_first_step']:.3f} at the first step, {obs['entropy_last_step']:.3f} "
        f"at the last). Fraction of tokens with `A * entropy_change < 0` per step: median "
        f"{_fmt(summary['frac_pushing_down']['median'])}.",
        "",
        "Reading: the logit-space number assumes the step moves only the token's own logits, by "
        "`eta * A * grad log p`; the real update moves shared parameters (and Adam rescales it), so "
        "every token's entropy also moves with the other tokens' updates. The JVP is the exact first "
        "order of the real update. Spearman and sign agreement are scale-free; tokens of groups whose "
        "rewards tie have A = 0 and a predicted change of exactly 0.",
        "",
        "![per step and per token](entropy_dynamics.png)",
        "",
    ]
    (report / "summary.md").write_text("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m entropy_gpu.experiments.entropy_dynamics",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the records")
    p.add_argument("--report", help="where summary.md/.json and the plot go (default --out)")
    p.add_argument("--report-only", action="store_true", help="summarize the records of --out, train nothing")
    p.add_argument("--restart", action="store_true", help="overwrite the records in --out")
    defaults = DynamicsConfig()
    for f in fields(DynamicsConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(getattr(defaults, f.name), bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        else:
            p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.report_only:
            if not out.is_dir():
                raise ValueError(f"--out {out}: no such folder")
            write_report(out, Path(args.report) if args.report else out)
            return 0
        config = DynamicsConfig(**{f.name: getattr(args, f.name) for f in fields(DynamicsConfig)})
        config.check()
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: not a folder")
        if (out / STEPS_FILE).exists() and not args.restart:
            raise ValueError(f"{out} already holds records (a run is not resumable); pass --restart to "
                             "overwrite them, or --report-only to summarize them")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    run(config, out, restart=args.restart, argv=argv)
    write_report(out, Path(args.report) if args.report else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
