"""The run folder (robust_amo.runs): its names, the one metrics reader, appender and truncation,
and the checks before a run starts, continues or is started over."""

from __future__ import annotations

import json
import logging

import pytest

from robust_amo import checkpoint as ckpt_io
from robust_amo import runs, tblog
from robust_amo.errors import CheckpointError, ConfigError, OutputError
from robust_amo.outputs import fcntl
from robust_amo.runs import RUN_FILES, RunDir, read_metrics
from robust_amo.train import train
from tests.helpers import tiny_run


def test_every_name_of_a_run_folder_comes_from_runs(tmp_path):
    run = RunDir(tmp_path)
    assert (run.last.name, run.best.name, run.metrics.name, run.config.name, run.curves.name,
            run.tb.name) == ("checkpoint.pt", "best.pt", "metrics.jsonl", "config.yaml",
                             "curves.png", "tb")
    assert (ckpt_io.LAST, ckpt_io.BEST, tblog.FOLDER) == (runs.LAST, runs.BEST, runs.TB_FOLDER)
    assert RUN_FILES == (runs.LAST, runs.BEST, runs.METRICS)
    assert RunDir(str(tmp_path)) == run


def test_append_then_read_round_trips(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.read_metrics() == [] and run.epochs_done() == 0 and not run.holds_run()
    run.path.mkdir()
    rows = [{"epoch": 1, "train_loss": 0.5, "robust_acc": float("nan")}, {"epoch": 2, "lr": 0.1}]
    for r in rows:
        run.append_metrics(r)
    text = run.metrics.read_text()
    assert text == "".join(json.dumps(r) + "\n" for r in rows)  # one object per line
    got = run.read_metrics()
    assert [r["epoch"] for r in got] == [1, 2] and got[1] == rows[1]
    assert read_metrics(run.metrics) == got == read_metrics(run.path)  # the file or the folder
    assert run.epochs_done() == 2 and run.finished(2) and not run.finished(3)
    assert run.holds_run()


def test_the_reader_skips_what_is_not_a_row(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text('{"epoch": 1}\n\n[1, 2]\n{"no_epoch": 1}\n"text"\n{"epoch": 2}\n'
                           '{"epoch": 3, "a"')
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    assert run.epochs_done() == 2


def test_truncation_survives_a_half_written_line(tmp_path, caplog):
    run = RunDir(tmp_path)
    path = run.metrics
    path.write_text('{"epoch": 1, "a": 1}\n{"epoch": 2, "a": 2}\n{"epoch": 3, "a"')
    with caplog.at_level(logging.WARNING, logger="robust_amo.runs"):
        run.truncate_metrics(2)
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [1, 2]
    assert "dropping an unreadable line" in caplog.text and '{"epoch": 3, "a"' in caplog.text
    run.truncate_metrics(1)
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [1]
    assert path.read_text() == '{"epoch": 1, "a": 1}\n'  # kept lines keep their exact text
    RunDir(tmp_path / "none").truncate_metrics(0)  # no file: nothing to do
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("name", RUN_FILES)
def test_each_run_file_makes_a_folder_hold_a_run(tmp_path, name):
    run = RunDir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("{}")
    assert not run.holds_run()
    (tmp_path / name).write_text("")
    assert run.holds_run()


def _fill(run: RunDir) -> None:
    for name in RUN_FILES:
        (run.path / name).write_text("x")
    run.curves.write_text("png")
    run.tb.mkdir()
    (run.tb / "events").write_text("e")
    (run.path / "notes.txt").write_text("mine")


def test_prepare_refuses_a_run_without_resume_or_overwrite(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)  # created, empty: fine
    assert run.path.is_dir()
    _fill(run)
    with pytest.raises(OutputError) as e:
        run.prepare(resume=False, overwrite=False)
    msg = str(e.value)
    assert "\n" not in msg and "(resume)" in msg and "(overwrite," in msg and str(run.path) in msg
    assert "--" not in msg  # the library names parameters; the CLI says them as flags
    assert all((run.path / n).exists() for n in RUN_FILES)


def test_prepare_to_resume_keeps_the_run_and_removes_temp_files(tmp_path):
    run = RunDir(tmp_path)
    _fill(run)
    (tmp_path / ".checkpoint.pt.abc.tmp").write_text("half")
    run.prepare(resume=True, overwrite=False)
    assert all((tmp_path / n).read_text() == "x" for n in RUN_FILES) and run.tb.is_dir()
    assert not (tmp_path / ".checkpoint.pt.abc.tmp").exists()


def test_prepare_to_overwrite_deletes_the_run_only(tmp_path):
    run = RunDir(tmp_path)
    _fill(run)
    run.prepare(resume=False, overwrite=True)
    assert not run.holds_run() and not run.curves.exists() and not run.tb.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prepare_checks_its_arguments_and_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        RunDir(tmp_path).prepare(resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        RunDir(tmp_path / "file").prepare(resume=False, overwrite=False)


@pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")
def test_the_run_lock_admits_one_writer(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock():
        assert (run.path / runs.LOCK).exists()
        with pytest.raises(OutputError, match="in use by another robust-amo train"), run.lock():
            pass
    with run.lock():  # released
        pass


def test_check_resume_names_the_changed_keys(tmp_path):
    cfg = tiny_run(tmp_path, data={"train_subset": 200})
    run = RunDir(tmp_path)
    saved = {"config": cfg.to_dict(), "robust_amo_version": "99.0.0"}
    run.check_resume(saved, cfg)
    run.check_resume(saved, tiny_run(tmp_path, epochs=9, device="cpu", data={
        "train_subset": 200, "data_dir": "elsewhere"}))  # free keys
    with pytest.raises(CheckpointError) as e:
        run.check_resume(saved, tiny_run(tmp_path, seed=3, data={"train_subset": 200}))
    assert "seed (0 -> 3)" in str(e.value) and str(run.last) in str(e.value)
    # whether an older version drew the data differently is data.check_split_version's
    # question (tests/test_data_splits.py), asked by the trainer right after this check
    run.check_resume({**saved, "robust_amo_version": "0.1.0"}, cfg)


def test_train_writes_what_runs_reads(tmp_path):
    metrics = train(tiny_run(tmp_path, epochs=2))
    run = RunDir(tmp_path)
    rows = run.read_metrics()
    assert run.holds_run() and run.finished(2) and rows[-1] == json.loads(json.dumps(metrics))
    assert run.last.is_file() and run.config.is_file() and run.curves.is_file()
