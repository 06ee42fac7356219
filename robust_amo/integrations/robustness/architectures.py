"""Our registered architectures inside robustness's ``AttackerModel`` (identity normalisation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from robustness.datasets import DataSet
from torch import nn

from robust_amo.models import RobustModel, create_model

# robustness's datasets do not record their image size
_INPUT_SHAPES = {
    "cifar": (3, 32, 32), "cinic": (3, 32, 32), "imagenet": (3, 224, 224),
    "restricted_imagenet": (3, 224, 224), "custom_imagenet": (3, 224, 224),
    "places365": (3, 224, 224), "openimages": (3, 224, 224),
}


def is_identity_normalization(model: nn.Module) -> bool:
    norm = getattr(model, "normalize", None)
    if norm is None:
        return True
    return bool((norm.mean == 0).all() and (norm.std == 1).all())


def check_model(model: nn.Module) -> None:
    if not isinstance(model, RobustModel):
        raise TypeError(
            f"robust AMO needs a registered robust-amo architecture (a RobustModel declaring its "
            f"perturbation points), got {type(model).__name__}; build one with "
            "robust_amo.integrations.robustness.architecture(name, dataset)"
        )
    if not is_identity_normalization(model):
        raise ValueError(
            "the model normalises its inputs itself, and robustness's AttackerModel normalises "
            "them again; create it with mean=None, std=None (architecture() does)"
        )


def architecture(
    arch: str,
    dataset: DataSet,
    *,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> RobustModel:
    """A registered architecture sized for a robustness dataset, with identity normalisation.

    robustness's ``AttackerModel`` normalises inputs with ``dataset.mean``/``dataset.std`` before
    the classifier, so the model itself must not (it is created with ``mean=None, std=None``).

    Args:
        arch: registry name, e.g. ``"wrn28-10"`` (``robust-amo archs`` lists them).
        dataset: a robustness ``DataSet`` (gives ``num_classes``).
        input_shape: (C, H, W); default: the dataset's (CIFAR/CINIC 3x32x32, ImageNet-like
            3x224x224, or ``dataset.input_shape`` from :func:`robustness_dataset`).
        **kwargs: architecture options (e.g. ``dropout``).

    Returns:
        the model, ready for ``make_and_restore_model(arch=model, dataset=dataset)``.
    """
    shape = input_shape or getattr(dataset, "input_shape", None) or _INPUT_SHAPES.get(
        getattr(dataset, "ds_name", ""))
    if shape is None:
        raise ValueError(
            f"robustness dataset {getattr(dataset, 'ds_name', dataset)!r} does not say its image "
            "size; pass input_shape=(C, H, W)"
        )
    return create_model(arch, dataset.num_classes, input_shape=shape, mean=None, std=None,
                        **kwargs)
