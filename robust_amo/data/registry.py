"""The dataset registry: one registered function per dataset, looked up by name.

:func:`register_dataset` records a loading function with its names and its
:class:`DatasetInfo`; :func:`normalize_dataset_name`, :func:`dataset_info` and
:func:`load_dataset` find everything through it, so a new dataset needs no edit here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .splits import Examples


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: classes, shape and the normalisation used inside models;
    ``classes`` names the labels 0, 1, ... where they are known."""

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DataRequest:
    """What :func:`load_dataset` was asked for, handed to the dataset's registered function.

    Attributes:
        name: the registered name.
        info: the registered facts, or None where they come from the files (image folders).
        data_dir: the folder or file given (``~`` expanded), or None.
        download: whether torchvision may download into ``data_dir``.
        image_size: the side images are resized to, where the dataset takes one.
    """

    name: str
    info: DatasetInfo | None
    data_dir: Path | None
    download: bool = False
    image_size: int | None = None


LoadFn = Callable[[DataRequest], tuple[Examples, Examples]]
"""A registered dataset: the request -> its ``(train, test)`` splits."""

InfoFn = Callable[[DataRequest], DatasetInfo]
"""The facts of a dataset that only its files know (classes and size of an image folder)."""

InfoSpec = DatasetInfo | InfoFn


@dataclass(frozen=True)
class _Entry:
    name: str
    aliases: tuple[str, ...]
    info: InfoSpec
    load: LoadFn


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    """``CIFAR_10 `` -> ``cifar-10``: the spelling names and aliases are compared in."""
    return name.strip().lower().replace("_", "-")


def register_dataset(
    name: str, *, info: InfoSpec, aliases: tuple[str, ...] = (),
) -> Callable[[LoadFn], LoadFn]:
    """Register the decorated function as the loader of dataset ``name``.

    Args:
        name: the canonical name (lower case, ``-`` between words), as configs spell it.
        info: the dataset's :class:`DatasetInfo`, or a function of the :class:`DataRequest`
            for datasets whose classes or size come from their files.
        aliases: other spellings accepted for ``name`` (compared case-insensitively, ``_`` as
            ``-``).

    Returns:
        A decorator that registers a ``(DataRequest) -> (train, test)`` function and returns it
        unchanged.

    Raises:
        ValueError: ``name`` or an alias is taken already (a programming error, not the user's).
    """
    canonical = _key(name)
    spellings = (canonical, *(_key(a) for a in aliases))

    def decorate(fn: LoadFn) -> LoadFn:
        taken = [s for s in spellings if s in _REGISTRY or s in _ALIASES]
        if taken:
            raise ValueError(f"dataset name(s) {taken} are registered already")
        _REGISTRY[canonical] = _Entry(canonical, spellings[1:], info, fn)
        _ALIASES.update({a: canonical for a in spellings[1:]})
        return fn

    return decorate


def unregister_dataset(name: str) -> None:
    """Remove dataset ``name`` and its aliases from the registry (tests, plugins).

    Raises:
        DataError: ``name`` is not registered.
    """
    entry = _REGISTRY.pop(normalize_dataset_name(name))
    for a in entry.aliases:
        _ALIASES.pop(a, None)


def dataset_names() -> tuple[str, ...]:
    """The registered datasets' canonical names, in registration order."""
    return tuple(_REGISTRY)


def normalize_dataset_name(name: str) -> str:
    """``CIFAR-10``/``cifar_10`` -> ``cifar10``; ``FashionMNIST`` -> ``fashion-mnist``.

    Raises:
        DataError: no registered dataset has this name, listing those that are.
    """
    n = _key(name)
    n = _ALIASES.get(n, n)
    if n not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(_REGISTRY)}")
    return n


def _request(name: str, data_dir: str | Path | None, download: bool,
             image_size: int | None) -> tuple[_Entry, DataRequest]:
    entry = _REGISTRY[normalize_dataset_name(name)]
    info = entry.info if isinstance(entry.info, DatasetInfo) else None
    root = None if data_dir is None else Path(data_dir).expanduser()
    return entry, DataRequest(entry.name, info, root, download, image_size)


def fixed_info(name: str) -> DatasetInfo | None:
    """The registered :class:`DatasetInfo` of ``name``, or None for a dataset whose facts come
    from its files (``imagefolder``): only those take an ``image_size``.

    Raises:
        DataError: the name is unknown.
    """
    info = _REGISTRY[normalize_dataset_name(name)].info
    return info if isinstance(info, DatasetInfo) else None


def dataset_info(name: str, data_dir: str | Path | None = None,
                 image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``imagefolder`` reads its classes from
    ``data_dir/train`` and needs ``image_size``.

    Raises:
        DataError: the name is unknown, or the facts need files that are not there.
    """
    entry, request = _request(name, data_dir, False, image_size)
    return request.info if request.info is not None else entry.info(request)


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False,
    image_size: int | None = None,
) -> tuple[Examples, Examples]:
    """Load the train and test splits of ``name`` as uint8 tensors.

    Args:
        name: a registered dataset (:func:`dataset_names`): ``cifar10``, ``cifar100``,
            ``svhn``, ``mnist``, ``fashion-mnist``, ``digits``, ``imagefolder``, or an alias.
        data_dir: folder holding an .npz file or torchvision's layout, or the .npz file itself;
            for ``imagefolder`` the folder with ``train/`` and ``test/`` (or ``val/``).
        download: let torchvision download into ``data_dir`` (never done otherwise).
        image_size: side of the square images of ``imagefolder`` (required there).

    Returns:
        ``(train, test)`` splits; the test split may be empty (see ``require_examples``).
        Datasets registered with a :class:`DatasetInfo` name their labels with its
        ``classes``.

    Raises:
        DataError: saying where it looked and how to get the data, or what is wrong with the
            file: missing arrays, images of another shape or dtype (for MNIST (N, 28, 28),
            (N, 28, 28, 1) or (N, 1, 28, 28)), labels that are not integers in
            ``0..num_classes-1`` (naming the split and the value), splits whose image shapes
            differ, an empty train split.
    """
    entry, request = _request(name, data_dir, download, image_size)
    train, test = entry.load(request)
    if request.info is None:
        return train, test
    classes = request.info.classes
    return (dataclasses.replace(train, classes=classes),
            dataclasses.replace(test, classes=classes))
