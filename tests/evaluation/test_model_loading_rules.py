"""Loading rules of ``eval``/``margins`` (issue 20): your own model needs weights unless asked
for without (item 3); a model no input gradient reaches, non-finite logits and a model without
perturbation points are one-line errors (item 14); other class names than the checkpoint's
(item 17); a run folder given as weights and a bad ``--points`` (item 20)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from robust_amo import evaluate
from robust_amo.checkpoint import build_checkpoint
from robust_amo.cli import main
from robust_amo.errors import CheckpointError, ConfigError
from robust_amo.evaluation import (
    EvalRequest,
    MarginsRequest,
    evaluate_checkpoint,
    measure_checkpoint,
)
from robust_amo.evaluation.loading import AS_RETURNED, _check_fits
from robust_amo.margins import measure
from robust_amo.models import create_model

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, mode="ok"):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc1 = nn.Linear(256, 16)
            self.fc2 = nn.Linear(16, num_classes)
            self.mode = mode

        def forward(self, x):
            if self.mode == "constant":
                x = torch.zeros_like(x)
            if self.mode == "picky" and x.abs().sum() > 0:
                raise ValueError("only blank images")
            out = self.fc2(self.fc1(self.conv(x).relu().flatten(1)).relu())
            if self.mode == "detached":
                out = out.detach()
            if self.mode == "nan":
                out = out * float("nan")
            return out

    def build(num_classes=10):
        return Net(num_classes)

    def constant(num_classes=10):
        return Net(num_classes, "constant")

    def detached(num_classes=10):
        return Net(num_classes, "detached")

    def picky(num_classes=10):
        return Net(num_classes, "picky")

    def nan(num_classes=10):
        return Net(num_classes, "nan")

    def one_layer(num_classes=10):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
''')

COMMON = ["--dataset", "digits", "--eps", "0.1", "--n-examples", "4", "--device", "cpu",
          "--no-progress"]


@pytest.fixture()
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _eval(tmp_path, *args):
    return main(["eval", *args, *COMMON, "--attack", "pgd2", "--no-sanity",
                 "--out", str(tmp_path / "e" / "report.json")])


def _margins(tmp_path, *args):
    return main(["margins", *args, *COMMON, "--no-plots", "--pgd-steps", "1",
                 "--attack-steps", "2", "--rounds", "1", "--out", str(tmp_path / "m")])


@pytest.mark.parametrize("run", [_eval, _margins])
def test_own_model_without_weights_is_refused(tmp_path, capsys, models, run):
    assert run(tmp_path, "--model", f"{models}:build") == 2
    err = _one_line(capsys)
    assert "--model needs --weights: a file of trained weights, or 'none'" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "m" / "margins.csv").exists()


def test_weights_none_asked_for_is_evaluated_and_recorded(tmp_path, models, capsys):
    assert _eval(tmp_path, "--model", f"{models}:build", "--weights", "none") == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["model"]["weights"] == AS_RETURNED
    assert AS_RETURNED.startswith("none (asked for)")
    assert _margins(tmp_path, "--model", f"{models}:build", "--weights", "None") == 0


def test_the_python_requests_follow_the_same_rule(tmp_path, models):
    fields = {"model": f"{models}:build", "dataset": "digits", "eps": 0.1, "n_examples": 4,
              "device": "cpu", "progress": False}
    with pytest.raises(ConfigError, match="^model needs weights") as e:
        evaluate_checkpoint(EvalRequest(**fields, out=str(tmp_path / "e" / "r.json")))
    assert e.value.params == ("model", "weights")
    with pytest.raises(ConfigError, match="^model needs weights"):
        measure_checkpoint(MarginsRequest(**fields, out=str(tmp_path / "m")))
    report = evaluate_checkpoint(EvalRequest(**fields, weights="none", attacks=["clean"],
                                             sanity=False, out=str(tmp_path / "e" / "r.json")))
    assert report.model["weights"] == AS_RETURNED


@pytest.mark.parametrize("run", [_eval, _margins])
@pytest.mark.parametrize(("fn", "needle"), [
    ("constant", "its logits do not depend on its input"),
    ("detached", "its logits carry no gradient"),
    ("picky", "it fails on two examples of the data (ValueError: only blank images)"),
])
def test_a_model_no_input_gradient_reaches_is_one_line(tmp_path, capsys, models, run, fn,
                                                        needle):
    assert run(tmp_path, "--model", f"{models}:{fn}", "--weights", "none") == 2
    err = _one_line(capsys)
    assert f"--model '{models}:{fn}': {needle}" in err
    assert "attacks need logits differentiable in the input" in err


def test_margins_of_non_finite_logits_is_one_line(tmp_path, capsys, models):
    assert _margins(tmp_path, "--model", f"{models}:nan", "--weights", "none") == 2
    err = _one_line(capsys)
    assert "logits are not finite (NaN or inf) on 4 of 4 examples (the first: example 0)" in err
    net = create_model("tiny-cnn", 10, input_shape=(1, 8, 8))
    with torch.no_grad():
        net.classifier.weight.fill_(float("nan"))
    with pytest.raises(ConfigError, match="not finite"):
        measure(net, torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_margins_of_a_model_without_perturbation_points(tmp_path, capsys, models):
    assert _margins(tmp_path, "--model", f"{models}:one_layer", "--weights", "none") == 2
    assert "declares no perturbation point, so it has no all-layer margin; give --points:" \
        in _one_line(capsys)


def test_points_naming_no_module_says_only_points(tmp_path, capsys, models):
    assert _margins(tmp_path, "--model", f"{models}:build", "--weights", "none",
                    "--points", "nope") == 2
    err = _one_line(capsys)
    assert "error: --points: the model has no module 'nope'; its modules are conv, fc1, fc2" \
        in err
    assert "--mean" not in err and "--std" not in err


def test_a_run_folder_given_as_weights(tmp_path, capsys, models):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({}, run / "best.pt")
    assert _eval(tmp_path, "--model", f"{models}:build", "--weights", str(run)) == 2
    err = _one_line(capsys)
    assert f"--weights {run} is a run folder, not a weights file: give its file " \
        f"{run / 'best.pt'}, or pass --checkpoint {run} instead of --model" in err
    (run / "best.pt").unlink()
    assert _eval(tmp_path, "--model", f"{models}:build", "--weights", str(run)) == 2
    assert "is a folder, not a weights file" in _one_line(capsys)


def _image_folder(root, classes):
    from PIL import Image  # only this test writes images

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (60 * i, 90, 30)).save(root / split / c / f"{i}.png")


def test_an_image_folder_with_other_class_names(tmp_path, capsys):
    _image_folder(tmp_path / "trained", ["cat", "dog"])
    _image_folder(tmp_path / "other", ["cat", "wolf"])
    model = create_model("tiny-cnn", 2, input_shape=(3, 8, 8))
    ck = build_checkpoint(arch="tiny-cnn", num_classes=2, input_shape=(3, 8, 8),
                          mean=[0.5] * 3, std=[0.25] * 3, model_kwargs={},
                          dataset="imagefolder", method="standard", model=model, epoch=1,
                          class_names=["cat", "dog"],
                          config={"data": {"data_dir": str(tmp_path / "trained"),
                                           "image_size": 8}, "attack": {"eps": 0.1}})
    torch.save(ck, tmp_path / "ck.pt")
    args = ["eval", "--checkpoint", str(tmp_path / "ck.pt"), "--device", "cpu",
            "--no-progress", "--attack", "pgd2", "--no-sanity"]
    assert main([*args, "--data-dir", str(tmp_path / "other"),
                 "--out", str(tmp_path / "bad" / "r.json")]) == 2
    err = _one_line(capsys)
    assert "trained on other classes than imagefolder in" in err
    assert "label 1 is 'dog' for the model but 'wolf' in the data" in err
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--out", str(tmp_path / "good" / "r.json")]) == 0


def test_registered_datasets_with_other_class_names():
    meta = {"input_shape": [1, 8, 8], "num_classes": 10,
            "class_names": [f"c{i}" for i in range(10)]}
    with pytest.raises(CheckpointError, match="label 0 is 'c0' for the model but '0'"):
        _check_fits(meta, "digits")
    _check_fits({**meta, "class_names": [str(i) for i in range(10)]}, "digits")
    _check_fits({**meta, "class_names": None}, "digits")


def test_evaluate_probes_the_module_too():
    class Detached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)).detach()

    with pytest.raises(ConfigError, match="^model: its logits carry no gradient"):
        evaluate(Detached(), dataset="digits", eps=0.1, attacks=["pgd2"], n_examples=4,
                 device="cpu")
