"""margins_hist.png read as a person would (issue 20, item 11): each histogram's axes say what
is counted and in which units, and the note says in words how many examples it draws."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from robust_amo.margins.report import COUNT_LABEL, MARGIN_LABELS, histograms

INF = float("inf")


def test_every_histogram_has_units_a_count_axis_and_a_worded_note():
    cols = {"output_margin": torch.linspace(-1, 2, 200),
            "all_layer_margin": torch.cat([torch.rand(190), torch.full((10,), INF)]),
            "input_margin_l2": torch.rand(200)}
    fig = histograms(cols)
    try:
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        assert len(axes) == 3
        by_title = {ax.get_title().splitlines()[0]: ax for ax in axes}
        assert set(by_title) == {MARGIN_LABELS[k] for k in cols}
        for ax in axes:
            assert ax.get_ylabel() == COUNT_LABEL == "examples (count)"
            # the counts axis starts at 0 and reaches the tallest bar
            low, high = ax.get_ylim()
            assert low == 0 and high >= max(p.get_height() for p in ax.patches)
        out = by_title[MARGIN_LABELS["output_margin"]]
        assert out.get_xlabel() == "F_y - max_{j != y} F_j, in logits"
        assert "200 of 200 examples have a finite margin" in out.get_title()
        assert "/200 finite" not in out.get_title() + out.get_xlabel()
        inp = by_title[MARGIN_LABELS["input_margin_l2"]]
        assert inp.get_xlabel() == "||x' - x||_2, in [0, 1] pixel units"
        layer = by_title[MARGIN_LABELS["all_layer_margin"]]
        assert "relative to each layer's activation norm" in layer.get_xlabel()
        title = layer.get_title()
        assert "190 of 200 examples have a finite margin" in title
        assert "10 not drawn (no misclassifying perturbation found)" in title
        # only the finite values are drawn: the bars count 190 examples
        assert sum(p.get_height() for p in layer.patches) == 190
    finally:
        plt.close(fig)
