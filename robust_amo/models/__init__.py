"""Model registry and architectures. Importing this package registers every architecture."""

from . import preact_resnet, small, wrn  # noqa: F401  (registration side effects)
from .base import FakeReLU, Normalize, RobustModel
from .registry import create_model, is_registered, list_models, normalize_name, register_model

__all__ = [
    "FakeReLU",
    "Normalize",
    "RobustModel",
    "create_model",
    "is_registered",
    "list_models",
    "normalize_name",
    "register_model",
]
