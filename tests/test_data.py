import numpy as np
import pytest
import torch

from robust_amo import DataError
from robust_amo.data import Loader, augment, hold_out, load_dataset, take_subset


def test_digits_is_real_and_split(digits):
    train, test = digits
    assert train.x.shape == (1500, 1, 8, 8) and test.x.shape == (297, 1, 8, 8)
    assert train.x.dtype == torch.uint8 and train.x.max() == 255
    assert set(train.y.tolist()) == set(range(10))


def test_npz_file_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    data = dict(x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                y_train=rng.integers(0, 10, 20), x_test=rng.integers(0, 256, (5, 28, 28),
                                                                      dtype=np.uint8),
                y_test=rng.integers(0, 10, 5))
    np.savez(tmp_path / "mnist.npz", **data)
    for where in (tmp_path, tmp_path / "mnist.npz"):
        train, test = load_dataset("MNIST", where)
        assert train.x.shape == (20, 1, 28, 28) and len(test) == 5
        assert torch.equal(train.x[3, 0], torch.from_numpy(data["x_train"][3]))
    np.savez(tmp_path / "bad.npz", x_train=data["x_train"])
    with pytest.raises(DataError, match="x_test"):
        load_dataset("mnist", tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", **{**data, "y_test": data["y_test"][:4]})
    with pytest.raises(DataError, match="y_test"):
        load_dataset("mnist", tmp_path / "short.npz")
    # an interrupted copy or download: a truncated zip archive
    whole = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.npz"):
        load_dataset("mnist", tmp_path / "cut.npz")


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10.npz") in msg and msg.endswith("fetch it (download)")
    assert e.value.params == ("download",)
    with pytest.raises(DataError, match="^dataset 'mnist' needs data_dir: "):
        load_dataset("mnist", None)
    with pytest.raises(DataError, match="known datasets"):
        load_dataset("imagenet", tmp_path)


def test_subset_and_hold_out(digits):
    train, _ = digits
    a, b = take_subset(train, 256, seed=3), take_subset(train, 256, seed=3)
    assert len(a) == 256 and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    assert not torch.equal(take_subset(train, 256, seed=4).x, a.x)
    rest, val = hold_out(train, 100, seed=0)
    assert len(rest) == 1400 and len(val) == 100
    rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    assert len(rows) > 1400  # examples are (mostly) distinct, so disjointness is meaningful
    rest_rows = {tuple(r) for r in rest.x.flatten(1).tolist()}
    val_rows = {tuple(r) for r in val.x.flatten(1).tolist()}
    assert len(val_rows & rest_rows) <= 5


def test_augment_is_a_padded_crop_or_its_mirror():
    x = torch.rand(64, 3, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        found = False
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy:dy + 6, dx:dx + 6]
                if torch.equal(out[i], crop):
                    found = True
                elif torch.equal(out[i], crop.flip(-1)):
                    found, flips = True, flips + 1
        assert found
    assert 10 < flips < 54


def test_loader_order_depends_only_on_epoch(digits):
    train, _ = digits
    loader = Loader(train, 100, shuffle=True, augment=True, seed=1)
    loader.set_epoch(3)
    first = [y.clone() for _, y in loader]
    loader.set_epoch(4)
    other = [y.clone() for _, y in loader]
    loader.set_epoch(3)
    again = [y.clone() for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_shared_mnist_if_present(shared_data_file):
    path = shared_data_file("mnist.npz")
    train, test = load_dataset("mnist", path.parent)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.y).tolist()[:2] == [5923, 6742]
