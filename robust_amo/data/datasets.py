"""The datasets robust-amo knows: one registered function each (docs/architecture.md, "A dataset").

Registration order is the order ``known datasets: ...`` lists them in.
"""

from __future__ import annotations

import numpy as np

from .files import checked_split, from_files
from .folders import folder_info, load_folder
from .registry import DataRequest, DatasetInfo, register_dataset
from .splits import Examples

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
DIGITS = tuple(str(i) for i in range(10))


@register_dataset("cifar10", aliases=("cifar-10",), info=DatasetInfo(
    10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), CIFAR10_CLASSES))
def cifar10(request: DataRequest) -> tuple[Examples, Examples]:
    """CIFAR-10: ``cifar10.npz``, the lossy JPEG copy ``cifar10_jpegq75_jpegbytes.npz``, or
    torchvision's ``cifar-10-batches-py``."""
    return from_files(request, ("cifar10.npz", "cifar10_jpegq75_jpegbytes.npz"), "CIFAR10")


@register_dataset("cifar100", aliases=("cifar-100",), info=DatasetInfo(
    100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
def cifar100(request: DataRequest) -> tuple[Examples, Examples]:
    """CIFAR-100 (fine labels): ``cifar100.npz`` or torchvision's ``cifar-100-python``."""
    return from_files(request, ("cifar100.npz",), "CIFAR100")


@register_dataset("svhn", info=DatasetInfo(
    10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DIGITS))
def svhn(request: DataRequest) -> tuple[Examples, Examples]:
    """SVHN (digit 0 labelled 0): ``svhn.npz`` or torchvision's ``train_32x32.mat`` and
    ``test_32x32.mat`` (scipy reads them)."""
    return from_files(request, ("svhn.npz",), "SVHN", by_split=True)


@register_dataset("mnist", info=DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,), DIGITS))
def mnist(request: DataRequest) -> tuple[Examples, Examples]:
    """MNIST: ``mnist.npz`` or torchvision's ``MNIST/raw``."""
    return from_files(request, ("mnist.npz",), "MNIST")


@register_dataset("fashion-mnist", aliases=("fashionmnist", "fmnist"), info=DatasetInfo(
    10, (1, 28, 28), (0.2860,), (0.3530,), FASHION_CLASSES))
def fashion_mnist(request: DataRequest) -> tuple[Examples, Examples]:
    """Fashion-MNIST: ``fashion_mnist.npz``, ``fashion-mnist.npz`` or torchvision's
    ``FashionMNIST/raw``."""
    return from_files(request, ("fashion_mnist.npz", "fashion-mnist.npz"), "FashionMNIST")


@register_dataset("digits", info=DatasetInfo(10, (1, 8, 8), (0.3055,), (0.3759,), DIGITS))
def digits(request: DataRequest) -> tuple[Examples, Examples]:
    """scikit-learn's bundled 8x8 digits, no file needed: 1797 images, 0..16 scaled to 0..255,
    split 1500 train / 297 test after a fixed permutation."""
    from sklearn.datasets import load_digits  # slow to import; only `digits` needs it

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    # part of the dataset's definition, not a run's randomness: no run seed reaches it, and
    # every split ever drawn from `digits` depends on this exact order
    perm = np.random.RandomState(0).permutation(len(y))
    x, y = x[perm], y[perm]
    info = request.info
    return (checked_split(x[:1500], y[:1500], "digits, train split", "digits", info),
            checked_split(x[1500:], y[1500:], "digits, test split", "digits", info))


@register_dataset("imagefolder", aliases=("image-folder",), info=folder_info)
def imagefolder(request: DataRequest) -> tuple[Examples, Examples]:
    """Your own images, ``data_dir/train/CLASS/*`` and ``data_dir/test/CLASS/*`` (or ``val/``),
    resized and centre-cropped to ``image_size`` (see :mod:`robust_amo.data.folders`)."""
    return load_folder(request)
