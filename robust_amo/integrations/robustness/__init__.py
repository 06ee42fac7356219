"""robust-amo inside MadryLab's ``robustness`` (1.2.1.post2): the only package that imports it.

What it offers (docs/robustness_plugin.md):

- our registered architectures for ``make_and_restore_model`` (:func:`architecture`,
  :func:`robustness_dataset`, :func:`make_model`);
- robust AMO (Wei & Ma 2020; docs/algorithms.md, "Robust AMO") inside
  ``robustness.train.train_model`` through :class:`RobustAMOAttackerModel`;
- the Jacobian large-margin penalty (Sokolić et al. 2017 eq. 26) as ``args.regularizer``
  (:class:`JacobianLMRegularizer`);
- checkpoints both ways (:mod:`robust_amo.checkpoint.robustness_layout`, re-exported here).

Import this package before any ``robustness.datasets``/``robustness.train`` import: its first
import, :mod:`._shim`, registers the ``torchvision.models.utils`` alias robustness needs with
current torchvision. robustness hard-codes ``.cuda()`` in its training loop and attacker, so
``train_model`` needs a CUDA device; the pieces here work on any device.
"""

from robust_amo.checkpoint import (
    convert_checkpoint,
    from_robustness,
    read_checkpoint,
    to_robustness,
)

from ._shim import SHIM_INSTALLED, SHIM_MODULE  # first: robustness imports what it provides
from .architectures import architecture
from .attacker import RobustAMOAttackerModel, attack_args
from .checkpoints import make_model
from .datasets import RobustAmoDataSet, robustness_dataset
from .regularizer import JacobianLMRegularizer

__all__ = [
    "SHIM_INSTALLED",
    "SHIM_MODULE",
    "JacobianLMRegularizer",
    "RobustAMOAttackerModel",
    "RobustAmoDataSet",
    "architecture",
    "attack_args",
    "convert_checkpoint",
    "from_robustness",
    "make_model",
    "read_checkpoint",
    "robustness_dataset",
    "to_robustness",
]
