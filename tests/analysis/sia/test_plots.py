"""SIA figures a reader understands without the README: readable titles and labelled
axes, the band named, counts for small groups, AUROC on the figure when both classes
exist and a note saying why not otherwise."""

from __future__ import annotations

import random

import pytest

from entropy_gpu.analysis.sia.plots import (
    BAND_NOTE,
    COUNT_LABEL,
    SIGNATURE_TEXT,
    plot_curves,
    plot_signatures,
    signature_panels,
)
from entropy_gpu.analysis.sia.signatures import SIGNATURES, auroc_with_interval, summarize, trace_signatures

PNG = b"\x89PNG\r\n\x1a\n"


def records(n: int, correct=lambda i: i % 3 != 0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ok = correct(i)
        h = [2.0 - (0.15 if ok else 0.05) * k + rng.gauss(0, 0.2) for k in range(6 + i % 3)]
        out.append({"id": str(i), "correct": ok, "entropy": h, "answer_logprob": [-x for x in h],
                    "steps": ["step"] * (len(h) - 1), "signatures": trace_signatures(h, 10)})
    return out


def test_every_signature_has_a_readable_title_and_x_label():
    assert set(SIGNATURE_TEXT) == set(SIGNATURES)
    for title, xlabel in SIGNATURE_TEXT.values():
        assert "_" not in title and xlabel


def test_both_classes_put_the_auroc_on_each_panel():
    recs = records(15)  # 5 incorrect, 10 correct: enough for an interval (analysis/intervals.py)
    panels = signature_panels(recs, n_boot=50)
    for name, panel in panels.items():
        a = auroc_with_interval([r["signatures"][name] for r in recs], [r["correct"] for r in recs],
                                SIGNATURES[name], n_boot=50)
        assert panel["note"].startswith(f"AUROC {a['auroc']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}]")
        assert panel["title"] == SIGNATURE_TEXT[name][0] and panel["xlabel"] == SIGNATURE_TEXT[name][1]
        assert panel["ylabel"] == COUNT_LABEL
        assert sorted(panel["values"]) == ["correct", "incorrect"]
    few = signature_panels(records(9), n_boot=50)  # 3 incorrect: no interval
    assert all(p["note"].startswith("AUROC ") and "[n too small]" in p["note"] for p in few.values())


@pytest.mark.parametrize("correct,note", [(lambda i: True, "no AUROC: all 5 traces correct"),
                                          (lambda i: False, "no AUROC: all 5 traces incorrect"),
                                          (lambda i: None, "no AUROC: correctness unknown")])
def test_one_class_or_unknown_says_why_there_is_no_auroc(correct, note):
    panels = signature_panels(records(5, correct))
    assert all(p["note"].startswith(note) for p in panels.values())
    groups = {"all"} if correct(0) is None else {"correct" if correct(0) else "incorrect"}
    assert all(set(k for k, v in p["values"].items() if v) == groups for p in panels.values())


def test_counts_for_every_group_size():
    # Densities of a few values in narrow bins reached the thousands next to a counts panel.
    for n in (9, 150):
        fig_panels = signature_panels(records(n), n_boot=20)
        assert all(p["ylabel"] == COUNT_LABEL == "traces (count)" for p in fig_panels.values())


def _axes_of(path_png, draw):
    """The axes ``draw`` made (the figure is rendered, as savefig does)."""
    from matplotlib.figure import Figure

    made = []
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        real_savefig(fig, *args, **kwargs)
        made.extend(fig.axes)

    Figure.savefig = savefig
    try:
        draw()
    finally:
        Figure.savefig = real_savefig
    return made


def _offset_texts(axes):
    return [t for ax in axes for t in (ax.yaxis.get_offset_text().get_text(),
                                       ax.xaxis.get_offset_text().get_text()) if t]


def test_a_tiny_drift_has_no_axis_offset_and_looks_flat(tmp_path):
    # The random twin's curves: H_k about 10.68 nats, drifting by 0.0004 nats.
    recs = []
    for i in range(6):
        h = [10.68 + 0.0004 * k / 5 + 1e-5 * i for k in range(6)]
        recs.append({"id": str(i), "correct": None, "entropy": h, "answer_logprob": [-x for x in h],
                     "steps": ["s"] * 5, "signatures": trace_signatures(h, 10)})
    summary = summarize(recs, n_boot=20)
    axes = _axes_of(tmp_path, lambda: plot_curves(summary, tmp_path / "c.png", "t"))
    axes += _axes_of(tmp_path, lambda: plot_signatures(recs, tmp_path / "s.png", "t", n_boot=20))
    assert axes and _offset_texts(axes) == []
    for ax in axes[:2]:  # the curves: at least MIN_Y_SPAN of y-range, so the drift is flat
        lo, hi = ax.get_ylim()
        assert hi - lo >= 0.1


def test_overlapping_histograms_are_translucent_with_a_legend(tmp_path):
    recs = records(12)
    axes = _axes_of(tmp_path, lambda: plot_signatures(recs, tmp_path / "s.png", "t", n_boot=20))
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(t.startswith("correct (n=") for t in labels)
        assert any(t.startswith("incorrect (n=") for t in labels)
        assert all(p.get_alpha() is None or p.get_alpha() < 0.6 for p in ax.patches)
    assert any("overlap" in [t.get_text() for t in ax.get_legend().get_texts()] for ax in axes)


def test_pngs_are_written(tmp_path):
    recs = records(9)
    summary = summarize(recs, n_boot=50)
    assert plot_curves(summary, tmp_path / "c.png", "t").read_bytes()[:8] == PNG
    assert plot_signatures(recs, tmp_path / "s.png", "t", n_boot=20).read_bytes()[:8] == PNG
    assert "95% bootstrap interval" in BAND_NOTE
