"""The one train/held-out split and the one SPLITS_SINCE check, bit-identical to 0.2.0's draws.

The expected values below were produced by robust-amo 0.2.0's ``take_subset`` + ``hold_out``
(before the registry), so any change of the draws fails here.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from robust_amo import data as data_pkg
from robust_amo.cli import main
from robust_amo.data import (
    Examples,
    Loader,
    check_split_version,
    hold_out,
    take_subset,
    training_splits,
)
from robust_amo.data import splits as data_splits
from robust_amo.errors import DataError
from robust_amo.evaluation import load_eval_data
from robust_amo.version import __version__


def _numbered(n: int) -> Examples:
    """A split whose labels are the examples' positions, so a draw shows as indices."""
    return Examples(torch.arange(n), torch.arange(n), "toy")


@pytest.mark.parametrize(("n", "train_subset", "subset_seed", "val_size", "seed", "train",
                          "val"), [
    (40, 24, 3, 6, 0,
     [25, 18, 33, 9, 0, 22, 24, 29, 19, 14, 30, 7, 21, 26, 32, 28, 34, 16],
     [38, 11, 27, 31, 6, 10]),
    (30, None, 0, 7, 123,
     [25, 4, 24, 11, 1, 29, 8, 5, 18, 2, 17, 13, 22, 9, 16, 7, 19, 20, 0, 27, 3, 23, 21],
     [12, 28, 26, 14, 6, 15, 10]),
    (64, 16, 9, 0, 5, [35, 3, 18, 17, 30, 56, 4, 46, 15, 52, 39, 29, 47, 6, 61, 51], []),
])
def test_training_splits_draw_what_0_2_0_drew(n, train_subset, subset_seed, val_size, seed,
                                              train, val):
    a, b = training_splits(_numbered(n), train_subset=train_subset, subset_seed=subset_seed,
                           val_size=val_size, seed=seed)
    assert a.y.tolist() == train and b.y.tolist() == val
    assert torch.equal(a.x, a.y) and b.origin == "toy, held-out part"
    # the one function is the subset draw followed by the held-out draw
    rest, held = hold_out(take_subset(_numbered(n), train_subset, subset_seed), val_size, seed)
    assert torch.equal(rest.y, a.y) and torch.equal(held.y, b.y)


def test_a_digits_sized_draw_and_the_digits_dataset_are_unchanged(digits):
    a, b = training_splits(_numbered(1797), train_subset=1024, subset_seed=2, val_size=100,
                           seed=11)
    text = repr((a.y.tolist(), b.y.tolist())).encode()
    assert hashlib.sha256(text).hexdigest()[:16] == "704531c517ae6fa8"
    h = hashlib.sha256()
    for t in (digits[0].x, digits[0].y, digits[1].x, digits[1].y):
        h.update(t.numpy().tobytes())
    assert h.hexdigest()[:16] == "2bbd35bf107a0bb5"


def test_loader_batch_order_is_unchanged():
    loader = Loader(_numbered(10), 4, shuffle=True, seed=2)
    loader.set_epoch(1)
    assert [y.tolist() for _, y in loader] == [[2, 4, 9, 6], [1, 5, 0, 3], [7, 8]]


def test_check_split_version_refuses_only_older_runs_that_redraw():
    def refuse(v: str) -> DataError:
        return DataError(f"written by {v}")

    for version in ("0.2.0", "0.2.1", "1.0"):
        check_split_version(version, needed=True, refuse=refuse)
    for version in ("0.1.9", None, "junk"):
        check_split_version(version, needed=False, refuse=refuse)
        with pytest.raises(DataError, match=f"^written by {version}$"):
            check_split_version(version, needed=True, refuse=refuse)


def test_train_resume_and_eval_val_refuse_through_the_one_check(digits, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "run"

    def train_args(epochs: int) -> list[str]:
        return ["train", "--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard",
                "--epochs", str(epochs), "--batch-size", "256", "--set", "data.val_size=40",
                "--set", "data.augment=false", "--set", "eval.n_examples=8", "--out", str(out),
                "--no-progress"]

    assert main(train_args(1)) == 0
    meta = {"robust_amo_version": __version__, "dataset": "digits",
            "config": {"seed": 0, "data": {"val_size": 40}}}
    # the held-out part the evaluation rebuilds is the one training draws
    part = load_eval_data(meta, split="val")
    _, held = training_splits(digits[0], train_subset=None, subset_seed=0, val_size=40, seed=0)
    assert torch.equal(part.y, held.y) and torch.equal(part.x, held.x.float().div(255))

    # moving SPLITS_SINCE in its one place makes both callers refuse a run of today's version
    monkeypatch.setattr(data_splits, "SPLITS_SINCE", (99, 0, 0))
    with pytest.raises(DataError,
                       match=f"written by robust-amo {__version__} .*use the test split$"):
        load_eval_data(meta, split="val")
    capsys.readouterr()
    assert main([*train_args(2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"robust-amo {__version__} drew" in err and "other training data" in err
    assert err.count("\n") == 1


def test_split_is_a_deprecated_name_of_examples():
    with pytest.warns(DeprecationWarning, match="robust_amo.data.Examples"):
        assert data_pkg.Split is Examples
    with pytest.raises(AttributeError, match="no attribute 'Splits'"):
        data_pkg.Splits  # noqa: B018
