"""robust-amo: all-layer margin optimisation and Jacobian large-margin training for PyTorch.

``robust_amo.evaluate(model, dataset=..., eps=...)`` evaluates any classifier in one call
(docs/evaluation.md). Importing this package is cheap: it never imports MadryLab's
``robustness`` (only :mod:`robust_amo.integrations.robustness` does). The layers and where
each algorithm lives: docs/architecture.md.
"""

from .errors import CheckpointError, ConfigError, DataError, RobustAmoError, UnknownModelError
from .evaluation import Report, evaluate
from .models import RobustModel, create_model, list_models, register_model
from .version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Report",
    "RobustAmoError",
    "RobustModel",
    "UnknownModelError",
    "__version__",
    "create_model",
    "evaluate",
    "list_models",
    "register_model",
]
