"""Issue 11, part 1: no entry point unpickles a file in full unless the user says so.

A checkpoint crafted with a ``__reduce__`` payload (it creates a marker file when unpickled) is
handed to every command that reads checkpoints or state files: the payload must not run and the
command must exit 2 with a one-line message that names ``--unsafe-load``.
"""

from __future__ import annotations

import argparse
import builtins
import logging

import pytest
import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.cli import main
from robust_amo.errors import CheckpointError
from robust_amo.evaluation.runner import EvalState
from robust_amo.resolve import resolve
from robust_amo.train import train


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the load runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _cfg(out, **kw):
    base = {"arch": "tiny-cnn", "dataset": "digits", "method": "standard", "epochs": 1,
            "batch_size": 64, "out": str(out), "data": {"augment": False, "train_subset": 200},
            "optim": {"lr": 0.05, "schedule": "constant"}, "eval": {"n_examples": 32, "steps": 0}}
    base.update(kw)
    return resolve(None, [base])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(_cfg(out))
    return out


def _evil(path, marker):
    torch.save({"format": ckpt_io.FORMAT, "version": 2, "model": {}, "x": Payload(marker)}, path)
    return path


def _one_line_exit_2(rc, capsys, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_our_checkpoints_load_weights_only(run):
    ck = torch.load(run / ckpt_io.LAST, weights_only=True)  # no allowlist at all
    assert ck["format"] == ckpt_io.FORMAT and isinstance(ck["torch_version"], str)
    assert isinstance(ck["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = ckpt_io.rng_state()
    ckpt_io.atomic_save({"rng": state}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.set_rng_state(ckpt_io.read_file(tmp_path / "s.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_read_file_refuses_a_payload(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CheckpointError, match="allow it with unsafe_load$") as e:
        ckpt_io.read_file(_evil(tmp_path / "evil.pt", marker))
    assert e.value.params == ("unsafe_load",)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "margins"])
def test_analysis_commands_refuse_a_payload(command, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil.pt", marker)
    rc = main([command, "--checkpoint", str(evil), "--no-progress", "--out",
               str(tmp_path / "out" / ("report.json" if command == "eval" else ""))])
    _one_line_exit_2(rc, capsys, "--unsafe-load", "run code")
    assert not marker.exists()


def test_train_resume_refuses_a_planted_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out))
    marker = tmp_path / "ran"
    _evil(out / ckpt_io.LAST, marker)
    rc = main(["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard",
               "--out", str(out), "--resume", "--no-progress"])
    _one_line_exit_2(rc, capsys, "--unsafe-load")
    assert not marker.exists()


def test_convert_refuses_a_payload(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil.pt", marker)
    rc = main(["convert-checkpoint", str(evil), str(tmp_path / "dst.pt")])
    _one_line_exit_2(rc, capsys, "--unsafe-load")
    assert not marker.exists() and not (tmp_path / "dst.pt").exists()


def test_eval_resume_refuses_a_planted_state_file(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    out = tmp_path / "eval" / "report.json"
    out.parent.mkdir()
    torch.save({"format": "robust-amo-eval-state", "x": Payload(marker)},
               out.with_suffix(".state.pt"))
    rc = main(["eval", "--checkpoint", str(run), "--attack", "pgd2", "--n-examples", "16",
               "--no-progress", "--no-sanity", "--resume", "--out", str(out)])
    _one_line_exit_2(rc, capsys, "evaluation state")
    assert not marker.exists()


def test_an_evaluation_state_file_still_loads(tmp_path):
    path = tmp_path / "s.state.pt"
    st = EvalState(path, {"a": 1}, resume=False)
    st.data["attacks"]["pgd2"] = {"settings": {"steps": 2}, "chunks": {0: torch.ones(3).bool()}}
    st.save()
    again = EvalState(path, {"a": 1}, resume=True)
    assert torch.equal(again.data["attacks"]["pgd2"]["chunks"][0], torch.ones(3).bool())


def test_unsafe_load_reads_a_trusted_pickle_with_a_warning(run, tmp_path, capsys, caplog):
    ck = torch.load(run / ckpt_io.LAST, weights_only=True)
    ck["notes"] = argparse.Namespace(author="me")  # a harmless object, not a plain container
    torch.save(ck, tmp_path / "pickled.pt")
    args = ["eval", "--checkpoint", str(tmp_path / "pickled.pt"), "--attack", "clean",
            "--n-examples", "16", "--no-progress", "--no-sanity"]
    rc = main(args + ["--out", str(tmp_path / "a" / "report.json")])
    _one_line_exit_2(rc, capsys, "argparse.Namespace", "--unsafe-load")
    with caplog.at_level(logging.WARNING):
        rc = main(args + ["--out", str(tmp_path / "b" / "report.json"), "--unsafe-load"])
    assert rc == 0 and (tmp_path / "b" / "report.json").is_file()
    assert any("runs code from the file" in r.getMessage() for r in caplog.records)


def test_truncated_checkpoint_advice_fits_the_command(run, tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    data = (run / ckpt_io.LAST).read_bytes()
    (bad / ckpt_io.LAST).write_bytes(data[: len(data) // 2])
    rc = main(["eval", "--checkpoint", str(bad), "--no-progress", "--attack", "clean"])
    err = _one_line_exit_2(rc, capsys, "truncated or corrupt", "--which best")
    assert "--resume" not in err
    rc = main(["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard",
               "--out", str(bad), "--resume", "--no-progress"])
    _one_line_exit_2(rc, capsys, "truncated or corrupt", "--overwrite", "best.pt")
