"""Datasets held in memory as uint8 tensors, batched and augmented on the training device.

Sources, tried in this order for ``load_dataset(name, data_dir)``:

1. ``.npz`` files in ``data_dir`` (or ``data_dir`` itself is the file) with keys ``x_train``,
   ``y_train``, ``x_test``, ``y_test``, or the JPEG-bytes layout of the offline CIFAR-10 copy
   (``train_jpeg``/``train_offsets``/...); file names are listed in ``NPZ_NAMES``. Images are
   uint8 of the dataset's shape, HW, HWC or CHW (MNIST: (N, 28, 28), (N, 28, 28, 1) or
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
   the labels 0, 1, ...). Every image is converted to RGB, resized so its shorter side is
   ``image_size`` and centre-cropped to ``image_size`` x ``image_size`` once, at load; training
   augmentation is then the device-side pad-4 crop and flip (``data.augment``).

Keeping the whole uint8 set on the device and doing crop/flip there keeps the data pipeline off
the critical path of adversarial training (10+ forward/backward passes per batch).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .runtime import derive_seed, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: classes, shape and the normalisation used inside models;
    ``classes`` names the labels 0, 1, ... where they are known."""

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
DIGITS = tuple(str(i) for i in range(10))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""``imagefolder`` normalises with ImageNet's statistics, the usual choice for photographs."""


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                           CIFAR10_CLASSES),
    "cifar100": DatasetInfo(100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo(10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        DIGITS),
    "mnist": DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,), DIGITS),
    "fashion-mnist": DatasetInfo(10, (1, 28, 28), (0.2860,), (0.3530,), FASHION_CLASSES),
    "digits": DatasetInfo(10, (1, 8, 8), (0.3055,), (0.3759,), DIGITS),
}
FOLDER_DATASETS = ("imagefolder",)
"""Datasets whose classes and image size come from the folder and ``data.image_size``."""

NPZ_NAMES: dict[str, list[str]] = {
    "cifar10": ["cifar10.npz", "cifar10_jpegq75_jpegbytes.npz"],
    "cifar100": ["cifar100.npz"],
    "mnist": ["mnist.npz"],
    "fashion-mnist": ["fashion_mnist.npz", "fashion-mnist.npz"],
    "svhn": ["svhn.npz"],
}


def normalize_dataset_name(name: str) -> str:
    """``CIFAR-10``/``cifar_10`` -> ``cifar10``; ``FashionMNIST`` -> ``fashion-mnist``."""
    n = name.strip().lower().replace("_", "-")
    aliases = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
               "fmnist": "fashion-mnist", "image-folder": "imagefolder"}
    n = aliases.get(n, n)
    if n not in DATASETS and n not in FOLDER_DATASETS:
        known = ", ".join([*DATASETS, *FOLDER_DATASETS])
        raise DataError(f"unknown dataset {name!r}; known datasets: {known}")
    return n


def dataset_info(name: str, data_dir: str | Path | None = None,
                 image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``imagefolder`` reads its classes from
    ``data_dir/train`` and needs ``image_size``."""
    n = normalize_dataset_name(name)
    if n == "imagefolder":
        root, size = _folder_args(data_dir, image_size)
        classes = _class_names(root / "train")
        return DatasetInfo(len(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
                           tuple(classes))
    return DATASETS[n]


def _folder_args(data_dir: str | Path | None, image_size: int | None) -> tuple[Path, int]:
    if data_dir is None:
        raise DataError("--dataset imagefolder needs --data-dir: a folder with train/CLASS/*.png "
                        "and test/CLASS/... (or val/)")
    if image_size is None or image_size < 1:
        raise DataError("--dataset imagefolder needs data.image_size (e.g. --set "
                        "data.image_size=32): images are resized and centre-cropped to it")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder; imagefolder needs "
                        "train/CLASS/... and test/CLASS/... inside it")
    return root, int(image_size)


def _class_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; imagefolder needs one sub-folder per class "
                        f"in {folder} (e.g. {folder}/cat/001.png)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not
                     d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} holds no class folders; put each class's images in "
                        f"{folder}/CLASS/")
    return classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and
                  f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (bilinear), centre-cropped: (size, size, 3) uint8."""
    from PIL import Image, UnidentifiedImageError  # only image folders need it

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read the image {path} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); remove or replace it") from None


def _load_folder(root: Path, size: int) -> tuple[Split, Split]:
    """The train and test (or val) splits of an image folder; see the module docstring."""
    classes = _class_names(root / "train")
    held = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if held is None:
        raise DataError(f"{root} has train/ but no test/ or val/ folder; add one with the same "
                        "class folders")
    other = _class_names(held)
    if other != classes:
        only_train = sorted(set(classes) - set(other))
        only_held = sorted(set(other) - set(classes))
        raise DataError(f"the classes of {root / 'train'} and {held} differ (only in train: "
                        f"{only_train or 'none'}; only in {held.name}: {only_held or 'none'}); "
                        "both need the same class folders")
    splits = []
    for part in (root / "train", held):
        xs, ys = [], []
        for label, c in enumerate(classes):
            files = _image_files(part / c)
            xs += [_load_image(f, size) for f in files]
            ys += [label] * len(files)
        if not xs:
            raise DataError(f"{part} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                            "class folders")
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(x, torch.tensor(ys, dtype=torch.int64),
                            f"{part} ({len(xs)} images)", tuple(classes)))
    return splits[0], splits[1]


@dataclass
class Split:
    """uint8 images (N, C, H, W) and int64 labels (N,), on the CPU.

    ``origin`` says where the examples come from (``"data/mnist.npz, test split"``), for
    messages; subsets keep it.
    """

    x: torch.Tensor
    y: torch.Tensor
    origin: str = field(default="", compare=False)
    classes: tuple[str, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> Split:
        """The examples at ``idx``."""
        return Split(self.x[idx], self.y[idx], self.origin, self.classes)


def require_examples(split: Split, purpose: str = "evaluation") -> Split:
    """``split`` if it holds examples, else a DataError naming where it came from.

    An empty split would give 0 examples and NaN accuracies; call this where a run is about to
    measure on ``split`` (and only there: a file's empty test split is no error for a run that
    evaluates on held-out training examples).
    """
    if len(split) == 0:
        raise DataError(f"{split.origin or 'the split'} has no examples, so {purpose} would "
                        "measure nothing; use a file whose split holds examples")
    return split


def _shapes(shape: tuple[int, int, int]) -> str:
    """The image array shapes accepted for a dataset of (C, H, W) ``shape``."""
    c, h, w = shape
    forms = [(h, w)] if c == 1 else []
    forms += [(h, w, c), (c, h, w)]
    return " or ".join("(N, " + ", ".join(map(str, f)) + ")" for f in forms)


def _images(x: np.ndarray, where: str, name: str, shape: tuple[int, int, int],
            hint: str = "") -> torch.Tensor:
    """uint8 (N, C, H, W) images from an array of ``name``'s images, HW, HWC or CHW.

    The layout is told apart by the dataset's known (C, H, W), so (N, 28, 28, 1) and
    (N, 1, 28, 28) both load as MNIST; anything else (flat (N, 784) rows, another size) is a
    DataError saying the shapes that work (and ``hint``, e.g. the other split's shape).
    """
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (0..255), got dtype {x.dtype}; convert "
                        "them, e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1]")
    c, h, w = shape
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 3 and c == 1 and tuple(t.shape[1:]) == (h, w):
        return t.unsqueeze(1)
    if t.dim() == 4 and tuple(t.shape[1:]) == (h, w, c):
        return t.permute(0, 3, 1, 2).contiguous()
    if t.dim() == 4 and tuple(t.shape[1:]) == (c, h, w):
        return t
    raise DataError(f"{where} has shape {tuple(x.shape)}{hint}; {name} needs uint8 images of "
                    f"shape {_shapes(shape)} (reshape flat rows to images)")


def _labels(y: np.ndarray, where: str, n: int, num_classes: int) -> torch.Tensor:
    """int64 labels (N,) from an integer array (or a float one of exact integers), range-checked."""
    if y.ndim == 2 and y.shape[1] == 1:  # Keras keeps CIFAR labels as (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where} has shape {tuple(y.shape)}; labels are one integer per image, "
                        f"shape ({n},)")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels; the file is inconsistent")
    top = f"0..{num_classes - 1}"
    if y.dtype.kind == "f":
        exact = np.isfinite(y) & (y == np.round(y))
        if not exact.all():
            raise DataError(f"{where} holds the label {y[~exact][0]!r}, which is not an integer; "
                            f"labels must be whole numbers {top} (num_classes {num_classes})")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {y.dtype}; labels must be integers {top} "
                        f"(num_classes {num_classes})")
    if n:
        lo, hi = y.min(), y.max()
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            shown = int(bad) if bad == np.round(bad) and abs(bad) < 2**63 else bad
            raise DataError(f"{where} holds the label {shown}, out of range: with num_classes "
                            f"{num_classes} labels lie in {top}")
    return torch.from_numpy(y.astype(np.int64))


def _split(x: np.ndarray, y: np.ndarray, origin: str, name: str,
           keys: tuple[str, str] = ("images", "labels"), hint: str = "") -> Split:
    """A checked :class:`Split` of dataset ``name`` from image and label arrays.

    ``origin`` names the file and split and ``keys`` the arrays, for messages.
    """
    info = DATASETS[name]
    if x.ndim == 0:
        raise DataError(f"{origin} ({keys[0]}): a single value, not an array of images")
    return Split(_images(x, f"{origin} ({keys[0]})", name, info.input_shape, hint),
                 _labels(np.asarray(y), f"{origin} ({keys[1]})", len(x), info.num_classes),
                 origin)


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image  # only the JPEG copy of CIFAR-10 needs it

    b = buf.tobytes()
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(b[offsets[i]:offsets[i + 1]])).convert("RGB"))
         for i in range(len(offsets) - 1)]
    )


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_JPEG_KEYS = ("train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test")


def _check_offsets(off: np.ndarray, size: int, where: str) -> None:
    """JPEG offsets: integers, non-decreasing, within the byte buffer of ``size`` bytes."""
    if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 1:
        raise DataError(f"{where} must be a 1-D integer array of byte offsets, got shape "
                        f"{tuple(off.shape)} and dtype {off.dtype}")
    if off[0] < 0 or off[-1] > size or (np.diff(off) < 0).any():
        raise DataError(f"{where} are not increasing offsets into the {size} bytes of JPEG "
                        "data; the file is inconsistent")


def _load_npz(path: Path, name: str) -> tuple[Split, Split]:
    """The train and test splits of dataset ``name`` from the .npz file ``path``, checked."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds one array, not an .npz archive; save the splits with "
                            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
        with archive as d:
            arrays: dict[str, np.ndarray] = {}
            if "train_jpeg" in d.files:
                missing = [k for k in _JPEG_KEYS if k not in d.files]
                if missing:
                    raise DataError(f"{path} lacks the keys {missing} of the JPEG-bytes layout "
                                    f"({', '.join(_JPEG_KEYS)})")
                log.info("decoding JPEG bytes from %s", path)
                for part in ("train", "test"):
                    buf, off = d[f"{part}_jpeg"], d[f"{part}_offsets"]
                    _check_offsets(off, buf.nbytes, f"{path}: {part}_offsets")
                    arrays[f"x_{part}"] = _decode_jpegs(buf, off)
                    arrays[f"y_{part}"] = d[f"y_{part}"]
            else:
                missing = [k for k in _NPZ_KEYS if k not in d.files]
                if missing:
                    raise DataError(
                        f"{path} lacks the keys {missing} (it has {sorted(d.files)}); an .npz "
                        "dataset needs x_train, y_train, x_test, y_test (uint8 images HW, HWC or "
                        "CHW, integer labels)"
                    )
                arrays = {k: d[k] for k in _NPZ_KEYS}
        train = _split(arrays["x_train"], arrays["y_train"], f"{path}, train split", name,
                       ("x_train", "y_train"))
        if len(train) == 0:
            raise DataError(f"{path}: the train split (x_train) has no examples; a dataset "
                            "needs training images")
        # both splits are checked against the dataset's shape (so they agree); a test split
        # that does not fit is reported beside the train split's shape, which did
        hint = f" while x_train has {tuple(arrays['x_train'].shape)}"
        return train, _split(arrays["x_test"], arrays["y_test"], f"{path}, test split", name,
                             ("x_test", "y_test"), hint)
    except DataError:
        raise  # already says what is wrong (DataError is an OSError: keep it unwrapped)
    except ValueError as e:
        if "pickle" in str(e):  # object arrays, or not a numpy file at all
            raise DataError(f"{path} is not an .npz archive of numeric arrays (numpy says: "
                            f"{e}); save uint8 images and integer labels with np.savez") from e
        raise DataError(f"could not read {path}: {e}; is the file complete?") from e
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"could not read {path}: {e}; is the file complete?") from e


def _load_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits  # slow to import; only `digits` needs it

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return (_split(x[:1500], y[:1500], "digits, train split", "digits"),
            _split(x[1500:], y[1500:], "digits, test split", "digits"))


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision.datasets as tvd  # slow to import; only its folder layout needs it

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion-mnist": tvd.FashionMNIST, "svhn": tvd.SVHN}[name]
    splits = []
    for train in (True, False):
        if name == "svhn":  # split= instead of train=, labels as .labels (digit 0 as 0)
            ds = cls(str(root), split="train" if train else "test", download=download)
            x, y = ds.data, ds.labels
        else:
            ds = cls(str(root), train=train, download=download)
            x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
            y = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets
        origin = f"{root} (torchvision {cls.__name__}), {'train' if train else 'test'} split"
        splits.append(_split(np.asarray(x), np.asarray(y), origin, name))
    return splits[0], splits[1]


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False,
    image_size: int | None = None,
) -> tuple[Split, Split]:
    """Load the train and test splits of ``name`` as uint8 tensors.

    Args:
        name: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist``, ``digits`` or
            ``imagefolder``.
        data_dir: folder holding an .npz file or torchvision's layout, or the .npz file itself;
            for ``imagefolder`` the folder with ``train/`` and ``test/`` (or ``val/``).
        download: let torchvision download into ``data_dir`` (never done otherwise).
        image_size: side of the square images of ``imagefolder`` (required there).

    Returns:
        ``(train, test)`` splits; the test split may be empty (see :func:`require_examples`).

    Raises:
        DataError: saying where it looked and how to get the data, or what is wrong with the
            file: missing arrays, images of another shape or dtype (for MNIST (N, 28, 28),
            (N, 28, 28, 1) or (N, 1, 28, 28)), labels that are not integers in
            ``0..num_classes-1`` (naming the split and the value), splits whose image shapes
            differ, an empty train split.
    """
    name = normalize_dataset_name(name)
    if name == "digits":
        return _label_names(_load_digits(), name)
    if name == "imagefolder":
        return _load_folder(*_folder_args(data_dir, image_size))
    if data_dir is None:
        raise DataError(
            f"dataset {name!r} needs --data-dir: a folder with {' or '.join(NPZ_NAMES[name])} "
            "(keys x_train, y_train, x_test, y_test) or torchvision's layout; add --download to "
            "let torchvision fetch it there"
        )
    root = Path(data_dir).expanduser()
    looked: list[str] = []
    if root.is_file():
        train, test = _load_npz(root, name)
    else:
        for fname in NPZ_NAMES[name]:
            looked.append(str(root / fname))
            if (root / fname).is_file():
                train, test = _load_npz(root / fname, name)
                break
        else:
            try:
                train, test = _load_torchvision(name, root, download)
            except (RuntimeError, FileNotFoundError, OSError) as e:
                looked.append(f"{root} (torchvision layout: {e})")
                raise DataError(
                    f"dataset {name!r} not found; looked in: {'; '.join(looked)}. Put one of "
                    f"{', '.join(NPZ_NAMES[name])} in that folder, or pass --download to let "
                    "torchvision fetch it"
                ) from None
    return _label_names((train, test), name)


def _label_names(splits: tuple[Split, Split], name: str) -> tuple[Split, Split]:
    classes = DATASETS[name].classes
    train, test = splits
    return (dataclasses.replace(train, classes=classes),
            dataclasses.replace(test, classes=classes))


def take_subset(split: Split, size: int | None, seed: int) -> Split:
    """``size`` examples drawn without replacement with ``seed`` (Sokolić: 256/512/1024)."""
    if size is None or size >= len(split):
        return split
    if size <= 0:
        raise DataError(f"train_subset must be positive, got {size}")
    g = torch.Generator().manual_seed(derive_seed(seed, "subset"))
    return split.subset(torch.randperm(len(split), generator=g)[:size])


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split]:
    """Split off ``size`` held-out examples (fixed by ``seed``): ``(rest, held_out)``."""
    held = f"{split.origin}, held-out part" if split.origin else "the held-out part"
    if size <= 0:
        return split, Split(split.x[:0], split.y[:0], held, split.classes)
    if size >= len(split):
        raise DataError(f"val_size {size} leaves no training data ({len(split)} examples)")
    g = torch.Generator().manual_seed(derive_seed(seed, "hold-out"))
    perm = torch.randperm(len(split), generator=g)
    val = split.subset(perm[:size])
    return split.subset(perm[size:]), Split(val.x, val.y, held, split.classes)


def augment(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, *, rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, per example.

    Args:
        x: float images (B, C, H, W) on any device.
        generator: a CPU generator; offsets are drawn on the CPU so the stream does not depend
            on the device.
        rank, world_size: ``x`` is this rank's share of a global batch of ``B * world_size``
            examples (positions ``rank::world_size``, as :class:`Loader` deals them). The
            offsets are drawn for the whole global batch and this rank's are kept, so every
            example is augmented exactly as in a single-process run.
    """
    b, _, h, w = x.shape
    n = b * world_size
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[rank::world_size]
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[rank::world_size]
    flip = (torch.rand(n, generator=generator) < 0.5)[rank::world_size]
    dx, dy, flip = (to_device(t, x.device) for t in (dx, dy, flip))
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(b, 1))  # (B, H)
    cols = torch.arange(w, device=x.device).view(1, w).expand(b, w)
    cols = torch.where(flip.view(b, 1), (w - 1) - cols, cols) + dx.view(b, 1)  # (B, W)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class Loader:
    """Minibatches of a :class:`Split` on ``device`` as float images in [0, 1].

    The order (and the augmentation) of epoch ``e`` depends only on ``(seed, e)``, so a run that
    resumes at an epoch boundary sees exactly the batches an uninterrupted run would.

    Args:
        split: the examples.
        batch_size: examples per batch.
        device: where batches live; the uint8 data is moved there once.
        shuffle: a new permutation every epoch.
        augment: random crop (4-pixel padding) and horizontal flip.
        seed: base seed of the per-epoch generator.
        drop_last: drop the final incomplete batch.
        rank, world_size: shard every epoch's permutation across data-parallel ranks: with
            ``batch_size`` b per rank, the union over ranks of batch i is batch i of a
            single-process loader with batch size ``b * world_size`` (same examples, same
            augmentation); the last ``n % world_size`` examples of the permutation are dropped.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and augmentation stream of ``epoch``."""
        self.epoch = epoch

    def _indices(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.y)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            idx = idx[: n - n % self.world_size][self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self.y) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "loader", self.epoch))
        idx = self._indices(g).to(self.x.device)
        for i in range(len(self)):
            j = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.x[j].float().div_(255)
            if self.augment:
                x = augment(x, g, rank=self.rank, world_size=self.world_size)
            yield x, self.y[j]
