"""A full disk (ENOSPC) or quota (EDQUOT) at any write is one line and exit status 2, and what
was written before stays valid (issue 20, item 15).

Faults are injected at the system call: ``os.write`` fails for one file name (found through
/proc/self/fd, so Linux only), after writing part of the data when asked, as a device that
fills midway does; the checkpoint's ``torch.save`` and the margins writer are patched the same
way.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.checkpoint import format as ckpt_format
from robust_amo.cli import main
from robust_amo.errors import OutputError
from robust_amo.outputs import append_line, atomic_write, disk_writes
from robust_amo.runs import read_metrics

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                reason="finds a descriptor's file through /proc/self/fd")

margins_measure = importlib.import_module("robust_amo.margins.measure")  # the name is a function

TRAIN = ["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard",
         "--epochs", "2", "--batch-size", "64", "--n-examples", "16", "--set",
         "data.train_subset=128", "--set", "data.augment=false", "--device", "cpu",
         "--no-progress"]


def _full(name: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", name)


def fail_writes(monkeypatch, name: str, *, after: int = 0, partial: bool = False,
                code: int = errno.ENOSPC) -> None:
    """``os.write`` to a file called ``name`` fails with ``code`` from its ``after + 1``-th
    write on, having written half its data first when ``partial``."""
    real = os.write
    count = [0]

    def write(fd: int, data) -> int:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == name:
            count[0] += 1
            if count[0] > after:
                if partial:
                    real(fd, bytes(data)[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _epochs(run: Path) -> list[int]:
    """Epochs in metrics.jsonl; every line must be a whole JSON object."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["epoch"] for ln in lines]


def test_a_full_disk_at_the_lock_file_is_one_line(tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, ".robust-amo.lock")
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 2
    line = _one_line(capsys)
    assert line.startswith("robust-amo: error: no space left on the device holding "), line
    assert "--resume" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_at_a_metrics_line_keeps_the_earlier_epochs(code, tmp_path, monkeypatch,
                                                                capsys):
    run = tmp_path / "run"
    # epoch 2's line: half of it reaches the file before the device is full
    fail_writes(monkeypatch, "metrics.jsonl", after=1, partial=True, code=code)
    assert main([*TRAIN, "--out", str(run)]) == 2
    assert "no space left on the device holding" in _one_line(capsys)
    monkeypatch.undo()
    assert _epochs(run) == [1]  # no half line
    assert ckpt_io.load_checkpoint(run)["epoch"] == 1
    assert main([*TRAIN, "--out", str(run), "--resume"]) == 0  # free space and rerun
    assert _epochs(run) == [1, 2]


def test_a_full_disk_at_curves_png_keeps_the_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fail_writes(monkeypatch, ".curves.png.tmp", partial=True)
    assert main([*TRAIN, "--out", str(run)]) == 2
    assert "no space left on the device holding" in _one_line(capsys)
    monkeypatch.undo()
    assert _epochs(run) == [1, 2]
    assert ckpt_io.load_checkpoint(run)["epoch"] == 2
    assert not list(run.glob(".*.tmp")) and not (run / "curves.png").exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] > 2:  # epoch 1 wrote checkpoint.pt and best.pt
            raise _full(str(f))
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_format.torch, "save", save)
    assert main([*TRAIN, "--out", str(run)]) == 2
    line = _one_line(capsys)
    assert "no space left on the device holding" in line and "is intact" in line, line
    monkeypatch.undo()
    assert ckpt_io.load_checkpoint(run)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_a_full_disk_at_config_yaml_is_one_line(tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, ".config.yaml.tmp")
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 2
    assert "no space left on the device holding" in _one_line(capsys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full-disk") / "run"
    assert main([*TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("name", ["report.json", "report.md"])
def test_a_full_disk_at_an_eval_report_is_one_line(name, trained, tmp_path, monkeypatch,
                                                   capsys):
    fail_writes(monkeypatch, f".{name}.tmp")
    out = tmp_path / "eval" / "report.json"
    assert main(["eval", "--checkpoint", str(trained), "--attack", "clean", "--n-examples", "8",
                 "--no-progress", "--device", "cpu", "--out", str(out)]) == 2
    assert "no space left on the device holding" in _one_line(capsys)
    assert not list(out.parent.glob(".*.tmp"))


def test_a_full_disk_at_the_margins_files_is_one_line(trained, tmp_path, monkeypatch, capsys):
    def write_csv(path, *a, **k):
        raise _full(str(path))

    monkeypatch.setattr(margins_measure, "write_csv", write_csv)
    assert main(["margins", "--checkpoint", str(trained), "--n-examples", "2", "--no-adv",
                 "--no-input-margin", "--attack-steps", "2", "--rounds", "1", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "m")]) == 2
    assert "no space left on the device holding" in _one_line(capsys)


def test_a_full_disk_at_plot_is_one_line(trained, tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, ".c.png.tmp")
    assert main(["plot", str(trained), "--out", str(tmp_path / "c.png")]) == 2
    assert "no space left on the device holding" in _one_line(capsys)


def test_a_full_disk_elsewhere_is_one_line_too(monkeypatch, capsys):
    from robust_amo.cli import archs

    def run(args):
        raise _full("/somewhere/cache.bin")

    monkeypatch.setattr(archs, "run", run)
    assert main(["archs"]) == 2
    assert _one_line(capsys) == ("robust-amo: error: no space left on the device holding "
                                 "/somewhere/cache.bin: free space and run the command again "
                                 "(with resume to continue a run)")


def test_append_line_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    append_line(path, '{"epoch": 1}')
    fail_writes(monkeypatch, "m.jsonl", partial=True)
    with pytest.raises(OutputError, match="no space left"):
        append_line(path, '{"epoch": 2, "long": "' + "x" * 1000 + '"}')
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 1}\n'


def test_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write(path, "old")
    fail_writes(monkeypatch, ".r.json.tmp", partial=True)
    with pytest.raises(OutputError, match=r"no space left .*r\.json; the previous r\.json is "
                                          "intact"):
        atomic_write(path, "new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_other_write_errors_are_one_line_and_ours_pass(tmp_path):
    with pytest.raises(OutputError, match=r"^cannot write x \(Permission denied\); choose an "
                                          "out folder"):
        with disk_writes("x"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(OutputError, match="^mine$"):
        with disk_writes("x"):
            raise OutputError("mine")


def test_a_metrics_file_that_is_not_utf8_is_read_around(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 1, "train_loss": 1.0}\n\xff\xfe\x00junk\n')
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00\x81 not text\n")
    assert main(["plot", str(run)]) == 2
    assert "holds no metrics.jsonl with epochs" in _one_line(capsys)


def test_the_python_api_names_parameters_not_flags():
    with pytest.raises(OutputError) as e:
        with disk_writes("runs/x/metrics.jsonl"):
            raise _full("runs/x/metrics.jsonl")
    assert e.value.params == ("resume",) and "--" not in str(e.value)
