"""The dataset registry: one registered function makes a dataset loadable by name."""

from __future__ import annotations

import pytest
import torch

from robust_amo import DataError
from robust_amo.data import (
    DataRequest,
    DatasetInfo,
    Examples,
    dataset_info,
    dataset_names,
    load_dataset,
    normalize_dataset_name,
    register_dataset,
    unregister_dataset,
)

BUILT_IN = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "digits", "imagefolder")


def test_the_built_in_datasets_and_their_spellings():
    assert dataset_names() == BUILT_IN
    spellings = {"CIFAR-10": "cifar10", "cifar_10": "cifar10", " Cifar-100 ": "cifar100",
                 "FashionMNIST": "fashion-mnist", "fmnist": "fashion-mnist",
                 "fashion_mnist": "fashion-mnist", "Image-Folder": "imagefolder", "SVHN": "svhn"}
    for given, name in spellings.items():
        assert normalize_dataset_name(given) == name
    with pytest.raises(DataError) as e:
        normalize_dataset_name("imagenet")
    assert str(e.value) == ("unknown dataset 'imagenet'; known datasets: cifar10, cifar100, "
                            "svhn, mnist, fashion-mnist, digits, imagefolder")


def test_one_registered_function_adds_a_dataset(tmp_path):
    info = DatasetInfo(3, (1, 4, 4), (0.5,), (0.25,), ("a", "b", "c"))
    seen: list[DataRequest] = []

    @register_dataset("toy-blobs", aliases=("blobs",), info=info)
    def toy(request: DataRequest) -> tuple[Examples, Examples]:
        seen.append(request)
        x = torch.arange(6 * 16, dtype=torch.uint8).view(6, 1, 4, 4)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        return Examples(x[:4], y[:4], "toy, train split"), Examples(x[4:], y[4:], "toy, test split")

    try:
        assert dataset_names() == (*BUILT_IN, "toy-blobs")
        assert normalize_dataset_name("TOY_BLOBS") == "toy-blobs"
        assert dataset_info("Blobs") is info
        train, test = load_dataset("toy_blobs", tmp_path, download=True, image_size=7)
        assert len(train) == 4 and len(test) == 2 and torch.equal(test.y, torch.tensor([1, 2]))
        assert train.classes == test.classes == ("a", "b", "c")  # named by the info
        assert seen == [DataRequest("toy-blobs", info, tmp_path, True, 7)]
        with pytest.raises(ValueError, match="registered already"):
            register_dataset("blobs", info=info)(toy)
        with pytest.raises(ValueError, match="registered already"):
            register_dataset("mnist-2", aliases=("mnist",), info=info)(toy)
    finally:
        unregister_dataset("toy-blobs")
    assert dataset_names() == BUILT_IN
    for name in ("toy-blobs", "blobs"):
        with pytest.raises(DataError, match="known datasets: cifar10, .*imagefolder$"):
            load_dataset(name)
        with pytest.raises(DataError, match="unknown dataset"):
            dataset_info(name)


def test_facts_read_from_the_files_come_from_the_info_function(tmp_path):
    def info_of(request: DataRequest) -> DatasetInfo:
        side = request.image_size or 2
        return DatasetInfo(2, (1, side, side), (0.0,), (1.0,), ("x", "y"))

    @register_dataset("toy-sized", info=info_of)
    def toy(request: DataRequest) -> tuple[Examples, Examples]:
        assert request.info is None  # no static facts: the function's splits name the labels
        side = request.image_size
        x = torch.zeros(2, 1, side, side, dtype=torch.uint8)
        s = Examples(x, torch.tensor([0, 1]), "toy", ("x", "y"))
        return s, s

    try:
        assert dataset_info("toy-sized", tmp_path, image_size=5).input_shape == (1, 5, 5)
        train, _ = load_dataset("toy-sized", tmp_path, image_size=3)
        assert train.x.shape == (2, 1, 3, 3) and train.classes == ("x", "y")
    finally:
        unregister_dataset("toy-sized")
    assert "toy-sized" not in dataset_names()
