"""robust-amo: all-layer margin optimisation and Jacobian large-margin training for PyTorch.

Importing this package is cheap: it never imports MadryLab's ``robustness`` (only
:mod:`robust_amo.robustness_plugin` does).
"""

from .errors import CheckpointError, ConfigError, DataError, RobustAmoError, UnknownModelError
from .models import RobustModel, create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "RobustAmoError",
    "RobustModel",
    "UnknownModelError",
    "__version__",
    "create_model",
    "list_models",
    "register_model",
]
