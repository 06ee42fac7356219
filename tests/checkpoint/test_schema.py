"""A checkpoint's fields are checked against one schema before use (issue 20, item 14).

Each malformed checkpoint is built in tmp_path and given to the command line: exit 2, one line
on stderr naming the file and the field, no traceback.
"""

from __future__ import annotations

import pytest
import torch

from robust_amo.checkpoint import (
    build_checkpoint,
    check_fields,
    load_checkpoint,
    model_from_checkpoint,
    to_robustness,
)
from robust_amo.cli import main
from robust_amo.errors import CheckpointError
from robust_amo.models import create_model


def _checkpoint(**fields):
    torch.manual_seed(0)
    model = create_model("tiny-cnn", 10, input_shape=(1, 8, 8))
    ck = build_checkpoint(arch="tiny-cnn", num_classes=10, input_shape=(1, 8, 8), mean=[0.0],
                          std=[1.0], model_kwargs={}, dataset="digits", method="standard",
                          model=model, epoch=1, config={"dataset": "digits",
                                                        "attack": {"eps": 0.1}})
    ck.update(fields)
    return ck


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


MALFORMED = [
    ({"model": [1, 2]}, "'model' must be a state dict"),
    ({"model": {"module.model.x": "not a tensor"}}, "'model' must be a state dict"),
    ({"arch": ["tiny-cnn"]}, "'arch' must be the name of a registered architecture"),
    ({"arch": "no-such-net"}, "'arch' must be the name of a registered architecture"),
    ({"config": "a string"}, "'config' must be a mapping"),
    ({"config": {"attack": [1]}}, "'config.attack' must be a mapping"),
    ({"model_kwargs": {"bogus": 1}}, "'model_kwargs' {'bogus': 1} is not accepted by arch"),
    ({"model_kwargs": ["x"]}, "'model_kwargs' must be a mapping"),
    ({"input_shape": [1, -8, 8]}, "'input_shape' must be three positive integers"),
    ({"input_shape": [1, 8]}, "'input_shape' must be three positive integers"),
    ({"input_shape": [1, 1, 1]}, "'input_shape' [1, 1, 1] does not build arch 'tiny-cnn'"),
    ({"input_shape": [1, 4, 4]}, "checkpoint does not match its architecture"),
    ({"num_classes": "ten"}, "'num_classes' must be a positive integer"),
    ({"num_classes": 0}, "'num_classes' must be a positive integer"),
    ({"mean": [0.1, 0.2]}, "'mean' has 2 values but input_shape [1, 8, 8] has 1 channels"),
    ({"std": [0.0]}, "'std' must be a list of positive finite numbers"),
    ({"class_names": 3}, "'class_names' must be a list of class names"),
    ({"class_names": ["a", "b"]}, "'class_names' names 2 classes but num_classes is 10"),
    ({"epoch": "x"}, "'epoch' must be an integer >= 0"),
    ({"dataset": [1]}, "'dataset' must be a dataset name"),
    ({"version": "2"}, "'version' must be an integer >= 1"),
]


@pytest.mark.parametrize(("fields", "needle"), MALFORMED)
def test_a_malformed_field_is_one_line_naming_file_and_field(tmp_path, capsys, fields, needle):
    path = tmp_path / "bad.pt"
    torch.save(_checkpoint(**fields), path)
    assert main(["eval", "--checkpoint", str(path), "--n-examples", "4", "--attack", "pgd2",
                 "--device", "cpu", "--no-progress", "--no-sanity",
                 "--out", str(tmp_path / "e" / "report.json")]) == 2
    err = _one_line(capsys)
    assert f"{path}: " in err and needle in err, err
    assert "convert-checkpoint" in err or "does not match" in err
    assert not (tmp_path / "e" / "report.json").exists()


def test_margins_checks_the_fields_too(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    torch.save(_checkpoint(model_kwargs={"bogus": 1}), path)
    assert main(["margins", "--checkpoint", str(path), "--n-examples", "4", "--device", "cpu",
                 "--no-progress", "--no-plots", "--out", str(tmp_path / "m")]) == 2
    assert "checkpoint field 'model_kwargs'" in _one_line(capsys)


def test_a_missing_model_field_is_named_where_the_model_is_built(tmp_path):
    ck = _checkpoint()
    del ck["input_shape"]
    with pytest.raises(CheckpointError, match="field 'input_shape' is missing"):
        model_from_checkpoint(ck, tmp_path / "x.pt")


def test_a_good_checkpoint_passes_and_unknown_fields_are_left_alone(tmp_path):
    ck = _checkpoint(class_names=[str(i) for i in range(10)], something_new=[1, 2])
    check_fields(ck, "x.pt")
    torch.save(ck, tmp_path / "ok.pt")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "ok.pt"), tmp_path / "ok.pt")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_robustness_checkpoint_with_malformed_facts(tmp_path, capsys):
    rck = to_robustness(_checkpoint())
    rck["robust_amo"]["input_shape"] = [1, 0, 8]
    path = tmp_path / "r.pt"
    torch.save(rck, path)
    with pytest.raises(CheckpointError, match=r"r\.pt: checkpoint field 'input_shape'"):
        load_checkpoint(path)
    rck["robust_amo"]["input_shape"] = [1, 8, 8]
    rck["robust_amo"]["model_kwargs"] = {"bogus": 1}
    torch.save(rck, path)
    assert main(["eval", "--checkpoint", str(path), "--n-examples", "4", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "e" / "report.json")]) == 2
    assert "model_kwargs {'bogus': 1} are not accepted by arch 'tiny-cnn'" in _one_line(capsys)


def test_a_colour_robustness_checkpoint_on_grey_images_names_both_shapes(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("tiny-cnn", 10, input_shape=(3, 8, 8))
    ck = build_checkpoint(arch="tiny-cnn", num_classes=10, input_shape=(3, 8, 8),
                          mean=[0.0] * 3, std=[1.0] * 3, model_kwargs={}, dataset="cifar10",
                          method="standard", model=model, epoch=1)
    rck = to_robustness(ck)
    del rck["robust_amo"]  # as robustness writes it: no record of the shape
    torch.save(rck, tmp_path / "r.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "r.pt"), "--arch", "tiny-cnn",
                 "--dataset", "digits", "--n-examples", "4", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "e" / "report.json")]) == 2
    assert "takes 3-channel inputs, but digits images have shape (1, 8, 8); pass the " \
        "--dataset it was trained on" in _one_line(capsys)
