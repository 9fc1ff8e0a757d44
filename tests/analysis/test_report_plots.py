"""The grad-report PNGs a reader understands (issue 20, item 7): distinct colours with a legend,
no axis offsets. (The bench PNG: tests/bench/test_plots.py; the SIA figures:
tests/analysis/sia/test_plots.py.)"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgb

from entropy_gpu.analysis import grad_report


def _report(n_responses: int, tokens_each: int = 6) -> dict:
    rng = np.random.default_rng(0)
    norms = ["frobenius"]
    rows = []
    for resp in range(n_responses):
        for _ in range(tokens_each):
            row = {"response": resp, "exact_frobenius": 10.68 + 1e-4 * rng.random()}
            row.update({m: float(rng.random() + 1) for m in grad_report.CHEAP_MEASURES})
            rows.append(row)
    corr = {"pearson": 0.5, "spearman": 0.4}
    return {
        "config": {"norms": norms, "model": "tiny", "n_tokens": len(rows), "n_responses": n_responses,
                   "temperature": 0.7},
        "tokens": rows,
        "pooled": {m: {"exact_frobenius": corr} for m in grad_report.CHEAP_MEASURES},
        "per_layer": {"exact_frobenius": {m: {"spearman": [0.1, 0.2]} for m in grad_report.CHEAP_MEASURES}},
        "per_response": [{"entropy_vs": {m: {"pearson": 0.3} for m in ["exact_frobenius",
                                                                        *grad_report.CHEAP_MEASURES]}}
                         for _ in range(n_responses)],
    }


def _offsets(fig):
    fig.canvas.draw()
    return [t for ax in fig.axes for t in (ax.xaxis.get_offset_text().get_text(),
                                           ax.yaxis.get_offset_text().get_text()) if t]


def test_grad_report_scatter_gives_each_response_its_own_colour_and_a_legend(tmp_path, saved_figures):
    grad_report._plots(_report(2), tmp_path)
    scatter = saved_figures[0]
    first = scatter.axes[0]
    labels = [t.get_text() for t in first.get_legend().get_texts()]
    assert labels == ["response 0", "response 1"]
    colours = [to_rgb(c.get_facecolor()[0]) for c in first.collections]
    assert len(colours) == 2 and np.abs(np.subtract(*colours)).sum() > 0.5, colours  # not two blues
    assert all(_offsets(fig) == [] for fig in saved_figures)  # exact values 10.68 + 1e-4: no "+1.068e1"


def test_grad_report_scatter_of_many_responses_has_a_colourbar(tmp_path, saved_figures):
    grad_report._plots(_report(14, tokens_each=2), tmp_path)
    assert any(ax.get_ylabel() == "response (index)" for ax in saved_figures[0].axes)


def _per_response_report(n_responses: int) -> dict:
    """Distinct per-response correlations per measure, one undefined (None) in the first column."""
    report = _report(n_responses)
    measures = ["exact_frobenius", *grad_report.CHEAP_MEASURES]

    def pearson(i: int, k: int) -> float | None:
        return None if (i == 0 and k == 0) else 0.1 * i - 0.05 * k

    report["per_response"] = [{"entropy_vs": {m: {"pearson": pearson(i, k)} for k, m in enumerate(measures)}}
                              for i in range(n_responses)]
    return report


def test_per_response_plot_colours_each_response_the_same_in_every_column(tmp_path, saved_figures):
    grad_report._plots(_per_response_report(3), tmp_path)
    fig = saved_figures[-1]
    ax = fig.axes[0]
    # Each column's dots: colour per response (index from the dot's x offset), equal across columns.
    colour_of: dict[int, tuple] = {}
    for k, dots in enumerate(ax.collections[: len(grad_report.CHEAP_MEASURES) + 1]):
        xs = dots.get_offsets()[:, 0] - k
        responses = np.rint((xs + 0.2) / 0.2).astype(int)  # offsets -0.2, 0, 0.2 for 3 responses
        for resp, face in zip(responses, dots.get_facecolors()):
            colour_of.setdefault(int(resp), tuple(np.round(face[:3], 3)))
            assert colour_of[int(resp)] == tuple(np.round(face[:3], 3)), (k, resp)
    assert len(set(colour_of.values())) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["response 0", "response 1", "response 2"]
    title = ax.get_title()
    assert "tiny" in title and "3 responses" in title
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0].endswith("(n = 2)") and all(t.endswith("(n = 3)") for t in ticks[1:])


def test_per_response_plot_of_many_responses_has_a_colourbar(tmp_path, saved_figures):
    grad_report._plots(_per_response_report(14), tmp_path)
    assert any(ax.get_ylabel() == "response (index)" for ax in saved_figures[-1].axes)
