"""``train --model FILE.py:FN``: robust AMO and Jacobian-LM train a network of the user's own,
with margins' loading rules and perturbation points; the checkpoint never runs the file, a
resume needs the model again, and eval loads the weights with ``--model --weights``. User code
that calls ``sys.exit`` and a ``std`` of 0 are one-line errors (issue 20, items 13, 16, 17)."""

from __future__ import annotations

import pytest
import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.cli import main
from robust_amo.errors import CheckpointError, ConfigError
from robust_amo.evaluation.loading import load_external
from robust_amo.models import ExternalModel, build_external
from robust_amo.models.base import Normalize
from robust_amo.train import train
from tests.helpers import tiny_run

USER_MODEL = '''
import torch
from torch import nn

IMPORTS = []
IMPORTS.append(1)


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.hidden = nn.Linear(4 * 8 * 8, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.hidden(h)))


def build(num_classes=10):
    return Net(num_classes)
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODEL)
    return f"{path}:build"


def _run(out, spec, method="robust-amo", **kw):
    return tiny_run(out, model=spec, method=method, epochs=1,
                    data={"augment": False, "train_subset": 96}, eval={"n_examples": 16,
                                                                      "steps": 1}, **kw)


def test_robust_amo_trains_a_user_module_at_margins_points(model_file, tmp_path):
    run = tmp_path / "run"
    metrics = train(_run(run, model_file))
    assert metrics["epoch"] == 1 and metrics["check_split"] == "val"
    ck = ckpt_io.load_checkpoint(run)
    assert ck["arch"] == model_file and ck["config"]["model"] == model_file
    assert ck["mean"] == [0.0] and ck["std"] == [1.0]  # inputs in [0, 1], as eval --model
    net = build_external(model_file, 10, (1, 8, 8))
    # margins' default points: every Conv2d and Linear but the last Linear
    assert [n for n, _ in net.perturbation_points()] == ["net.conv", "net.hidden"]
    assert isinstance(net.classifier, torch.nn.Linear) and net.classifier is net.net.head

    # eval --model FILE.py:FN --weights RUN/best.pt loads the trained weights
    model, meta = load_external(model_file, dataset="digits", weights=run / "best.pt")
    trained = ckpt_io.model_state(ckpt_io.load_checkpoint(run / "best.pt"))
    assert torch.equal(model.net.head.weight, trained["net.head.weight"])
    assert meta["weights"] == str(run / "best.pt")

    # the checkpoint alone never imports the file: it says how to load it instead
    with pytest.raises(ConfigError, match="model .* and weights RUN/best.pt") as e:
        ckpt_io.model_from_checkpoint(ck)
    assert e.value.params == ("model", "weights")


def test_points_choose_where_delta_goes(model_file, tmp_path):
    run = tmp_path / "run"
    train(_run(run, model_file, model_points=["hidden"]))
    assert ckpt_io.load_checkpoint(run)["config"]["model_points"] == ["hidden"]
    with pytest.raises(ConfigError, match="no module 'nope'"):
        train(_run(tmp_path / "bad", model_file, model_points=["nope"]))


def test_jacobian_lm_trains_a_user_module(model_file, tmp_path):
    metrics = train(_run(tmp_path, model_file, method="jacobian-lm",
                         method_args={"lam_lm": 0.1, "variant": "all"}))
    assert metrics["epoch"] == 1 and metrics["train_loss"] == metrics["train_loss"]


def test_a_resume_needs_the_model_again(model_file, tmp_path):
    run = tmp_path / "run"
    train(_run(run, model_file))
    cfg = tiny_run(run, method="robust-amo", epochs=1,
                   data={"augment": False, "train_subset": 96},
                   eval={"n_examples": 16, "steps": 1})
    with pytest.raises(CheckpointError, match=r"model \('.*my_models.py:build' -> None\)"):
        train(cfg, resume=True)
    train(_run(run, model_file), resume=True)  # with it, the finished run is found as it is


def test_cli_train_model_then_eval_with_its_weights(model_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", model_file, "--method", "robust-amo", "--epochs", "1",
                 "--batch-size", "32", "--set", "data.train_subset=64", "--set",
                 "data.augment=false", "--eps", "0.1", "--set", "attack.steps=1",
                 "--n-examples", "8", "--set", "eval.steps=1", "--points", "conv",
                 "--out", str(run), "--no-progress"]) == 0
    assert ckpt_io.load_checkpoint(run)["config"]["model_points"] == ["conv"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--attack", "pgd1",
                 "--n-examples", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--model {model_file} and --weights RUN/best.pt" in err
    assert main(["eval", "--model", model_file, "--weights", str(run / "best.pt"),
                 "--dataset", "digits", "--eps", "0.1", "--attack", "pgd1", "--n-examples",
                 "8", "--out", str(tmp_path / "report"), "--no-progress"]) == 0


def test_model_options_without_a_model_are_refused(tmp_path, model_file):
    with pytest.raises(ConfigError, match="model_points: only a model of your own"):
        tiny_run(tmp_path, model_points=["conv"])
    with pytest.raises(ConfigError, match="model_kwargs .* takes none"):
        tiny_run(tmp_path, model=model_file, model_kwargs={"width": 2})


@pytest.mark.parametrize("where", ["import", "FN"])
def test_sys_exit_in_user_code_is_a_one_line_error(where, tmp_path, capsys):
    path = tmp_path / "exits.py"
    body = "import sys\n"
    body += "sys.exit(3)\n\ndef build():\n    pass\n" if where == "import" else \
        "def build():\n    sys.exit(3)\n"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"sys\.exit\(3\)") as e:
        build_external(f"{path}:build", 10, (1, 8, 8))
    assert str(path) in str(e.value)
    for command in (["train", "--model", f"{path}:build", "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"],
                    ["eval", "--model", f"{path}:build", "--dataset", "digits", "--eps",
                     "0.1", "--attack", "pgd1", "--out", str(tmp_path / "report")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("robust-amo: error: --model") and "sys.exit(3)" in err
        assert err.count("\n") == 1


def test_a_std_of_zero_is_refused(tmp_path, capsys, model_file):
    with pytest.raises(ValueError, match="std must be finite numbers > 0"):
        Normalize([0.5], [0.0], 1)
    with pytest.raises(ConfigError, match="std must be finite numbers > 0"):
        ExternalModel(torch.nn.Flatten(), 1, [0.5], [0.0])
    assert main(["eval", "--model", model_file, "--dataset", "digits", "--mean", "0",
                 "--std", "0", "--eps", "0.1", "--attack", "pgd1",
                 "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "std must be finite numbers > 0" in err and err.count("\n") == 1
