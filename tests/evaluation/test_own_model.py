"""Your own model: ``--model FILE.py:FN`` / ``package.module:FN`` with ``--weights`` for ``eval``
and ``margins``, ``train --init-weights``; one-line errors for every way it can go wrong."""

from __future__ import annotations

import builtins
import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from robust_amo.checkpoint import load_weights, read_file
from robust_amo.cli import main
from robust_amo.data import load_dataset
from robust_amo.errors import CheckpointError, ConfigError
from robust_amo.models import ExternalModel, build_external, default_points
from robust_amo.resolve import resolve
from robust_amo.train import train

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    def build(num_classes=10, hidden=16):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    def wide():
        return build(hidden=32)

    def no_classes():
        return build(num_classes=3)

    def not_a_module():
        return 42

    def broken(num_classes):
        raise ValueError("boom")

    class WithPoints(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = build()
        def forward(self, x):
            return self.body(x)
        def perturbation_points(self):
            return [("body.3", self.body[3])]

    def with_points():
        return WithPoints()
''')


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS)
    torch.manual_seed(0)
    net = build_external(f"{tmp_path / 'mymodels.py'}:build", 10, (1, 8, 8)).net
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "epoch": 3}, tmp_path / "wrapped.pt")
    return tmp_path, net


def _err(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_of_a_model_file_matches_a_direct_count(files, capsys):
    d, net = files
    out = d / "r" / "report.json"
    assert main(["eval", "--model", f"{d / 'mymodels.py'}:build", "--weights", str(d / "w.pt"),
                 "--dataset", "digits", "--eps", "0.1", "--attack", "pgd10", "--no-progress",
                 "--no-sanity", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    _, test = load_dataset("digits", None)
    with torch.no_grad():
        direct = (net.eval()(test.x.float() / 255).argmax(1) == test.y).float().mean().item()
    assert report["clean_accuracy"] == pytest.approx(direct)
    assert report["model"]["arch"].endswith("mymodels.py:build")
    assert report["model"]["weights"] == str(d / "w.pt")
    assert report["attacks"]["pgd10"]["robust_accuracy"] <= report["clean_accuracy"]


def test_a_package_module_function_and_wrapped_weights(files, monkeypatch):
    d, net = files
    monkeypatch.syspath_prepend(str(d))
    model = build_external("mymodels:build", 10, (1, 8, 8))
    load_weights(model.net, d / "wrapped.pt")  # {"state_dict": {"module.…": …}}
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)
    sys.modules.pop("mymodels", None)


def test_normalisation_happens_inside(files):
    d, _ = files
    m = build_external(f"{d / 'mymodels.py'}:build", 10, (1, 8, 8), mean=[0.3], std=[0.2])
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(m(x), m.net((x - 0.3) / 0.2))


def test_perturbation_points(files):
    d, _ = files
    seq = build_external(f"{d / 'mymodels.py'}:build", 10, (1, 8, 8))
    # default rule: every Conv2d and Linear output but the last Linear (the classifier)
    assert default_points(seq.net) == ["0", "3"]
    assert [n for n, _ in seq.perturbation_points()] == ["net.0", "net.3"]
    own = build_external(f"{d / 'mymodels.py'}:with_points", 10, (1, 8, 8))
    assert [n for n, _ in own.perturbation_points()] == ["net.body.3"]
    picked = ExternalModel(seq.net, 1, points=["3"])
    assert [m for _, m in picked.perturbation_points()] == [seq.net[3]]
    with pytest.raises(ConfigError, match="no module 'fc9'"):
        ExternalModel(seq.net, 1, points=["fc9"])


def test_margins_of_a_model_file(files):
    d, _ = files
    out = d / "m"
    assert main(["margins", "--model", f"{d / 'mymodels.py'}:build", "--weights",
                 str(d / "w.pt"), "--dataset", "digits", "--eps", "0.1", "--n-examples", "8",
                 "--points", "3", "--no-progress", "--no-plots", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["points"] == ["net.3"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "{d}/missing.py:build"], "does not exist"),
    (["--model", "{d}/mymodels.py"], "expected FILE.py:FN"),
    (["--model", "{d}/mymodels.py:nope"], "has no function nope (functions: broken, build"),
    (["--model", "{d}/mymodels.py:broken"], "calling it raised ValueError: boom"),
    (["--model", "{d}/mymodels.py:not_a_module"], "returned a int, not a torch.nn.Module"),
    (["--model", "{d}/mymodels.py:no_classes"], "returns (2, 3) for 2 inputs"),
    (["--model", "{d}/mymodels.py:build", "--input-shape", "1,28,28"], "check --input-shape"),
    (["--model", "{d}/mymodels.py:wide", "--weights", "{d}/w.pt"],
     "3.weight has shape (16, 256) in the file and (32, 256) in the model"),
    (["--model", "{d}/mymodels.py:with_points", "--weights", "{d}/w.pt"],
     "the model's body.0.weight is not in the file"),
    (["--model", "no_such_pkg.models:build"], "cannot import no_such_pkg.models"),
    (["--checkpoint", "{d}/w.pt", "--model", "{d}/mymodels.py:build"], "either --checkpoint"),
    (["--model", "{d}/mymodels.py:build", "--mean", "0.5"], "--mean and --std together"),
])
def test_bad_model_input_is_one_line(files, capsys, args, needle):
    d, _ = files
    argv = ["eval", *[a.format(d=d) for a in args], "--dataset", "digits", "--eps", "0.1",
            "--device", "cpu", "--out", str(d / "bad" / "r.json")]
    assert main(argv) == 2
    assert needle in _err(capsys)
    assert not (d / "bad").exists()


def test_model_needs_eps_and_dataset(files, capsys):
    d, _ = files
    model = f"{d / 'mymodels.py'}:build"
    assert main(["eval", "--model", model, "--dataset", "digits", "--device", "cpu"]) == 2
    assert "--model needs --eps" in _err(capsys)
    assert main(["eval", "--model", model, "--eps", "0.1", "--device", "cpu"]) == 2
    assert "--model needs --dataset" in _err(capsys)


def test_malicious_weights_do_not_run(files, capsys):
    d, _ = files
    marker = d / "pwned"
    torch.save({"state_dict": {}, "x": Payload(marker)}, d / "evil.pt")
    assert main(["eval", "--model", f"{d / 'mymodels.py'}:build", "--weights",
                 str(d / "evil.pt"), "--dataset", "digits", "--eps", "0.1", "--device",
                 "cpu"]) == 2
    assert "--unsafe-load" in _err(capsys)
    assert not marker.exists()


def test_weights_that_hold_no_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(nn.Linear(2, 2), tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(nn.Linear(2, 2), tmp_path / "none.pt")


def test_train_init_weights_starts_from_the_file(tmp_path, capsys):
    base = {"arch": "tiny-cnn", "dataset": "digits", "method": "standard", "epochs": 1,
            "batch_size": 64, "data": {"augment": False, "train_subset": 128},
            "optim": {"lr": 0.05, "schedule": "constant"}, "eval": {"n_examples": 32, "steps": 0}}
    train(resolve(None, [base, {"out": str(tmp_path / "a")}]))
    # lr 0 and no weight decay: the weights do not move, so the run's weights are the file's
    frozen = {"optim": {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.0},
              "init_weights": str(tmp_path / "a" / "checkpoint.pt"), "out": str(tmp_path / "b")}
    train(resolve(None, [base, frozen]))
    a = read_file(tmp_path / "a" / "checkpoint.pt")["model"]
    b = read_file(tmp_path / "b" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = {"arch": "tiny-mlp", "out": str(tmp_path / "c"),
             "init_weights": str(tmp_path / "a" / "checkpoint.pt")}
    assert main(["train", "--set", f"arch={other['arch']}", "--set", "dataset=digits",
                 "--set", "epochs=1", "--set", "method=standard", "--out", other["out"],
                 "--init-weights", other["init_weights"], "--no-progress"]) == 2
    assert "do not fit the model" in _err(capsys)
