"""The per-epoch check, and so best.pt, runs on examples held out of the training set unless a
config names the test split; metrics, the log and config.yaml say which split and how many;
runs started before this default resume exactly as they ran (issue 20, item 1)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from robust_amo import checkpoint as ckpt_io
from robust_amo.cli import main
from robust_amo.data import AUTO_MAX, held_out_size
from robust_amo.errors import ConfigError
from robust_amo.train import train
from tests.helpers import tiny_run


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def test_auto_holds_out_a_tenth_at_most_1000_and_none_for_a_test_check():
    assert held_out_size("auto", 1500) == 150  # digits
    assert held_out_size("auto", 50_000) == AUTO_MAX == 1000  # CIFAR-10
    assert held_out_size("auto", 100) == 10  # the README's image folder
    assert held_out_size("auto", 5) == 1
    assert held_out_size("auto", 1500, "test") == 0
    assert held_out_size(40, 1500, "test") == 40  # a count is a count


def test_the_default_check_uses_held_out_training_examples(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="robust_amo.train")
    train(tiny_run(tmp_path, eval={"n_examples": 1000, "steps": 2}))
    rows = _rows(tmp_path)
    # train_subset 200: 20 held out, 180 trained on; every checked epoch says so
    assert [(r["check_split"], r["check_examples"]) for r in rows] == [("val", 20)] * 2
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["val_size"] == 20 and saved["eval"]["split"] == "auto"
    assert ckpt_io.load_checkpoint(tmp_path)["config"]["data"]["val_size"] == 20
    text = caplog.text
    assert "180 train examples" in text and "20 held-out training (val) examples" in text
    assert "epoch 1 (check on the val split)" in text
    assert "test split" not in text


def test_metrics_carry_the_split_only_on_epochs_that_ran_the_check(tmp_path):
    train(tiny_run(tmp_path, epochs=3, eval={"every": 2, "n_examples": 8, "steps": 1}))
    rows = _rows(tmp_path)
    assert ["check_split" in r for r in rows] == [False, True, True]
    assert rows[1]["check_examples"] == 8 and rows[1]["check_split"] == "val"


def test_the_test_split_only_by_name_and_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="robust_amo.train")
    train(tiny_run(tmp_path, eval={"split": "test", "n_examples": 32, "steps": 1}))
    rows = _rows(tmp_path)
    assert {(r["check_split"], r["check_examples"]) for r in rows} == {("test", 32)}
    # nothing held out under a test check: all 200 examples train
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["val_size"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "eval.split: test" in warnings[0].getMessage()
    assert "200 train examples" in caplog.text and "32 TEST-split examples" in caplog.text


def test_holding_nothing_out_without_naming_the_test_split_is_refused(tmp_path, capsys):
    cfg = tiny_run(tmp_path / "lib", data={"val_size": 0})
    with pytest.raises(ConfigError, match="eval.split: test") as e:
        train(cfg)
    assert e.value.params == ("data.val_size",)
    out = tmp_path / "cli"
    assert main(["train", "--dataset", "digits", "--val-size", "0", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robust-amo: error: --val-size 0 holds no training examples out")
    assert err.count("\n") == 1 and not out.exists()


def test_an_old_run_resumes_on_the_test_split_as_it_ran_with_a_warning(tmp_path, caplog):
    """A run of an earlier version: data.val_size 0 and eval.split auto, so its check ran on
    the test split. Resumed under today's defaults it goes on exactly as it would have."""
    old = {"data": {"val_size": 0}, "eval": {"split": "test", "n_examples": 32, "steps": 1}}
    full = tmp_path / "full"
    train(tiny_run(full, **old))

    def kill(epoch, metrics):
        if epoch == 1:
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        train(tiny_run(part, **old), callbacks=[kill])
    # what the earlier version saved: val_size 0, split auto, a schedule without a plan
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    ck["config"]["eval"]["split"] = "auto"
    for key in ("model", "model_points"):
        ck["config"].pop(key)
    ck["scheduler"]["lr_lambdas"] = [None]
    torch.save(ck, part / "checkpoint.pt")

    caplog.set_level(logging.INFO, logger="robust_amo.train")
    caplog.clear()
    train(tiny_run(part, eval={"n_examples": 32, "steps": 1}), resume=True)
    rows = _rows(part)
    assert [(r["check_split"], r["check_examples"]) for r in rows] == [("test", 32)] * 2
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(part)
    for k, v in ckpt_io.model_state(a).items():
        assert torch.equal(v, ckpt_io.model_state(b)[k]), k
    assert [r["robust_acc"] for r in rows] == [r["robust_acc"] for r in _rows(full)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "selects best.pt on the test split" in warned[0]
