"""A study's plot (issue 20, item 11): points with whiskers (no bar whose length starts at an
arbitrary 84%), one legend entry per method (never "ours"), a caption saying what dots and
whiskers are and over how many seeds, the metric in percent; redrawn from results.csv."""

from __future__ import annotations

import math

import pytest
from matplotlib.text import Text

from robust_amo.curves import pyplot
from robust_amo.errors import OutputError
from robust_amo.studies import Options, load_study, plan, select
from robust_amo.studies.results import (
    cell_values,
    csv_values,
    plot_figure,
    replot,
    results_csv,
)
from tests.helpers import ROOT
from tests.studies.test_reproduce import TINY, write_study

VALUES = {  # two seeds each; the paper's value of mlp/none is 90.0 (TINY)
    "mlp/none": {"clean": [88.0, 90.0], "pgd10": [40.0, 42.0], "error": [12.0, 10.0]},
    "mlp/wd": {"clean": [92.0, 93.0], "pgd10": [45.0, 45.0], "error": [8.0, 7.0]},
    "lin/none": {"clean": [85.0, 86.0], "pgd10": [30.0, 32.0], "error": [15.0, 14.0]},
    "lin/wd": {"clean": [84.0, 88.0], "pgd10": [31.0, 33.0], "error": [16.0, 12.0]},
}


def caption(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(Text) if "whiskers" in t.get_text())


@pytest.fixture
def figure(tmp_path):
    spec = load_study(write_study(tmp_path))
    fig = plot_figure(spec, VALUES)
    yield spec, fig
    pyplot().close(fig)


def test_points_with_whiskers_in_percent_and_limits_that_hold_them(figure):
    spec, fig = figure
    axes = fig.axes
    assert len(axes) == len(spec.metrics)
    for ax, m in zip(axes, spec.metrics, strict=True):
        assert ax.get_ylabel() == f"{m.name} (%)"
        assert not ax.patches  # no bars: a bar's length would read from where the axis starts
        lo, hi = ax.get_ylim()
        assert 0 <= lo and hi <= 100
        for cell in VALUES.values():
            mean, std = sum(cell[m.name]) / 2, abs(cell[m.name][0] - cell[m.name][1]) / 2 ** 0.5
            assert lo < mean - std and mean + std < hi
        assert [t.get_text() for t in ax.get_xticklabels()] == ["mlp", "lin"]


def test_the_legend_names_each_method_and_the_paper(figure):
    _, fig = figure
    clean = fig.axes[0]
    assert sorted(t.get_text() for t in clean.get_legend().get_texts()) == ["none", "paper", "wd"]
    assert "ours" not in {t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()}


def test_the_caption_says_what_dots_and_whiskers_are(figure):
    _, fig = figure
    text = caption(fig).replace("\n", " ")
    assert "Dots: mean over seeds" in text
    assert "whiskers: ± 1 sample standard deviation (n = 2 seeds" in text
    assert "x: the paper's value" in text


def test_a_table_without_columns_has_one_legend_entry_per_row(tmp_path):
    data = {**TINY, "table": {"rows": ["arch", "reg"], "columns": []}}
    spec = load_study(write_study(tmp_path, data))
    fig = plot_figure(spec, VALUES)
    legend = sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert legend == ["lin none", "lin wd", "mlp none", "mlp wd", "paper"]
    pyplot().close(fig)


def test_the_plot_is_redrawn_from_results_csv(tmp_path):
    spec = load_study(write_study(tmp_path))
    states = plan(spec, Options(out=tmp_path / "o", seeds=[0, 1]))
    for i, s in enumerate(states):
        s.epochs_done = s.cfg.epochs
        s.score = 50.0 + i
        s.best = {"clean_acc": 0.8 + i / 100}
        s.evals = {"pgd10": 40.0 + i} if i % 3 else {}
    chosen = select(states)
    text = results_csv(spec, states, chosen, "test", tmp_path / "o")
    back = csv_values(spec, text)
    want = cell_values(spec, chosen, "test")
    assert back.keys() == want.keys()
    for cell, metrics in want.items():
        for name, values in metrics.items():
            assert back[cell][name] == pytest.approx(values, abs=1e-3, nan_ok=True)
            assert any(math.isnan(v) for v in values) == any(math.isnan(v)
                                                             for v in back[cell][name])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.csv").write_text(text)
    assert replot(tmp_path / "o", spec).read_bytes().startswith(b"\x89PNG")
    other = load_study(ROOT / "configs" / "studies" / "sokolic-table1.yaml")
    with pytest.raises(OutputError, match="another study's results"):
        replot(tmp_path / "o", other)


def test_the_shipped_plots_are_drawn_by_this_code():
    """docs/reproductions/*/STUDY.png are redrawn from their results.csv (no bars from 84%)."""
    for folder in ("sokolic-table1", "robust-amo-vs-pgd-small"):
        spec = load_study(ROOT / "configs" / "studies" / f"{folder}.yaml")
        text = (ROOT / "docs" / "reproductions" / folder / "results.csv").read_text()
        fig = plot_figure(spec, csv_values(spec, text))
        assert all(not ax.patches for ax in fig.axes) and "n = " in caption(fig)
        pyplot().close(fig)

