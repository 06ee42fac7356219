"""Datasets held in memory as uint8 tensors, batched and augmented on the training device.

Sources, tried in this order for ``load_dataset(name, data_dir)``:

1. ``.npz`` files in ``data_dir`` (or ``data_dir`` itself is the file) with keys ``x_train``,
   ``y_train``, ``x_test``, ``y_test`` (uint8, HWC or HW), or the JPEG-bytes layout of the
   offline CIFAR-10 copy (``train_jpeg``/``train_offsets``/...); file names are listed in
   ``NPZ_NAMES``.
2. torchvision's layout under ``data_dir`` (``cifar-10-batches-py``, ``MNIST/raw``, ...); with
   ``download=True`` torchvision fetches it there.
3. ``digits`` needs no file: scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to
   0..255), split 1500 train / 297 test with a fixed permutation.

Keeping the whole uint8 set on the device and doing crop/flip there keeps the data pipeline off
the critical path of adversarial training (10+ forward/backward passes per batch).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .runtime import derive_seed, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: classes, shape and the normalisation used inside models."""

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo(10, (1, 28, 28), (0.2860,), (0.3530,)),
    "digits": DatasetInfo(10, (1, 8, 8), (0.3055,), (0.3759,)),
}

NPZ_NAMES: dict[str, list[str]] = {
    "cifar10": ["cifar10.npz", "cifar10_jpegq75_jpegbytes.npz"],
    "cifar100": ["cifar100.npz"],
    "mnist": ["mnist.npz"],
    "fashion-mnist": ["fashion_mnist.npz", "fashion-mnist.npz"],
}


def normalize_dataset_name(name: str) -> str:
    """``CIFAR-10``/``cifar_10`` -> ``cifar10``; ``FashionMNIST`` -> ``fashion-mnist``."""
    n = name.strip().lower().replace("_", "-")
    aliases = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
               "fmnist": "fashion-mnist"}
    n = aliases.get(n, n)
    if n not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return n


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``."""
    return DATASETS[normalize_dataset_name(name)]


@dataclass
class Split:
    """uint8 images (N, C, H, W) and int64 labels (N,), on the CPU."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> Split:
        """The examples at ``idx``."""
        return Split(self.x[idx], self.y[idx])


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8:
        raise DataError(f"expected uint8 images, got {t.dtype}")
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous()


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image  # only the JPEG copy of CIFAR-10 needs it

    b = buf.tobytes()
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(b[offsets[i]:offsets[i + 1]])).convert("RGB"))
         for i in range(len(offsets) - 1)]
    )


def _load_npz(path: Path) -> tuple[Split, Split]:
    try:
        d = np.load(path)
        if "train_jpeg" in d.files:
            log.info("decoding JPEG bytes from %s", path)
            xtr = _decode_jpegs(d["train_jpeg"], d["train_offsets"])
            xte = _decode_jpegs(d["test_jpeg"], d["test_offsets"])
        else:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                raise DataError(
                    f"{path} lacks the keys {sorted(missing)}; an .npz dataset needs x_train, "
                    "y_train, x_test, y_test (uint8 images HWC or HW, integer labels)"
                )
            xtr, xte = d["x_train"], d["x_test"]
        for part, xs in (("train", xtr), ("test", xte)):
            if len(xs) != len(d[f"y_{part}"]):
                raise DataError(f"{path}: {len(xs)} {part} images but {len(d[f'y_{part}'])} "
                                f"labels in y_{part}; the file is inconsistent")
        return (
            Split(_to_nchw(xtr), torch.from_numpy(d["y_train"].astype(np.int64))),
            Split(_to_nchw(xte), torch.from_numpy(d["y_test"].astype(np.int64))),
        )
    except DataError:
        raise  # already says what is wrong (DataError is an OSError: keep it unwrapped)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"could not read {path}: {e}; is the file complete?") from e


def _load_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits  # slow to import; only `digits` needs it

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return (
        Split(_to_nchw(x[:1500]), torch.from_numpy(y[:1500])),
        Split(_to_nchw(x[1500:]), torch.from_numpy(y[1500:])),
    )


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision.datasets as tvd  # slow to import; only its folder layout needs it

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion-mnist": tvd.FashionMNIST}[name]
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(Split(_to_nchw(np.asarray(x)), y))
    return splits[0], splits[1]


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False
) -> tuple[Split, Split]:
    """Load the train and test splits of ``name`` as uint8 tensors.

    Args:
        name: ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist`` or ``digits``.
        data_dir: folder holding an .npz file or torchvision's layout, or the .npz file itself.
        download: let torchvision download into ``data_dir`` (never done otherwise).

    Returns:
        ``(train, test)`` splits.

    Raises:
        DataError: saying where it looked and how to get the data.
    """
    name = normalize_dataset_name(name)
    if name == "digits":
        return _load_digits()
    info = DATASETS[name]
    if data_dir is None:
        raise DataError(
            f"dataset {name!r} needs --data-dir: a folder with {' or '.join(NPZ_NAMES[name])} "
            "(keys x_train, y_train, x_test, y_test) or torchvision's layout; add --download to "
            "let torchvision fetch it there"
        )
    root = Path(data_dir).expanduser()
    looked: list[str] = []
    if root.is_file():
        train, test = _load_npz(root)
    else:
        for fname in NPZ_NAMES[name]:
            looked.append(str(root / fname))
            if (root / fname).is_file():
                train, test = _load_npz(root / fname)
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
    if tuple(train.x.shape[1:]) != info.input_shape:
        raise DataError(
            f"{name} images in {root} have shape {tuple(train.x.shape[1:])}, expected "
            f"{info.input_shape} (C, H, W)"
        )
    return train, test


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
    if size <= 0:
        return split, Split(split.x[:0], split.y[:0])
    if size >= len(split):
        raise DataError(f"val_size {size} leaves no training data ({len(split)} examples)")
    g = torch.Generator().manual_seed(derive_seed(seed, "hold-out"))
    perm = torch.randperm(len(split), generator=g)
    return split.subset(perm[size:]), split.subset(perm[:size])


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
