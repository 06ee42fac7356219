"""The library's evaluation and margins workflows: one-call APIs equal the commands, the typed
Report reads and writes report.json, the threat model validates once, errors name parameters."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import robust_amo
from robust_amo.attacks import PGD
from robust_amo.checkpoint import load_checkpoint, model_from_checkpoint
from robust_amo.cli import main
from robust_amo.config import AllLayerOptions, ThreatModel, load_config
from robust_amo.errors import ConfigError
from robust_amo.evaluation import (
    EvalRequest,
    MarginsRequest,
    evaluate_checkpoint,
    load_eval_data,
    measure_checkpoint,
)
from robust_amo.evaluation import api as eval_api
from robust_amo.evaluation.report import SCHEMA, Report, markdown
from robust_amo.margins import SearchOptions, measure
from robust_amo.resolve import resolve
from robust_amo.train import train
from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    train(tiny_run(out, epochs=1, device="cpu"))
    return out


def _model(run):
    return model_from_checkpoint(load_checkpoint(run / "checkpoint.pt")).eval()


@pytest.fixture
def captured(monkeypatch):
    """The per-example outcomes of every evaluation run in the test, in call order."""
    calls = []
    real = eval_api.evaluate_attacks

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(eval_api, "evaluate_attacks", spy)
    return calls


def test_evaluate_gives_the_masks_of_the_command(run, tmp_path, captured, capsys):
    out = tmp_path / "cli" / "report.json"
    assert main(["eval", "--checkpoint", str(run), "--attack", "pgd5", "--restarts", "2",
                 "--n-examples", "40", "--eps", "0.1", "--seed", "3", "--batch-size", "16",
                 "--device", "cpu", "--no-progress", "--no-sanity", "--out", str(out)]) == 0
    assert "| pgd5 |" in capsys.readouterr().out
    report = robust_amo.evaluate(_model(run), dataset="digits", eps=0.1, attacks=["pgd5"],
                                 restarts=2, n_examples=40, seed=3, batch_size=16,
                                 sanity=False)
    (cli, lib) = captured
    assert [o.spec.name for o in cli] == [o.spec.name for o in lib] == ["clean", "pgd5"]
    for a, b in zip(cli, lib, strict=True):
        assert torch.equal(a.clean, b.clean) and torch.equal(a.robust, b.robust)
        assert a.steps.keys() == b.steps.keys()
        assert all(torch.equal(a.steps[k], b.steps[k]) for k in a.steps)
    written = Report.read(out)
    assert report.attacks["pgd5"].settings == written.attacks["pgd5"].settings
    assert report.robust_accuracy == written.robust_accuracy
    assert report.model["path"] is None  # out=None: nothing written, no file to name


def test_evaluate_normalises_inside_and_writes_only_when_asked(run, tmp_path):
    model = _model(run)

    class Shifted(torch.nn.Module):
        """Expects (x − 0.5) / 2: with mean/std it sees what `model` sees."""

        def forward(self, x):
            return model(x * 2 + 0.5)

    kw = dict(dataset="digits", eps=0.1, attacks=["pgd3"], n_examples=30, sanity=False)
    plain = robust_amo.evaluate(model, **kw)
    wrapped = robust_amo.evaluate(Shifted(), mean=[0.5], std=[2.0], **kw)
    assert wrapped.clean_accuracy == plain.clean_accuracy
    assert abs(wrapped.robust_accuracy - plain.robust_accuracy) <= 1 / 30
    out = tmp_path / "r" / "report.json"
    robust_amo.evaluate(model, out=out, **kw)
    assert Report.read(out).n_examples == 30 and out.with_suffix(".md").is_file()
    with pytest.raises(ConfigError, match="mean and std together"):
        robust_amo.evaluate(model, mean=[0.5], **kw)


def test_evaluate_checkpoint_takes_a_json_request(run, tmp_path):
    req = EvalRequest(checkpoint=str(run), attacks=["pgd2"], n_examples=12, device="cpu",
                      progress=False, sanity=False, out=str(tmp_path / "e" / "report.json"))
    again = json.loads(json.dumps(req.to_dict()))
    assert EvalRequest.from_dict(again) == req
    report = evaluate_checkpoint(again)
    assert report.n_examples == 12 and set(report.attacks) == {"clean", "pgd2"}
    with pytest.raises(ConfigError, match="no field 'bogus'"):
        EvalRequest.from_dict({**again, "bogus": 1})
    # the library names its parameters; the command says them as flags
    bad = EvalRequest(checkpoint=str(run), step_size="0", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="^step_size must be > 0"):
        evaluate_checkpoint(bad)
    with pytest.raises(ConfigError, match="^attacks pgd2 given twice"):
        evaluate_checkpoint(EvalRequest(checkpoint=str(run), attacks=["pgd2", "pgd2"]))


@pytest.mark.parametrize(("flags", "message"), [
    (["--step-size", "0"], "--step-size must be > 0"),
    (["--attack", "pgd2,pgd2"], "--attack pgd2 given twice"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--tolerance", "-1"], "--tolerance must be >= 0"),
    (["--attack", "pgd0"], "--attack pgd0: PGD needs at least one step"),
    (["--format", "robustbench"], "--format robustbench needs the standard AutoAttack: add "
                                  "--attack autoattack"),
])
def test_eval_command_names_its_flags(run, tmp_path, capsys, flags, message):
    rc = main(["eval", "--checkpoint", str(run), "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "r.json"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_report_round_trip_and_todays_report_json(run, tmp_path):
    out = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(run), "--attack", "pgd3", "--restarts", "2",
                 "--n-examples", "20", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    report = Report.from_dict(written)
    assert report.to_dict() == written
    assert Report.from_dict(report.to_dict()).to_dict() == written
    assert list(report.to_dict()) == list(written)  # the documented order
    assert out.with_suffix(".md").read_text() == markdown(report)
    # a report.json with exactly the keys the writer of 0.2.0 gave (before the typed Report)
    old = {
        "schema": SCHEMA, "created": "2026-01-01T00:00:00+00:00", "dataset": "digits",
        "data_dir": None, "split": "test", "n_examples": 5,
        "model": {"path": "x.pt", "arch": "tiny-cnn"},
        "threat_model": {"norm": "linf", "eps": 0.1}, "seed": 0, "device": "cpu",
        "precision": "float32", "bf16": False, "clean_accuracy": 0.8,
        "attacks": {
            "clean": {"kind": "clean", "settings": {}, "robust_accuracy": 0.8, "n_robust": 4,
                      "curve": {}, "warnings": [], "wall_time_s": 0.0, "resumed_chunks": 0},
            "autoattack": {"kind": "autoattack", "settings": {"version": "standard",
                                                              "attacks": ["apgd-ce"]},
                           "robust_accuracy": 0.4, "n_robust": 2, "curve": {"apgd-ce": 0.4},
                           "warnings": [], "wall_time_s": 1.5, "resumed_chunks": 1,
                           "backend": "autoattack 0.1"}},
        "robust_accuracy": 0.4, "n_robust": 2,
        "sanity_checks": [{"name": "robust<=clean", "passed": True, "detail": "ok"},
                          {"name": "autoattack-checks", "passed": False,
                           "attack": "autoattack", "detail": "w"}],
        "sanity_ok": False, "wall_time_s": 2.0, "versions": {"python": "3.11"},
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    r = Report.read(path)
    assert r.to_dict() == old and not r.sanity_ok and r.attacks["autoattack"].backend
    assert r.robust_accuracies() == {"autoattack": 0.4}


def test_margins_measure_equals_the_command(run, tmp_path):
    out = tmp_path / "m"
    assert main(["margins", "--checkpoint", str(run), "--n-examples", "10", "--batch-size", "4",
                 "--pgd-steps", "2", "--restarts", "2", "--attack-steps", "5", "--rounds", "3",
                 "--seed", "4", "--device", "cpu", "--no-progress", "--no-plots",
                 "--out", str(out)]) == 0
    model = _model(run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    data = load_eval_data({**ckpt, "config": ckpt["config"]}, n_examples=10)
    threat = ThreatModel(**ckpt["config"]["attack"]).replace(steps=2)
    result = measure(model, data.x, data.y, threat, restarts=2, seed=4,
                     search=SearchOptions(steps=5, rounds=3), batch_size=4)
    result.write(tmp_path / "lib", plots=False)
    assert (tmp_path / "lib" / "margins.csv").read_text() == (out / "margins.csv").read_text()
    with (out / "margins.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 10 == len(result.columns["label"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["pgd"] == result.settings["pgd"]
    # the checkpoint-level call is the command
    again = measure_checkpoint(MarginsRequest(
        checkpoint=str(run), n_examples=10, batch_size=4, pgd_steps=2, restarts=2,
        attack_steps=5, rounds=3, seed=4, device="cpu", progress=False, plots=False,
        out=str(tmp_path / "ck")))
    assert (tmp_path / "ck" / "margins.csv").read_text() == (out / "margins.csv").read_text()
    assert torch.equal(again.columns["all_layer_margin"], result.columns["all_layer_margin"])


@pytest.mark.parametrize(("field", "value"), [
    ("norm", "l1"), ("loss", "mse"), ("eps", -0.1), ("eps", float("nan")),
    ("step_size", float("inf")), ("steps", -1), ("steps", 1.5), ("random_start", "yes"),
])
def test_threat_model_validates_each_field_once(field, value):
    with pytest.raises(ConfigError) as e:
        ThreatModel(**{field: value})
    assert str(e.value).startswith(field) and e.value.params == (field,)
    # the config loader says where the field sits
    with pytest.raises(ConfigError, match=f"^attack.{field}"):
        load_config(None, [{"attack": {field: value}}])


def test_threat_model_is_frozen_and_shared():
    t = ThreatModel(eps=0.2)
    with pytest.raises(AttributeError):
        t.eps = 0.3
    assert t.replace(steps=3).steps == 3 and t.steps == 10
    pgd = PGD.from_threat(torch.nn.Identity(), t, restarts=2)
    assert pgd.threat is t and pgd.eps == 0.2 and pgd.restarts == 2
    assert PGD(torch.nn.Identity(), eps=0.2).threat == t


@pytest.mark.parametrize(("field", "value"), [("rho", -1.0), ("eta_delta", float("nan")),
                                              ("delta_grad", "max")])
def test_all_layer_options_validate_once(field, value):
    with pytest.raises(ConfigError, match=f"^{field}"):
        AllLayerOptions(**{field: value})
    cfg = {"method": "robust-amo", "method_args": {field: value}}
    with pytest.raises(ConfigError, match=f"^method_args.{field}"):
        resolve(None, [cfg])
