"""Model registry and architectures. Importing this package registers every architecture."""

from . import preact_resnet, small, wrn  # noqa: F401  (registration side effects)
from .base import FakeReLU, Normalize, RobustModel
from .external import ExternalModel, build_external, default_points, load_factory
from .registry import (
    create_model,
    is_registered,
    is_user_model,
    list_models,
    normalize_name,
    register_model,
)

__all__ = [
    "ExternalModel",
    "FakeReLU",
    "Normalize",
    "RobustModel",
    "build_external",
    "create_model",
    "default_points",
    "is_registered",
    "is_user_model",
    "list_models",
    "load_factory",
    "normalize_name",
    "register_model",
]
