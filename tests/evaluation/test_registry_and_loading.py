"""The registry of evaluation attacks and the one checkpoint loader of eval and margins."""

from __future__ import annotations

import json

import pytest
import torch

from robust_amo.checkpoint import atomic_save, read_file
from robust_amo.cli import main
from robust_amo.errors import ConfigError, DataError
from robust_amo.evaluation import (
    EVAL_ATTACKS,
    EvalAttack,
    evaluate_attacks,
    load_for_analysis,
    parse_attack,
    register_eval_attack,
    threat_model,
)
from robust_amo.evaluation.attacks import attack_help
from robust_amo.resolve import resolve
from robust_amo.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch PGD run on digits with a held-out split."""
    out = tmp_path_factory.mktemp("run")
    train(resolve(None, [{"arch": "tiny-cnn", "dataset": "digits", "method": "pgd", "epochs": 1,
                          "batch_size": 64, "out": str(out),
                          "data": {"augment": False, "val_size": 40},
                          "attack": {"eps": 0.2, "step_size": 0.05, "steps": 1},
                          "eval": {"n_examples": 16, "steps": 1}}]))
    return out


class Shift(EvalAttack):
    """A test attack: adds +eps to every pixel (a fixed corner of the L∞ ball)."""

    kind = "shift"

    def __init__(self, name: str, eps: float) -> None:
        super().__init__(name)
        self.eps = eps

    def settings(self):
        return {"eps": self.eps}

    def run_chunk(self, model, x, y, index, *, amp, partial, save_partial):
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).cpu()
            adv = (model((x + self.eps).clamp(0, 1)).argmax(1) == y).cpu()
        return {"clean": clean, "robust": clean & adv, "steps": {}}


def test_one_registered_function_adds_an_attack(monkeypatch):
    monkeypatch.setattr("robust_amo.evaluation.attacks.EVAL_ATTACKS", dict(EVAL_ATTACKS))

    @register_eval_attack("shift", "add eps to every pixel")
    def _shift(name, opts):
        return Shift(name, opts.eps) if name == "shift" else None

    a = parse_attack("Shift", eps=0.3)
    assert isinstance(a, Shift) and a.eps == 0.3 and "shift: add eps" in attack_help()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.rand(6, 1, 2, 2)
    y = model(x).argmax(1)
    (clean, shift) = evaluate_attacks(model, x, y, [parse_attack("clean", eps=0.3), a],
                                      batch_size=4)
    assert clean.robust.all() and shift.spec is a
    with torch.no_grad():
        expect = model((x + 0.3).clamp(0, 1)).argmax(1) == y
    assert torch.equal(shift.robust, expect)
    with pytest.raises(ConfigError, match="shift"):  # the error lists the registered names
        parse_attack("pgd-x", eps=0.1)


def test_threat_model_defaults_to_the_training_attack():
    meta = {"config": {"attack": {"eps": 0.2, "step_size": 0.05, "norm": "linf", "loss": "cw"}}}
    t = threat_model(meta)
    assert (t.eps, t.step_size, t.norm, t.loss) == (0.2, 0.05, "linf", "cw")
    t = threat_model(meta, eps="8/255", step_size="1/255")
    assert t.eps == pytest.approx(8 / 255) and t.step_size == pytest.approx(1 / 255)
    assert threat_model(meta, eps=1.0, norm="l2").norm == "l2"
    with pytest.raises(ConfigError, match="give eps"):
        threat_model(meta, norm="l2")
    for bad in ({"eps": "-1"}, {"step_size": "0"}, {"eps": "inf"}):
        with pytest.raises(ConfigError):
            threat_model(meta, **bad)


def test_load_for_analysis_reads_every_split_and_both_checkpoints(run):
    a = load_for_analysis(run, which="best", split="val", n_examples=10)
    assert a.meta["path"].endswith("best.pt") and len(a.data.y) == 10
    assert a.data.split == "val" and not a.model.training
    assert a.threat.eps == pytest.approx(0.2)
    train_part = load_for_analysis(run, split="train", n_examples=5).data
    assert train_part.x.shape == (5, 1, 8, 8) and 0 <= train_part.x.min() <= train_part.x.max() <= 1
    with pytest.raises(ConfigError, match="split"):
        load_for_analysis(run, split="all")


def test_eval_and_margins_spell_the_checkpoint_options_alike(run, tmp_path):
    for cmd in (["eval", "--attack", "clean", "--no-sanity"],
                ["margins", "--no-adv", "--no-input-margin", "--no-plots", "--rounds", "1"]):
        out = tmp_path / cmd[0]
        target = str(out / "r.json") if cmd[0] == "eval" else str(out)
        assert main([*cmd, "--checkpoint", str(run), "--which", "best", "--split", "val",
                     "--n-examples", "8", "--eps", "0.1", "--no-progress", "--out", target]) == 0
    assert json.loads((tmp_path / "eval" / "r.json").read_text())["split"] == "val"
    assert json.loads((tmp_path / "margins" / "summary.json").read_text())["settings"][
        "split"] == "val"


def test_runs_written_before_0_2_cannot_be_resplit_or_resumed(run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    ck = read_file(old / "checkpoint.pt")
    ck["robust_amo_version"] = "0.1.0"  # its held-out split was drawn with another seed rule
    atomic_save(ck, old / "checkpoint.pt")
    with pytest.raises(DataError, match="^split val .*; use the test split$"):
        load_for_analysis(old, split="val")
    assert len(load_for_analysis(old, split="test", n_examples=4).data.y) == 4
    rc = main(["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "pgd",
               "--epochs", "2", "--batch-size", "64", "--set", "data.val_size=40",
               "--set", "data.augment=false", "--set", "attack.eps=0.2",
               "--set", "attack.step_size=0.05", "--set", "attack.steps=1",
               "--set", "eval.n_examples=16", "--set", "eval.steps=1",
               "--out", str(old), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "other training data" in err and err.count("\n") == 1
