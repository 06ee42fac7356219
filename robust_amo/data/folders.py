"""Your own images: ``data_dir/train/CLASS/*`` and ``data_dir/test/CLASS/*`` (or ``val/``).

One folder per class (sorted names give the labels 0, 1, ...). Every image is converted to
RGB, resized so its shorter side is ``image_size`` and centre-cropped to a square once, at
load; training augmentation is then the device-side pad-4 crop and flip (``data.augment``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .registry import DataRequest, DatasetInfo
from .splits import Examples

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""Image folders normalise with ImageNet's statistics, the usual choice for photographs."""


def folder_args(request: DataRequest) -> tuple[Path, int]:
    """The folder and image side of an image-folder request, checked.

    Raises:
        DataError: no ``data_dir``, no ``image_size``, or ``data_dir`` is not a folder.
    """
    if request.data_dir is None:
        raise DataError("dataset imagefolder needs data_dir: a folder with train/CLASS/*.png "
                        "and test/CLASS/... (or val/)", params=("dataset", "data_dir"))
    if request.image_size is None or request.image_size < 1:
        # the config key first (what a config file sets), then the parameter (a flag in the CLI)
        raise DataError("dataset imagefolder needs data.image_size (image_size, e.g. 32): images "
                        "are resized and centre-cropped to it", params=("dataset", "image_size"))
    root = request.data_dir
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a folder; imagefolder needs "
                        "train/CLASS/... and test/CLASS/... inside it", params=("data_dir",))
    return root, int(request.image_size)


def class_names(folder: Path) -> list[str]:
    """The sorted class folders of ``folder`` (hidden ones skipped).

    Raises:
        DataError: ``folder`` is missing or holds no class folders.
    """
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; imagefolder needs one sub-folder per class "
                        f"in {folder} (e.g. {folder}/cat/001.png)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not
                     d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} holds no class folders; put each class's images in "
                        f"{folder}/CLASS/")
    return classes


def folder_info(request: DataRequest) -> DatasetInfo:
    """RGB images of side ``image_size``, the classes of ``data_dir/train``, ImageNet's
    normalisation."""
    root, size = folder_args(request)
    classes = class_names(root / "train")
    return DatasetInfo(len(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
                       tuple(classes))


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and
                  f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (bilinear), centre-cropped: (size, size, 3) uint8.

    Raises:
        DataError: the file is no image PIL reads, or an image too large to decode.
    """
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
    except Image.DecompressionBombError as e:
        # PIL refuses an image of more than 2 * Image.MAX_IMAGE_PIXELS pixels (a small file
        # that would fill the memory when decoded): the file's problem, not a crash
        raise DataError(f"cannot read the image {path}: it is too large to decode "
                        f"({' '.join(str(e).split())[:160]}); remove it or shrink it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read the image {path} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); remove or replace it") from None


def load_folder(request: DataRequest) -> tuple[Examples, Examples]:
    """The train and test (or val) splits of an image folder, labels named by its classes.

    Raises:
        DataError: a missing or empty folder, an unreadable image (with its path), or class
            folders that differ between train and test.
    """
    root, size = folder_args(request)
    classes = class_names(root / "train")
    held = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if held is None:
        raise DataError(f"{root} has train/ but no test/ or val/ folder; add one with the same "
                        "class folders")
    other = class_names(held)
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
        splits.append(Examples(x, torch.tensor(ys, dtype=torch.int64),
                            f"{part} ({len(xs)} images)", tuple(classes)))
    return splits[0], splits[1]
