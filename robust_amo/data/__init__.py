"""Datasets held in memory as uint8 tensors, batched and augmented on the training device.

Every dataset is one function registered with :func:`register_dataset` (the built-in ones are in
:mod:`robust_amo.data.datasets`); :func:`load_dataset`, :func:`dataset_info` and
:func:`normalize_dataset_name` look names up in that registry. Sources of the built-in datasets:

1. ``.npz`` files in ``data_dir`` (or ``data_dir`` itself is the file) with keys ``x_train``,
   ``y_train``, ``x_test``, ``y_test``, or the JPEG-bytes layout of the offline CIFAR-10 copy
   (``train_jpeg``/``train_offsets``/...); each dataset's function lists its file names. Images
   are uint8 of the dataset's shape, HW, HWC or CHW (MNIST: (N, 28, 28), (N, 28, 28, 1) or
   (N, 1, 28, 28)); labels are integers ``0 <= y < num_classes``, shape (N,) or (N, 1). Float
   labels are accepted only when every value is an exact integer (``3.0``; ``2.5`` or NaN are
   errors), so nothing is rounded silently. The train split must not be empty; an empty test
   split loads, and :func:`require_examples` rejects it where a run evaluates on it.
2. torchvision's layout under ``data_dir`` (``cifar-10-batches-py``, ``MNIST/raw``, ...); with
   ``download=True`` torchvision fetches it there.
3. ``digits`` needs no file: scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to
   0..255), split 1500 train / 297 test with a fixed permutation.
4. ``imagefolder``: your own images, ``data_dir/train/CLASS/*.png|jpg|...`` and
   ``data_dir/test/CLASS/...`` (or ``data_dir/val/``), one folder per class (sorted names give
   the labels 0, 1, ...), resized and centre-cropped to ``image_size`` once, at load.

A split's examples are an :class:`Examples` (uint8 images, labels, class names), not to be
confused with the split *names* of :mod:`robust_amo.config` (``SplitName``, ``HeldOutSplit``).
A run's training examples and held-out part come from :func:`training_splits`; batches from
:class:`Loader`, which keeps the whole uint8 set on the device and crops and flips there.

Deprecated: ``Split``, the old name of :class:`Examples`, still imports from here (with a
``DeprecationWarning``) until the next version.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import datasets
from .datasets import CIFAR10_CLASSES, DIGITS, FASHION_CLASSES
from .files import checked_split, from_files, load_npz
from .folders import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD
from .loader import Loader, augment
from .registry import (
    DataRequest,
    DatasetInfo,
    dataset_info,
    dataset_names,
    fixed_info,
    load_dataset,
    normalize_dataset_name,
    register_dataset,
    unregister_dataset,
)
from .splits import (
    AUTO_FRACTION,
    AUTO_MAX,
    Examples,
    check_split_version,
    held_out_size,
    hold_out,
    require_examples,
    take_subset,
    training_splits,
)

__all__ = [
    "AUTO_FRACTION", "AUTO_MAX", "CIFAR10_CLASSES", "DIGITS", "DataRequest", "DatasetInfo",
    "Examples", "FASHION_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "Loader",
    "augment", "check_split_version", "checked_split", "dataset_info", "dataset_names", "datasets",
    "fixed_info", "from_files", "held_out_size", "hold_out", "load_dataset", "load_npz",
    "normalize_dataset_name", "register_dataset", "require_examples", "take_subset",
    "training_splits", "unregister_dataset",
]


def __getattr__(name: str) -> Any:
    """``Split``: the deprecated name of :class:`Examples`, with a warning (one version)."""
    if name == "Split":
        warnings.warn("robust_amo.data.Split is deprecated: it is robust_amo.data.Examples "
                      "(Split kept for one version)", DeprecationWarning, stacklevel=2)
        return Examples
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
