"""A robustness ``DataSet`` over robust-amo's in-memory datasets and architectures."""

from __future__ import annotations

import torch
from robustness.datasets import DataSet

from robust_amo.data import Loader, dataset_info, load_dataset, normalize_dataset_name
from robust_amo.models import RobustModel
from robust_amo.runtime import resolve_device

from .architectures import architecture


class RobustAmoDataSet(DataSet):
    """A robustness ``DataSet`` over robust-amo's in-memory datasets and architectures.

    ``get_model(name)`` builds our registered architectures, so that
    ``make_and_restore_model(arch="tiny-cnn", dataset=ds)`` works with a name, and
    ``make_loaders`` returns robust-amo's device-resident :class:`~robust_amo.data.Loader` s.
    """

    def __init__(self, name: str, data_path: str | None = None,
                 device: torch.device | str | None = None) -> None:
        name = normalize_dataset_name(name)
        info = dataset_info(name)
        super().__init__(name, data_path, num_classes=info.num_classes,
                         mean=torch.tensor(info.mean), std=torch.tensor(info.std),
                         transform_train=None, transform_test=None)
        self.input_shape = info.input_shape
        self.device = torch.device(device) if device is not None else resolve_device("auto")

    def get_model(self, arch: str, pretrained: bool) -> RobustModel:  # noqa: D102
        if pretrained:
            raise ValueError("robust-amo architectures have no pretrained weights")
        return architecture(arch, self)

    def make_loaders(self, workers: int, batch_size: int, data_aug: bool = True,
                     subset: int | None = None, val_batch_size: int | None = None,
                     only_val: bool = False, shuffle_train: bool = True,
                     shuffle_val: bool = False, seed: int = 0,
                     val_subset: int | None = None) -> tuple[Loader | None, Loader]:
        """``(train_loader, val_loader)`` on ``self.device``, as robustness's ``make_loaders``.

        ``workers`` is not used (the data is in memory); ``subset``/``val_subset`` keep the first
        examples of the training/test split; ``data_aug`` is robust-amo's crop and flip.
        """
        train, test = load_dataset(self.ds_name, self.data_path)
        if subset is not None:
            train = train.subset(torch.arange(min(subset, len(train))))
        if val_subset is not None:
            test = test.subset(torch.arange(min(val_subset, len(test))))
        val = Loader(test, val_batch_size or batch_size, self.device, shuffle=shuffle_val,
                     seed=seed)
        if only_val:
            return None, val
        return Loader(train, batch_size, self.device, shuffle=shuffle_train, augment=data_aug,
                      seed=seed, drop_last=len(train) > batch_size), val


def robustness_dataset(name: str, data_path: str | None = None,
                       device: torch.device | str | None = None) -> RobustAmoDataSet:
    """A robustness dataset for a robust-amo dataset name (``digits``, ``mnist``, ``cifar10``...).

    Args:
        name: robust-amo dataset name (``robust_amo.data.dataset_names()``).
        data_path: folder with the data (not needed for ``digits``).
        device: where its loaders put batches (default CUDA when available).
    """
    return RobustAmoDataSet(name, data_path, device)
