"""curves.png read as a person would (issue 20, item 11): every axis says what it shows and in
which unit, accuracies in percent on a 0-100 axis as the reports give them, the check's examples
named from the metrics, method and eps in the title, and one learning-rate scale for every run."""

from __future__ import annotations

import json

import yaml

from robust_amo.cli import main
from robust_amo.curves import check_words, curves_figure, pyplot, write_curves


def _rows(lrs=(0.1, 0.1, 0.01), **extra):
    return [{"epoch": i + 1, "train_loss": 2.0 - i / 2, "lr": lr, "clean_acc": 0.5 + i / 10,
             "robust_acc": 0.25, "n": 200, **extra} for i, lr in enumerate(lrs)]


CONFIG = {"method": "robust-amo", "attack": {"eps": 8 / 255, "norm": "linf"},
          "eval": {"steps": 10}}


def _axes(fig):
    loss, clean, robust, lr = fig.axes
    return loss, clean, robust, lr


def test_every_axis_has_a_label_with_its_unit():
    fig = curves_figure([("run", _rows())], [CONFIG])
    loss, clean, robust, lr = _axes(fig)
    assert loss.get_ylabel() == "training loss (the method's objective)"
    assert clean.get_ylabel() == robust.get_ylabel() == "accuracy (%)"
    assert lr.get_ylabel() == "learning rate"
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    pyplot().close(fig)


def test_accuracies_are_percent_on_a_0_to_100_axis():
    fig = curves_figure([("run", _rows())], [CONFIG])
    _, clean, robust, _ = _axes(fig)
    assert list(clean.get_lines()[0].get_ydata()) == [50.0, 60.0, 70.0]
    assert list(robust.get_lines()[0].get_ydata()) == [25.0, 25.0, 25.0]
    assert clean.get_ylim() == robust.get_ylim() == (0, 100)
    pyplot().close(fig)


def test_the_title_names_the_method_and_eps():
    fig = curves_figure([("quickstart", _rows())], [CONFIG])
    assert fig._suptitle.get_text() == "quickstart: robust-amo, linf eps 8/255"
    assert _axes(fig)[2].get_title().endswith(", PGD-10")
    pyplot().close(fig)
    fig = curves_figure([("a", _rows()), ("b", _rows())],
                        [CONFIG, {"method": "pgd", "attack": {"eps": 0.1, "norm": "l2"}}])
    labels = [ln.get_label() for ln in _axes(fig)[0].get_lines()]
    assert labels == ["a (robust-amo, linf eps 8/255)", "b (pgd, l2 eps 0.1)"]
    pyplot().close(fig)


def test_the_check_split_is_named_from_the_metrics_and_neutral_without():
    new = _rows(check_split="val", check_examples=500)
    assert check_words(new) == "500 held-out training examples"
    assert check_words(_rows(check_split="test", check_examples=200)) == "200 test examples"
    assert check_words(_rows()) == "held-out check (200 examples)"  # an older run's metrics
    fig = curves_figure([("run", new)], [CONFIG])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "clean accuracy, 500 held-out training examples"
    assert titles[2] == "robust accuracy, 500 held-out training examples, PGD-10"
    assert not any("check split" in t for t in titles)
    pyplot().close(fig)


def test_the_learning_rate_axis_is_linear_for_every_schedule():
    for lrs in [(0.1, 0.1, 0.01), (0.1, 0.05, 0.0)]:  # a step schedule, cosine down to 0
        fig = curves_figure([("run", _rows(lrs))], [CONFIG])
        assert _axes(fig)[3].get_yscale() == "linear"
        pyplot().close(fig)


def test_write_curves_reads_the_runs_config(tmp_path, monkeypatch):
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    seen = []
    monkeypatch.setattr("robust_amo.curves.save_figure",
                        lambda fig, path: seen.append(fig._suptitle.get_text()) or path)
    write_curves(run)
    assert seen == ["myrun: robust-amo, linf eps 8/255"]


def test_plot_names_the_missing_run_by_its_argument(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give RUN as run folders of robust-amo train" in err


def test_plot_runs_from_python_names_parameters_not_flags(tmp_path):
    import pytest

    from robust_amo.curves import plot_runs
    from robust_amo.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        plot_runs([tmp_path / "nope"])
    assert e.value.params == ("runs",) and "--" not in str(e.value)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    with pytest.raises(ConfigError, match=r"^out .*x\.jpg: the picture is a PNG") as e:
        plot_runs([tmp_path], out=tmp_path / "x.jpg")
    assert e.value.params == ("out",)
