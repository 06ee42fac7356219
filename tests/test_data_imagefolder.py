"""Your own data: ``--dataset imagefolder`` (train/CLASS/*.png, test/ or val/) trains and
evaluates, keeps its class names, and every malformed folder is one clear error; SVHN's facts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robust_amo.checkpoint import read_file
from robust_amo.cli import main
from robust_amo.data import dataset_info, load_dataset
from robust_amo.errors import DataError

CLASSES = ("circle", "square", "stripes")


def _image(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    if kind == "circle":
        m = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    elif kind == "square":
        m = (abs(yy - h / 2) < h / 4) & (abs(xx - w / 2) < w / 4)
    else:
        m = (xx // 3) % 2 == 0
    img = np.where(m[..., None], [230, 40, 40], [20, 20, 200]).astype(np.float64)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def make_folder(root, per_class=(6, 3), held="test", size=(20, 24)):
    rng = np.random.default_rng(0)
    for part, n in zip(("train", held), per_class, strict=True):
        for c in CLASSES:
            (root / part / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(_image(c, rng, size)).save(root / part / c / f"{i}.{ext}")
    return root


def test_load_resizes_centre_crops_and_labels_by_sorted_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    train, test = load_dataset("imagefolder", root, image_size=16)
    assert train.x.shape == (18, 3, 16, 16) and train.x.dtype == torch.uint8
    assert test.x.shape == (9, 3, 16, 16)
    assert train.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert train.classes == CLASSES
    info = dataset_info("imagefolder", root, 16)
    assert (info.num_classes, info.input_shape, info.classes) == (3, (3, 16, 16), CLASSES)
    # the shorter side (20) is resized to 16, the longer (24 -> 19.2 ~ 19) centre-cropped to 16
    ref = Image.open(root / "train" / "circle" / "0.png").convert("RGB").resize((19, 16),
                                                                               Image.BILINEAR)
    expect = np.asarray(ref)[:, 1:17]
    assert np.array_equal(train.x[0].permute(1, 2, 0).numpy(), expect)


def test_a_val_folder_stands_in_for_test(tmp_path):
    root = make_folder(tmp_path / "imgs", held="val")
    _, held = load_dataset("imagefolder", root, image_size=8)
    assert len(held) == 9


@pytest.mark.parametrize(("breakage", "needle"), [
    ("no_image_size", "needs data.image_size"),
    ("empty_train", "holds no class folders"),
    ("no_test", "no test/ or val/ folder"),
    ("classes_differ", "only in train: ['stripes']"),
    ("bad_image", "cannot read the image"),
    ("no_images", "holds no images"),
])
def test_malformed_folders_are_clear_errors(tmp_path, breakage, needle):
    root = make_folder(tmp_path / "imgs")
    size = 8
    if breakage == "no_image_size":
        size = None
    elif breakage == "empty_train":
        for c in CLASSES:
            for f in (root / "train" / c).iterdir():
                f.unlink()
            (root / "train" / c).rmdir()
    elif breakage == "no_test":
        for c in CLASSES:
            for f in (root / "test" / c).iterdir():
                f.unlink()
            (root / "test" / c).rmdir()
        (root / "test").rmdir()
    elif breakage == "classes_differ":
        for f in (root / "test" / "stripes").iterdir():
            f.unlink()
        (root / "test" / "stripes").rmdir()
    elif breakage == "bad_image":
        (root / "train" / "square" / "broken.png").write_bytes(b"not a png")
        needle += f" {root / 'train' / 'square' / 'broken.png'}"
    elif breakage == "no_images":
        for c in CLASSES:
            for f in (root / "test" / c).iterdir():
                f.unlink()
    with pytest.raises(DataError, match=None) as e:
        load_dataset("imagefolder", root, image_size=size)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_train_and_eval_an_image_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["train", "--arch", "tiny-cnn", "--dataset", "imagefolder", "--data-dir",
                 str(root), "--image-size", "16", "--method", "pgd", "--epochs", "2",
                 "--eps", "4/255", "--set", "attack.steps=2", "--set", "eval.n_examples=9",
                 "--set", "data.augment=true", "--batch-size", "6", "--out", str(run),
                 "--no-progress", "--device", "cpu"]) == 0
    ck = read_file(run / "checkpoint.pt")
    assert ck["class_names"] == list(CLASSES) and ck["input_shape"] == [3, 16, 16]
    assert ck["num_classes"] == 3
    assert main(["eval", "--checkpoint", str(run), "--attack", "pgd10", "--no-progress",
                 "--no-sanity", "--device", "cpu"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["n_examples"] == 9 and report["model"]["class_names"] == list(CLASSES)


def test_train_without_image_size_is_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    assert main(["train", "--arch", "tiny-cnn", "--dataset", "imagefolder", "--data-dir",
                 str(root), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "needs data.image_size" in err and err.count("\n") == 1


def test_svhn_facts_and_its_npz(tmp_path):
    info = dataset_info("SVHN")
    assert (info.num_classes, info.input_shape) == (10, (3, 32, 32))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    np.savez(tmp_path / "svhn.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    train, test = load_dataset("svhn", tmp_path)
    assert train.x.shape == (20, 3, 32, 32) and len(test) == 5
    assert train.classes == tuple(str(i) for i in range(10))
