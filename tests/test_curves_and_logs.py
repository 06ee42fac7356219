"""Pictures and logs of runs: RUN/curves.png and ``robust-amo plot``, the eval restart curve,
TensorBoard event files, and ``eval --format robustbench``."""

from __future__ import annotations

import json
import sys

import pytest

from robust_amo.cli import main
from robust_amo.curves import PANELS, curves_figure
from robust_amo.errors import ConfigError
from robust_amo.evaluation.report import Report, eps_text, restarts_figure, robustbench_entry
from robust_amo.runs import read_metrics
from robust_amo.tblog import TensorBoardLog
from robust_amo.train import train
from tests.helpers import tiny_run

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(out, **kw):
    base = {"epochs": 3, "log_every": 2, "data": {"train_subset": 320, "val_size": 64},
            "optim": {"schedule": "multistep", "milestones": [2]},
            "eval": {"n_examples": 64, "every": 2}}
    return tiny_run(out, **{**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    train(_cfg(a))
    train(_cfg(b, seed=1, epochs=2))
    return a, b


def _line_counts(fig):
    return [len(ax.get_lines()) for ax in fig.axes]


def test_train_writes_curves_png(runs):
    a, _ = runs
    assert (a / "curves.png").read_bytes().startswith(PNG)


def test_curves_figure_has_one_line_per_run_and_the_logged_epochs(runs):
    a, b = runs
    fig = curves_figure([("a", read_metrics(a)), ("b", read_metrics(b))])
    assert [ax.get_title().split(",")[0] for ax in fig.axes] == [t for _, t, _ in PANELS]
    assert _line_counts(fig) == [2, 2, 2, 2]
    loss, clean = fig.axes[0].get_lines()[0], fig.axes[1].get_lines()[0]
    assert list(loss.get_xdata()) == [1, 2, 3]
    # eval.every 2 of 3 epochs: the check ran after epochs 2 and 3 only
    assert list(clean.get_xdata()) == [2, 3]
    rows = read_metrics(a)
    assert list(loss.get_ydata()) == [r["train_loss"] for r in rows]
    assert list(clean.get_ydata()) == [100 * r["clean_acc"] for r in rows if "clean_acc" in r]
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["a", "b"]


def test_plot_command(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 2
    assert "replace it (--overwrite) or write elsewhere (--out)" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no metrics.jsonl" in err and err.count("\n") == 1


def test_eval_restart_curve_and_robustbench_entry(runs, tmp_path):
    a, _ = runs
    out = tmp_path / "ev" / "report.json"
    assert main(["eval", "--checkpoint", str(a), "--attack", "pgd10", "--attack", "autoattack",
                 "--restarts", "3", "--n-examples", "16", "--no-progress", "--no-sanity",
                 "--device", "cpu", "--format", "robustbench", "--out", str(out)]) == 0
    assert (tmp_path / "ev" / "report.restarts.png").read_bytes().startswith(PNG)
    report = json.loads(out.read_text())
    fig = restarts_figure(Report.read(out))
    (line,) = fig.axes[0].get_lines()  # one multi-restart attack: pgd10 x 3
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == [100 * v for v in report["attacks"]["pgd10"]["curve"].values()]
    entry = json.loads((tmp_path / "ev" / "report.robustbench.json").read_text())
    assert entry == robustbench_entry(Report.read(out))
    assert entry["clean_acc"] == f"{100 * report['clean_accuracy']:.2f}"
    assert entry["autoattack_acc"] == \
        f"{100 * report['attacks']['autoattack']['robust_accuracy']:.2f}"
    assert entry["robust_amo"]["threat_model"] == "Linf"
    assert not entry["robust_amo"]["leaderboard_comparable"]  # 16 examples, not 10,000
    assert (entry["link"], entry["additional_data"]) == ("", None)


def test_robustbench_needs_autoattack(runs, tmp_path, capsys):
    a, _ = runs
    assert main(["eval", "--checkpoint", str(a), "--format", "robustbench", "--device",
                 "cpu", "--out", str(tmp_path / "r.json")]) == 2
    assert "add --attack autoattack" in capsys.readouterr().err


def test_eps_text():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.5) == "0.5" and eps_text(0.1) == "0.1"


def test_tensorboard_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-run"
    train(_cfg(out, logging={"tensorboard": True}))
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    rows = read_metrics(out)
    for key in ("train_loss", "train_acc", "lr", "clean_acc", "robust_acc"):
        logged = [(e.step, e.value) for e in ea.Scalars(f"epoch/{key}")]
        want = [(r["epoch"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged] == [s for s, _ in want]
        assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)
    assert "epoch/n" not in ea.Tags()["scalars"]  # the check's size is a constant, no curve
    # 256 images / batch 64 = 4 steps per epoch, logged every 2 steps: steps 0 and 2 of 3 epochs
    assert [e.step for e in ea.Scalars("train/loss")] == [0, 2, 4, 6, 8, 10]
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_tensorboard_holds_what_delta_does(tmp_path):
    """All-layer δ's per-point sizes (a list in metrics.jsonl) are one curve per point."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-delta"
    train(_cfg(out, logging={"tensorboard": True}, epochs=1,
               method_args={"all_layer": {"eta_delta": 0.05}}))
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    row = read_metrics(out)[0]
    sizes = row["delta_rel_size"]
    for i, want in enumerate(sizes):
        assert ea.Scalars(f"epoch/delta_rel_size/{i}")[0].value == pytest.approx(want, rel=1e-6)
    assert ea.Scalars("epoch/delta_loss_gain")[0].value == pytest.approx(
        row["delta_loss_gain"], rel=1e-6)


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tensorboard\]"'):
        TensorBoardLog(tmp_path, {})


def test_overwrite_starts_the_pictures_and_events_afresh(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(out, logging={"tensorboard": True}))
    train(_cfg(out, epochs=2, logging={"tensorboard": True}), overwrite=True)
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("epoch/train_loss")] == [1, 2]  # the new run's only
    assert len(list((out / "tb").iterdir())) == 1
