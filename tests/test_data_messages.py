"""What a new user tripped over in the data: a failed download says the download failed and
leaves no empty data or run folder, a decompression bomb in an image folder is one line, and
an image size a fixed-size dataset would ignore is refused (issue 20, items 9, 14, 17)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from robust_amo.cli import main
from robust_amo.data import files, load_dataset
from robust_amo.errors import ConfigError, DataError
from robust_amo.resolve import resolve


def _offline(monkeypatch):
    """torchvision without a network: it makes the folder, starts an archive, then fails."""

    def fail(name, info, class_name, root, download, by_split):
        if download:
            root.mkdir(parents=True, exist_ok=True)
            (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
            raise OSError("<urlopen error [Errno -2] Name or service not known>")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(files, "_load_torchvision", fail)


def test_a_failed_download_says_so_and_leaves_no_folders(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    data, run = tmp_path / "data" / "c10", tmp_path / "runs" / "x"
    with pytest.raises(DataError, match="downloading it into .* failed") as e:
        load_dataset("cifar10", data, download=True)
    assert "download)" not in str(e.value) and not data.exists()

    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--download",
                 "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "check the network connection" in err and "--download" not in err
    assert err.count("\n") == 1
    assert not data.exists() and not run.exists()  # no empty data folder, no lock file


def test_without_download_the_message_still_offers_it(tmp_path, monkeypatch):
    _offline(monkeypatch)
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match=r"let torchvision fetch it \(download\)"):
        load_dataset("cifar10", tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's own folder is never removed


def test_a_decompression_bomb_in_an_image_folder_is_one_line(tmp_path, monkeypatch, capsys):
    for part in ("train", "test"):
        (tmp_path / "imgs" / part / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(
            tmp_path / "imgs" / part / "a" / "0.png")
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS: 40x40 is one here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="0.png: it is too large to decode"):
        load_dataset("imagefolder", tmp_path / "imgs", image_size=8)
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                 "--image-size", "8", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "too large to decode" in err and err.count("\n") == 1


def test_an_image_size_a_fixed_dataset_ignores_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="digits images are 8x8 and are not resized") as e:
        resolve(None, [{"dataset": "digits", "data": {"image_size": 32}}])
    assert e.value.params == ("image_size",)
    assert resolve(None, [{"dataset": "digits", "data": {"image_size": 8}}])  # its own size
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--image-size", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robust-amo: error: data.image_size 32: digits images are 8x8")
    assert "drop --image-size" in err and not out.exists()
