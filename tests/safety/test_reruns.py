"""Issue 11, parts 2 and 5: a rerun never destroys an earlier run, a resume continues the same
run, and faults during a checkpoint write leave the previous one intact."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.checkpoint import format as ckpt_format
from robust_amo.cli import main
from robust_amo.errors import OutputError
from robust_amo.models import create_model
from robust_amo.runs import config_differences
from robust_amo.train import train
from tests.helpers import tiny_run

TRAIN = ["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard",
         "--epochs", "1", "--batch-size", "64", "--no-progress", "--set", "data.augment=false",
         "--set", "data.train_subset=200", "--set", "eval.n_examples=32", "--set", "eval.steps=0"]


def _cfg(out, **kw):
    return tiny_run(out, **{"data": {"augment": True, "train_subset": 200}, **kw})


def _err(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--out", str(out)]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    ck = (out / ckpt_io.LAST).read_bytes()
    capsys.readouterr()
    assert main(TRAIN + ["--out", str(out), "--seed", "3"]) == 2
    err = _err(capsys)
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / ckpt_io.LAST).read_bytes() == ck
    assert "seed: 0" in (out / "config.yaml").read_text()
    assert main(TRAIN + ["--out", str(out), "--seed", "3", "--overwrite"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "seed: 3" in (out / "config.yaml").read_text()


def test_a_folder_without_a_run_is_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(TRAIN + ["--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    assert main(TRAIN + ["--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _err(capsys)


def test_resume_refuses_a_changed_config_listing_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--out", str(out), "--lr", "0.05"]) == 0
    config = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(TRAIN + ["--out", str(out), "--resume", "--lr", "0.2", "--seed", "7"]) == 2
    err = _err(capsys)
    assert "optim.lr (0.05 -> 0.2)" in err and "seed (0 -> 7)" in err
    assert (out / "config.yaml").read_text() == config  # the refused resume changed nothing
    # more epochs, another device spelling and progress settings are the same run
    assert main(TRAIN + ["--out", str(out), "--resume", "--lr", "0.05", "--epochs", "2",
                         "--device", "cpu", "--set", "log_every=7"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_config_differences_ignores_only_the_free_keys():
    a = _cfg("a").to_dict()
    b = _cfg("b", epochs=9, device="cpu", log_every=3).to_dict()
    assert config_differences(a, b) == []
    c = _cfg("a", attack={"eps": 0.2, "step_size": 0.05, "steps": 2},
             data={"augment": False, "train_subset": 200})
    diff = config_differences(a, c.to_dict())
    assert diff == ["attack.eps (0.1 -> 0.2)", "data.augment (True -> False)"]


def test_temp_file_of_a_killed_write_is_removed_and_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    train(_cfg(full))
    part = tmp_path / "part"

    def kill_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(part), callbacks=[kill_after_first_epoch])
    # a kill in the middle of writing epoch 2's checkpoint: half a temp file, epoch 1 intact
    tmp = part / ".checkpoint.pt.k1ll3d.tmp"
    tmp.write_bytes(b"PK\x03\x04 half of a checkpoint")
    torch.manual_seed(99)
    train(_cfg(part), resume=True)
    assert not tmp.exists()
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(part)
    for k, v in ckpt_io.model_state(a).items():
        assert torch.equal(v, ckpt_io.model_state(b)[k]), k


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1))
    before = (out / ckpt_io.LAST).read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_format.torch, "save", full_disk)
    with pytest.raises(OutputError, match="no space left on the device .*checkpoint.pt is intact"):
        train(_cfg(out), resume=True)
    monkeypatch.undo()
    assert (out / ckpt_io.LAST).read_bytes() == before
    assert not list(out.glob(".*.tmp"))
    assert ckpt_io.load_checkpoint(out)["epoch"] == 1


@pytest.mark.parametrize("command", ["train", "eval", "margins", "convert"])
def test_an_unwritable_out_is_one_line(command, tmp_path, capsys, trained_run):
    bad = "/proc/robust-amo-x"
    args = {"train": TRAIN + ["--out", bad],
            "eval": ["eval", "--checkpoint", str(trained_run), "--attack", "clean", "--out",
                     f"{bad}/report.json", "--no-progress"],
            "margins": ["margins", "--checkpoint", str(trained_run), "--out", bad,
                        "--no-progress"],
            "convert": ["convert-checkpoint", str(trained_run), f"{bad}/r.pt"]}[command]
    assert main(args) == 2
    assert "cannot write" in _err(capsys)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(TRAIN + ["--out", str(out)]) == 0
    return out


def test_eval_and_margins_keep_an_earlier_report(trained_run, tmp_path, capsys):
    ev = ["eval", "--checkpoint", str(trained_run), "--attack", "clean", "--n-examples", "16",
          "--no-progress", "--no-sanity", "--out", str(tmp_path / "e" / "report.json")]
    assert main(ev) == 0
    first = (tmp_path / "e" / "report.json").read_text()
    capsys.readouterr()
    assert main(ev) == 2
    assert "already holds a report" in _err(capsys)
    assert (tmp_path / "e" / "report.json").read_text() == first
    assert main(ev + ["--overwrite"]) == 0

    mg = ["margins", "--checkpoint", str(trained_run), "--n-examples", "4", "--no-progress",
          "--no-plots", "--no-adv", "--no-input-margin", "--out", str(tmp_path / "m")]
    assert main(mg) == 0
    capsys.readouterr()
    assert main(mg) == 2
    assert "already holds a margins report" in _err(capsys)
    assert main(mg + ["--overwrite"]) == 0


def test_convert_refuses_an_existing_destination(trained_run, tmp_path, capsys):
    dst = tmp_path / "r.pt"
    assert main(["convert-checkpoint", str(trained_run), str(dst)]) == 0
    capsys.readouterr()
    assert main(["convert-checkpoint", str(trained_run), str(dst)]) == 2
    assert "--overwrite" in _err(capsys)
    assert main(["convert-checkpoint", str(trained_run), str(dst), "--overwrite"]) == 0


def test_eval_rejects_a_disagreeing_arch_and_pgd0(trained_run, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(trained_run), "--n-examples", "8", "--no-progress",
            "--out", str(tmp_path / "r.json")]
    assert main(base + ["--arch", "tiny-mlp"]) == 2
    assert "disagrees with the checkpoint" in _err(capsys)
    assert main(base + ["--attack", "pgd0"]) == 2
    assert "at least one step" in _err(capsys)


def test_a_checkpoint_whose_input_shape_differs_from_the_data(trained_run, tmp_path, capsys):
    # a model built for 16x16 inputs that records the 8x8 digits as its dataset
    model = create_model("tiny-cnn", 10, input_shape=(1, 16, 16), mean=[0.5], std=[0.5])
    ck = ckpt_io.build_checkpoint(arch="tiny-cnn", num_classes=10, input_shape=[1, 16, 16],
                                  mean=[0.5], std=[0.5], model_kwargs={}, dataset="digits",
                                  method="standard", model=model, epoch=1)
    torch.save(ck, tmp_path / "other.pt")
    rc = main(["eval", "--checkpoint", str(tmp_path / "other.pt"), "--attack", "clean",
               "--no-progress", "--out", str(tmp_path / "r.json")])
    assert rc == 2
    assert "(1, 16, 16)" in _err(capsys)
