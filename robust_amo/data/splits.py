"""Splits of a dataset and the seeded draws made from them.

An :class:`Examples` is a set of uint8 images with labels (the examples of one split; the
split's name is a ``config.SplitName``). The training run and the evaluation of a held-out part
both call :func:`training_splits`, so the ``train_subset`` and ``val_size`` draws are written
once; :func:`check_split_version` is the one place that knows since which version those draws
are reproducible (``version.SPLITS_SINCE``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import DataError, RobustAmoError
from ..runtime import generator
from ..version import SPLITS_SINCE, version_tuple


@dataclass
class Examples:
    """The examples of a split: uint8 images (N, C, H, W) and int64 labels (N,), on the CPU.

    ``origin`` says where the examples come from (``"data/mnist.npz, test split"``), for
    messages; subsets keep it.
    """

    x: torch.Tensor
    y: torch.Tensor
    origin: str = field(default="", compare=False)
    classes: tuple[str, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> Examples:
        """The examples at ``idx``."""
        return Examples(self.x[idx], self.y[idx], self.origin, self.classes)


def require_examples(split: Examples, purpose: str = "evaluation") -> Examples:
    """``split`` if it holds examples, else a DataError naming where it came from.

    An empty split would give 0 examples and NaN accuracies; call this where a run is about to
    measure on ``split`` (and only there: a file's empty test split is no error for a run that
    evaluates on held-out training examples).

    Args:
        split: the examples about to be measured.
        purpose: what would measure them, for the message.

    Returns:
        ``split`` itself.

    Raises:
        DataError: ``split`` is empty.
    """
    if len(split) == 0:
        raise DataError(f"{split.origin or 'the split'} has no examples, so {purpose} would "
                        "measure nothing; use a file whose split holds examples")
    return split


def take_subset(split: Examples, size: int | None, seed: int) -> Examples:
    """``size`` examples drawn without replacement with ``seed`` (Sokolić: 256/512/1024).

    Args:
        split: the examples to draw from.
        size: how many to keep; None, or at least ``len(split)``, keeps them all.
        seed: the subset's seed (``data.subset_seed``), through the ``"subset"`` stream.

    Raises:
        DataError: ``size`` is not positive.
    """
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise DataError(f"train_subset must be positive, got {size}")
    perm = torch.randperm(len(split), generator=generator(seed, "subset"))
    return split.subset(perm[:size])


def hold_out(split: Examples, size: int, seed: int) -> tuple[Examples, Examples]:
    """Split off ``size`` held-out examples (fixed by ``seed``): ``(rest, held_out)``.

    Args:
        split: the training examples.
        size: how many to hold out; 0 or less holds out none (an empty second split).
        seed: the run's seed, through the ``"hold-out"`` stream.

    Raises:
        DataError: ``size`` would leave no training examples.
    """
    held = f"{split.origin}, held-out part" if split.origin else "the held-out part"
    if size <= 0:
        return split, Examples(split.x[:0], split.y[:0], held, split.classes)
    if size >= len(split):
        raise DataError(f"val_size {size} leaves no training data ({len(split)} examples)")
    perm = torch.randperm(len(split), generator=generator(seed, "hold-out"))
    val = split.subset(perm[:size])
    return split.subset(perm[size:]), Examples(val.x, val.y, held, split.classes)


AUTO_FRACTION = 0.1
"""``data.val_size: auto`` holds out this fraction of the training examples ..."""
AUTO_MAX = 1000
"""... but at most this many (CIFAR-10: 1000 of 50,000; digits: 150 of 1500)."""


def held_out_size(val_size: int | str, n_train: int, check_split: str = "auto") -> int:
    """How many training examples a run holds out: ``data.val_size`` with ``auto`` resolved.

    Args:
        val_size: ``data.val_size``: a count, or ``"auto"``: :data:`AUTO_FRACTION` of the
            training examples (after ``train_subset``), at least 1 and at most
            :data:`AUTO_MAX`; none when the check is on the test split (``check_split``
            ``"test"``), which needs no held-out part.
        n_train: the training examples there are (after ``train_subset``).
        check_split: ``eval.split`` of the run.

    Returns:
        the count (0: nothing held out).
    """
    if val_size != "auto":
        return int(val_size)
    if check_split == "test":
        return 0
    return min(AUTO_MAX, max(1, int(n_train * AUTO_FRACTION)))


def training_splits(
    train: Examples, *, train_subset: int | None, subset_seed: int, val_size: int | str,
    seed: int, check_split: str = "auto",
) -> tuple[Examples, Examples]:
    """The examples a run trains on and the part it holds out, as training drew them.

    The ``train_subset`` draw comes first and the held-out part is taken from it, so a run
    and a later evaluation of its held-out part (``split="val"``) see the same examples.

    Args:
        train: the dataset's whole training split.
        train_subset: ``data.train_subset`` (None: all of ``train``).
        subset_seed: ``data.subset_seed``.
        val_size: ``data.val_size`` (0: nothing held out; ``"auto"``: :func:`held_out_size`).
        seed: the run's ``seed``.
        check_split: the run's ``eval.split`` (``auto`` resolves to no held-out part under
            ``test``).

    Returns:
        ``(train, held_out)``; ``held_out`` is empty when ``val_size`` is 0.

    Raises:
        DataError: ``train_subset`` is not positive, or ``val_size`` leaves no training data.
    """
    pool = take_subset(train, train_subset, subset_seed)
    return hold_out(pool, held_out_size(val_size, len(pool), check_split), seed)


def check_split_version(
    written_by: object, *, needed: bool, refuse: Callable[[str], RobustAmoError],
) -> None:
    """Refuse to redraw the splits of a run written before ``version.SPLITS_SINCE``.

    Runs written earlier drew ``train_subset`` and the held-out part with another seed rule,
    so :func:`training_splits` would give them other examples.

    Args:
        written_by: the ``robust_amo_version`` the run recorded (None or junk: too old).
        needed: whether the caller redraws anything (a subset or a held-out part); when not,
            any version is fine.
        refuse: builds the caller's error from the recorded version's text, so a resumed run
            and an evaluation can each say what to do instead.

    Raises:
        RobustAmoError: the one ``refuse`` builds, when ``needed`` and the run is too old.
    """
    if needed and version_tuple(written_by) < SPLITS_SINCE:
        raise refuse(str(written_by))
