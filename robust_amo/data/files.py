"""Reading datasets of known shape from files: ``.npz`` archives and torchvision's layout.

:func:`from_files` is what a file-backed dataset's registered function calls: it tries the
``.npz`` names the dataset lists (or ``data_dir`` itself when it is a file), then torchvision's
folder layout, and checks every array against the dataset's :class:`DatasetInfo` with
:func:`checked_split`.
"""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .registry import DataRequest, DatasetInfo
from .splits import Examples

log = logging.getLogger(__name__)

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_JPEG_KEYS = ("train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test")


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


def checked_split(
    x: np.ndarray, y: np.ndarray, origin: str, name: str, info: DatasetInfo,
    keys: tuple[str, str] = ("images", "labels"), hint: str = "",
) -> Examples:
    """The checked :class:`Examples` of dataset ``name`` from image and label arrays.

    Args:
        x: uint8 images of ``info.input_shape``, HW (one channel), HWC or CHW.
        y: integer labels in ``0..info.num_classes - 1``, shape (N,) or (N, 1).
        origin: the file and split, kept in the split and named in messages.
        name: the dataset, for messages.
        info: the dataset's facts the arrays are checked against.
        keys: the names of the two arrays, for messages.
        hint: added to a shape error (e.g. the other split's shape).

    Raises:
        DataError: the images or labels do not fit ``info``, naming ``origin`` and the array.
    """
    if x.ndim == 0:
        raise DataError(f"{origin} ({keys[0]}): a single value, not an array of images")
    return Examples(_images(x, f"{origin} ({keys[0]})", name, info.input_shape, hint),
                 _labels(np.asarray(y), f"{origin} ({keys[1]})", len(x), info.num_classes),
                 origin)


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image  # only the JPEG copy of CIFAR-10 needs it

    b = buf.tobytes()
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(b[offsets[i]:offsets[i + 1]])).convert("RGB"))
         for i in range(len(offsets) - 1)]
    )


def _check_offsets(off: np.ndarray, size: int, where: str) -> None:
    """JPEG offsets: integers, non-decreasing, within the byte buffer of ``size`` bytes."""
    if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 1:
        raise DataError(f"{where} must be a 1-D integer array of byte offsets, got shape "
                        f"{tuple(off.shape)} and dtype {off.dtype}")
    if off[0] < 0 or off[-1] > size or (np.diff(off) < 0).any():
        raise DataError(f"{where} are not increasing offsets into the {size} bytes of JPEG "
                        "data; the file is inconsistent")


def load_npz(path: Path, name: str, info: DatasetInfo) -> tuple[Examples, Examples]:
    """The train and test splits of dataset ``name`` from the .npz file ``path``, checked.

    The archive holds ``x_train``, ``y_train``, ``x_test``, ``y_test``, or the JPEG-bytes
    layout of the offline CIFAR-10 copy (``train_jpeg``/``train_offsets``/``y_train`` and the
    same for ``test``), decoded to RGB at load.

    Raises:
        DataError: the file is unreadable, lacks arrays, or its arrays do not fit ``info``.
    """
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
        train = checked_split(arrays["x_train"], arrays["y_train"], f"{path}, train split", name,
                              info, ("x_train", "y_train"))
        if len(train) == 0:
            raise DataError(f"{path}: the train split (x_train) has no examples; a dataset "
                            "needs training images")
        # both splits are checked against the dataset's shape (so they agree); a test split
        # that does not fit is reported beside the train split's shape, which did
        hint = f" while x_train has {tuple(arrays['x_train'].shape)}"
        return train, checked_split(arrays["x_test"], arrays["y_test"], f"{path}, test split",
                                    name, info, ("x_test", "y_test"), hint)
    except DataError:
        raise  # already says what is wrong (DataError is an OSError: keep it unwrapped)
    except ValueError as e:
        if "pickle" in str(e):  # object arrays, or not a numpy file at all
            raise DataError(f"{path} is not an .npz archive of numeric arrays (numpy says: "
                            f"{e}); save uint8 images and integer labels with np.savez") from e
        raise DataError(f"could not read {path}: {e}; is the file complete?") from e
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"could not read {path}: {e}; is the file complete?") from e


def _load_torchvision(name: str, info: DatasetInfo, class_name: str, root: Path,
                      download: bool, by_split: bool) -> tuple[Examples, Examples]:
    import torchvision.datasets as tvd  # slow to import; only its folder layout needs it

    cls = getattr(tvd, class_name)
    splits = []
    for train in (True, False):
        if by_split:
            ds = cls(str(root), split="train" if train else "test", download=download)
            x, y = ds.data, ds.labels
        else:
            ds = cls(str(root), train=train, download=download)
            x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
            y = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets
        origin = f"{root} (torchvision {cls.__name__}), {'train' if train else 'test'} split"
        splits.append(checked_split(np.asarray(x), np.asarray(y), origin, name, info))
    return splits[0], splits[1]


def from_files(
    request: DataRequest, npz_names: tuple[str, ...], torchvision_class: str, *,
    by_split: bool = False,
) -> tuple[Examples, Examples]:
    """The splits of a file-backed dataset: an ``.npz`` file, else torchvision's layout.

    Args:
        request: what :func:`~robust_amo.data.load_dataset` was asked (its ``info`` is set).
        npz_names: the file names looked for in ``data_dir``, in order (``data_dir`` may also
            be the file itself, whatever its name).
        torchvision_class: the ``torchvision.datasets`` class whose folder layout is read
            next (and which downloads when ``request.download``).
        by_split: the class takes ``split="train"|"test"`` and keeps its labels in
            ``.labels`` (as SVHN does) instead of ``train=`` and ``.targets``.

    Raises:
        DataError: no ``data_dir``, nothing found there (saying where it looked and how to get
            the data), or a file whose arrays do not fit the dataset.
    """
    name, info, root = request.name, request.info, request.data_dir
    if info is None:
        raise ValueError(f"dataset {name!r} reads files of known shape: register it with a "
                         "DatasetInfo")
    if root is None:
        raise DataError(
            f"dataset {name!r} needs data_dir: a folder with {' or '.join(npz_names)} "
            "(keys x_train, y_train, x_test, y_test) or torchvision's layout (download lets "
            "torchvision fetch it there)", params=("data_dir", "download")
        )
    if root.is_file():
        return load_npz(root, name, info)
    looked: list[str] = []
    for fname in npz_names:
        looked.append(str(root / fname))
        if (root / fname).is_file():
            return load_npz(root / fname, name, info)
    created = request.download and not root.exists()
    try:
        return _load_torchvision(name, info, torchvision_class, root, request.download,
                                 by_split)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        if request.download:
            if created:
                # torchvision made the folder and may have left a partial archive in it: the
                # folder is ours alone, and an empty or half-filled one would mislead a rerun
                shutil.rmtree(root, ignore_errors=True)
            raise DataError(
                f"dataset {name!r}: downloading it into {root} failed "
                f"({' '.join(str(e).split())[:160]}); check the network connection, or put one "
                f"of {', '.join(npz_names)} (or torchvision's files) in that folder"
            ) from None
        looked.append(f"{root} (torchvision layout: {e})")
        raise DataError(
            f"dataset {name!r} not found; looked in: {'; '.join(looked)}. Put one of "
            f"{', '.join(npz_names)} in that folder, or let torchvision fetch it (download)",
            params=("download",)
        ) from None
