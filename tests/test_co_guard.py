"""The catastrophic-overfitting guard of the per-epoch check (issue 22): it flags the first
collapse of robust accuracy under rising clean accuracy, once per run, also across a resume."""

from __future__ import annotations

import logging

import pytest

from robust_amo import train as train_mod
from robust_amo.cli import main
from robust_amo.config import load_config
from robust_amo.errors import ConfigError
from robust_amo.runs import RunDir
from robust_amo.train import CO_EPOCH, CO_FLAG, OverfitGuard, train
from tests.helpers import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

# (clean, robust) per epoch: robust 0.35 -> 0.1 (a 71% drop) while clean rises at epoch 3
COLLAPSE = [(0.5, 0.3), (0.6, 0.35), (0.8, 0.1), (0.85, 0.05), (0.9, 0.01)]


def _row(epoch, clean_robust):
    clean, robust = clean_robust
    return {"epoch": epoch, "clean_acc": clean, "robust_acc": robust}


def _observe(guard, checks):
    """Every epoch's line through ``guard``; the lines and the epochs it warned at."""
    rows, warned = [], []
    for epoch, cr in enumerate(checks, start=1):
        row = _row(epoch, cr) if cr is not None else {"epoch": epoch}
        if guard.observe(epoch, row):
            warned.append(epoch)
        rows.append(row)
    return rows, warned


def test_fires_once_on_a_collapse():
    rows, warned = _observe(OverfitGuard(0.5), COLLAPSE)
    assert warned == [3]
    assert [r.get(CO_FLAG) for r in rows] == [None, None, True, None, None]
    assert [r.get(CO_EPOCH) for r in rows] == [None, None, 3, 3, 3]


@pytest.mark.parametrize("checks", [
    # robust accuracy rising, with noise
    [(0.5, 0.2), (0.6, 0.3), (0.65, 0.28), (0.7, 0.33)],
    # robust halves exactly (not more than 0.5 of it) while clean rises
    [(0.5, 0.5), (0.6, 0.25)],
    # both fall (a too-large learning rate, not catastrophic overfitting)
    [(0.8, 0.4), (0.6, 0.1)],
    # robust collapses but clean does not rise
    [(0.8, 0.4), (0.8, 0.1)],
    # from 0 nothing can drop
    [(0.5, 0.0), (0.9, 0.0)],
])
def test_does_not_fire_on_normal_sequences(checks):
    rows, warned = _observe(OverfitGuard(0.5), checks)
    assert warned == [] and not any(CO_EPOCH in r or CO_FLAG in r for r in rows)


def test_threshold_and_off_switch():
    assert _observe(OverfitGuard(0.85), COLLAPSE)[1] == []  # drops of 71%, 50% and 80%
    assert _observe(OverfitGuard(0.75), COLLAPSE)[1] == [5]  # 0.05 -> 0.01 is the first > 75%
    assert _observe(OverfitGuard(0.7), COLLAPSE)[1] == [3]
    assert _observe(OverfitGuard(0.0), COLLAPSE)[1] == []


def test_compares_with_the_previous_check_across_unchecked_epochs():
    """eval.every 2: epochs without a check neither compare nor reset the previous check."""
    checks = [None, (0.6, 0.4), None, (0.8, 0.1), None]
    rows, warned = _observe(OverfitGuard(0.5), checks)
    assert warned == [4] and rows[4][CO_EPOCH] == 4 and CO_EPOCH not in rows[2]


def test_restored_from_rows():
    """A resumed run's guard: the last check of the history is the previous one, and a flagged
    collapse is not flagged again."""
    history = [_row(1, (0.6, 0.35)), {"epoch": 2}]
    guard = OverfitGuard.from_rows(0.5, history)
    assert guard.last == (0.6, 0.35) and guard.fired is None
    assert guard.observe(3, _row(3, (0.8, 0.1)))
    flagged, _ = _observe(OverfitGuard(0.5), COLLAPSE[:3])
    again = OverfitGuard.from_rows(0.5, flagged)
    assert again.fired == 3
    row = _row(4, (0.9, 0.0))
    assert not again.observe(4, row) and row[CO_EPOCH] == 3 and CO_FLAG not in row


@pytest.mark.parametrize("value", [-0.1, 1, 1.5, ".nan"])
def test_co_drop_is_validated(tmp_path, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"eval: {{co_drop: {value}}}\n")
    with pytest.raises(ConfigError, match="eval.co_drop"):
        load_config(cfg)


def test_cli_refuses_bad_co_drop(tmp_path, capsys):
    rc = main(["train", "--set", "eval.co_drop=2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2 and "eval.co_drop" in capsys.readouterr().err


@pytest.fixture
def scripted_checks(monkeypatch):
    """The trainer's per-epoch check replaced by COLLAPSE, one entry per call, across runs."""
    values = iter(COLLAPSE)

    def fake(model, loader, attack, amp, *, reduce_ranks=False):
        clean, robust = next(values)
        return {"clean_acc": clean, "robust_acc": robust, "n": 32}

    monkeypatch.setattr(train_mod, "evaluate", fake)


def _co_warnings(caplog):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and "catastrophic overfitting" in r.getMessage()]


@pytest.mark.usefixtures("scripted_checks")
def test_trainer_flags_once_and_survives_resume(tmp_path, caplog):
    """Epochs 1-2, resumed to 4 (the collapse at 3 is measured against epoch 2's check, read
    back from metrics.jsonl), resumed to 5 (no second warning; the flag's epoch goes on)."""
    run = RunDir(tmp_path)
    caplog.set_level(logging.WARNING, logger="robust_amo")
    train(tiny_run(tmp_path, epochs=2), progress=False)
    assert _co_warnings(caplog) == []
    train(tiny_run(tmp_path, epochs=4), resume=True, progress=False)
    assert len(_co_warnings(caplog)) == 1 and "epoch 3" in _co_warnings(caplog)[0].getMessage()
    caplog.clear()
    last = train(tiny_run(tmp_path, epochs=5), resume=True, progress=False)
    assert _co_warnings(caplog) == []
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get(CO_FLAG) for r in rows] == [None, None, True, None, None]
    assert [r.get(CO_EPOCH) for r in rows] == [None, None, 3, 3, 3]
    assert last[CO_EPOCH] == 3
