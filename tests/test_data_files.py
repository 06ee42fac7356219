"""Malformed .npz dataset files (issue 11): each is a one-line DataError saying what is wrong
and what the loader expects, never a traceback or a silent cast."""

import numpy as np
import pytest
import torch

from robust_amo import DataError
from robust_amo.cli import main
from robust_amo.data import hold_out, load_dataset, require_examples


def _arrays(n_train=20, n_test=5, shape=(28, 28), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                y_train=np.arange(n_train) % classes,
                x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                y_test=np.arange(n_test) % classes)


def _npz(tmp_path, name="mnist.npz", **over):
    path = tmp_path / name
    np.savez(path, **{**_arrays(), **over})
    return path


def _error(path, dataset="mnist", match=""):
    with pytest.raises(DataError, match=match) as e:
        load_dataset(dataset, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# --- image shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["x_train", "x_test"])
def test_flat_images_say_the_expected_shape(tmp_path, key):
    flat = _arrays()[key].reshape(-1, 784)
    msg = _error(_npz(tmp_path, **{key: flat}), match=key)
    assert f"({len(flat)}, 784)" in msg
    assert "(N, 28, 28)" in msg and "(N, 1, 28, 28)" in msg


def test_image_layouts_that_match_the_dataset_all_load(tmp_path):
    a = _arrays()
    want = torch.from_numpy(a["x_train"]).unsqueeze(1)
    for x_train, x_test in ((a["x_train"], a["x_test"]),
                            (a["x_train"][:, None], a["x_test"][:, None]),  # (N, 1, 28, 28)
                            (a["x_train"][..., None], a["x_test"][..., None])):  # (N, 28, 28, 1)
        train, test = load_dataset("mnist", _npz(tmp_path, x_train=x_train, x_test=x_test))
        assert torch.equal(train.x, want) and test.x.shape == (5, 1, 28, 28)


def test_cifar_hwc_and_chw_are_told_apart(tmp_path):
    a = _arrays(shape=(32, 32, 3))
    hwc, _ = load_dataset("cifar10", _npz(tmp_path, "cifar10.npz", **a))
    chw, _ = load_dataset("cifar10", _npz(tmp_path, "cifar10.npz", **{
        **a, "x_train": a["x_train"].transpose(0, 3, 1, 2), "x_test":
        a["x_test"].transpose(0, 3, 1, 2)}))
    assert hwc.x.shape == (20, 3, 32, 32) and torch.equal(hwc.x, chw.x)
    msg = _error(_npz(tmp_path, "cifar10.npz", x_train=a["x_train"][..., 0]), "cifar10",
                 match="x_train")
    assert "(N, 32, 32, 3) or (N, 3, 32, 32)" in msg


def test_test_images_of_another_shape_than_train(tmp_path):
    x_test = np.zeros((5, 32, 32), np.uint8)
    msg = _error(_npz(tmp_path, x_test=x_test), match="x_test")
    assert "(5, 32, 32)" in msg and "x_train has (20, 28, 28)" in msg


@pytest.mark.parametrize("x,needle", [
    (np.zeros((20, 28, 28), np.float32), "uint8"),
    (np.zeros((20, 28, 28), np.int64), "uint8"),
    (np.full((20, 28, 28), "a"), "uint8"),
    (np.array(3, np.uint8), "single value"),
])
def test_image_dtypes_and_scalars(tmp_path, x, needle):
    _error(_npz(tmp_path, x_train=x), match=needle)


# --- labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key,bad", [("y_train", 10), ("y_train", -1), ("y_test", 12),
                                     ("y_test", -3)])
def test_labels_out_of_range_name_split_value_and_classes(tmp_path, key, bad):
    y = _arrays()[key].copy()
    y[2] = bad
    msg = _error(_npz(tmp_path, **{key: y}), match=key)
    split = "train split" if key == "y_train" else "test split"
    assert split in msg and f"label {bad}," in msg and "num_classes 10" in msg and "0..9" in msg


def test_uint8_labels_beyond_the_classes(tmp_path):
    y = np.full(20, 255, np.uint8)
    _error(_npz(tmp_path, y_train=y), match="label 255, out of range")


def test_float_labels_only_when_exact_integers(tmp_path):
    y = (np.arange(20) % 10).astype(np.float64)
    train, _ = load_dataset("mnist", _npz(tmp_path, y_train=y))
    assert train.y.dtype == torch.int64 and train.y.tolist() == (np.arange(20) % 10).tolist()
    for bad in (2.5, np.nan, np.inf):
        z = y.copy()
        z[4] = bad
        msg = _error(_npz(tmp_path, y_train=z), match="not an integer")
        assert "y_train" in msg
    z = y.astype(np.float32)
    z[0] = 10.0  # an exact integer, but not a class
    _error(_npz(tmp_path, y_train=z), match="label 10, out of range")


@pytest.mark.parametrize("y,needle", [
    (np.array(["a"] * 20), "dtype <U1"),
    (np.ones(20, bool), "dtype bool"),
    ((np.arange(20) % 10).astype(np.complex64), "dtype complex64"),
    (np.zeros((20, 2), np.int64), r"shape \(20, 2\)"),
    (np.zeros(19, np.int64), "20 images but 19 labels"),
])
def test_label_dtypes_and_shapes(tmp_path, y, needle):
    _error(_npz(tmp_path, y_train=y), match=needle)


def test_keras_style_column_labels_load(tmp_path):
    y = (np.arange(20) % 10)[:, None]  # Keras keeps CIFAR labels as (N, 1)
    train, _ = load_dataset("mnist", _npz(tmp_path, y_train=y))
    assert train.y.shape == (20,) and train.y[3] == 3


# --- empty splits ---------------------------------------------------------------------------

def test_empty_train_split_is_an_error(tmp_path):
    a = _arrays()
    _error(_npz(tmp_path, x_train=a["x_train"][:0], y_train=a["y_train"][:0]),
           match="train split .* no examples")


def test_empty_test_split_fails_where_it_is_measured(tmp_path):
    a = _arrays()
    path = _npz(tmp_path, x_test=a["x_test"][:0], y_test=a["y_test"][:0])
    train, test = load_dataset("mnist", path)  # loading is fine: a run may evaluate on val
    assert len(test) == 0 and test.x.shape == (0, 1, 28, 28)
    with pytest.raises(DataError, match="test split has no examples") as e:
        require_examples(test.subset(torch.arange(0)), "the per-epoch check")
    assert str(path) in str(e.value) and "the per-epoch check" in str(e.value)
    assert require_examples(train) is train
    rest, val = hold_out(train, 4, seed=0)
    assert require_examples(val) is val and "held-out part" in val.origin
    _, none = hold_out(train, 0, seed=0)
    with pytest.raises(DataError, match="train split, held-out part has no examples"):
        require_examples(none)


def test_training_on_an_empty_test_split_is_refused(tmp_path):
    from robust_amo.resolve import resolve
    from robust_amo.train import train
    a = _arrays()
    path = _npz(tmp_path, x_test=a["x_test"][:0], y_test=a["y_test"][:0])
    cfg = resolve(None, [{"arch": "tiny-mlp", "dataset": "mnist", "method": "standard",
                          "epochs": 1, "out": str(tmp_path / "run"),
                          "data": {"data_dir": str(path)}, "eval": {"split": "test"}}])
    with pytest.raises(DataError, match="test split has no examples"):
        train(cfg)


# --- files that are not datasets ------------------------------------------------------------

def test_files_that_are_not_npz_archives(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("x_train,y_train\n1,2\n")
    _error(text, match="not an .npz archive")
    one = tmp_path / "one.npz"
    with one.open("wb") as f:
        np.save(f, np.zeros((3, 28, 28), np.uint8))  # a .npy under an .npz name
    _error(one, match="holds one array")
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{**_arrays(), "y_train": np.array([1, "a", None] * 7, dtype=object)[:20]})
    _error(objects, match="numeric arrays")


def test_missing_arrays_are_listed(tmp_path):
    a = _arrays()
    msg = _error(_only(tmp_path, x_train=a["x_train"], y_train=a["y_train"]),
                 match="lacks the keys")
    assert "['x_test', 'y_test']" in msg and "it has ['x_train', 'y_train']" in msg
    jpeg = tmp_path / "jpeg.npz"
    np.savez(jpeg, train_jpeg=np.zeros(4, np.uint8), train_offsets=np.array([0, 4]),
             y_train=np.zeros(1, np.int64))
    msg = _error(jpeg, "cifar10", match="JPEG-bytes layout")
    assert "test_jpeg" in msg and "test_offsets" in msg and "y_test" in msg


def test_jpeg_offsets_are_checked(tmp_path):
    jpeg = tmp_path / "jpeg.npz"
    np.savez(jpeg, train_jpeg=np.zeros(4, np.uint8), train_offsets=np.array([0, 9]),
             y_train=np.zeros(1, np.int64), test_jpeg=np.zeros(4, np.uint8),
             test_offsets=np.array([0, 4]), y_test=np.zeros(1, np.int64))
    _error(jpeg, "cifar10", match="train_offsets are not increasing offsets")
    np.savez(jpeg, train_jpeg=np.zeros(4, np.uint8), train_offsets=np.array([0.0, 4.0]),
             y_train=np.zeros(1, np.int64), test_jpeg=np.zeros(4, np.uint8),
             test_offsets=np.array([0, 4]), y_test=np.zeros(1, np.int64))
    _error(jpeg, "cifar10", match="1-D integer array")


def _only(tmp_path, **arrays):
    path = tmp_path / "part.npz"
    np.savez(path, **arrays)
    return path


# --- the command line: exit 2 and the message ----------------------------------------------

def test_cli_flat_images_and_bad_labels_exit_2(tmp_path, capsys):
    a = _arrays()
    y = a["y_test"].copy()
    y[0] = 11
    cases = ((_npz(tmp_path, "flat.npz", x_train=a["x_train"].reshape(20, 784)),
              "(N, 28, 28) or (N, 28, 28, 1) or (N, 1, 28, 28)"),
             (_npz(tmp_path, "labels.npz", y_test=y), "test split (y_test) holds the label 11"))
    for path, needle in cases:
        rc = main(["train", "--dataset", "mnist", "--arch", "tiny-mlp", "--data-dir", str(path),
                   "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err
        assert err.startswith("robust-amo: error:") and err.count("\n") == 1
