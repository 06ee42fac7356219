"""Input-space attacks (``robust_amo.attacks``): PGD, robust AMO's joint attack, TRADES's and
MART's training attacks, the single-step attacks of fast adversarial training (FGSM-RS, N-FGSM),
their pieces.

Every attack is an object whose constructor holds the hyperparameters and whose call
``attack(x, y)`` returns the adversarial input (:class:`Attack`), and every one of them steps with
the same :func:`pgd_iteration`. docs/algorithms.md, "PGD" and "Robust AMO".
"""

from .apgd import APGD, apgd_targets, ce_then_targeted, checkpoints
from .base import Attack, InputAttack
from .core import (
    Iterate,
    attack_loss,
    margin_loss,
    model_loss,
    pgd_iteration,
    pgd_step,
    projected_step,
    random_start,
)
from .fgsm import FGSMRS, NFGSM, SingleStepAttack
from .joint import RobustAMOAttack
from .pgd import PGD, AttackFn
from .radius import l2_attack_at_radius
from .targeted import TargetedPGD, TargetLoss, malt_targets, targeted_loss, top_targets
from .trades import NoisyStartPGD, TRADESAttack, kl_to_clean

__all__ = [
    "APGD",
    "FGSMRS",
    "NFGSM",
    "PGD",
    "Attack",
    "AttackFn",
    "InputAttack",
    "Iterate",
    "NoisyStartPGD",
    "RobustAMOAttack",
    "SingleStepAttack",
    "TRADESAttack",
    "TargetLoss",
    "TargetedPGD",
    "apgd_targets",
    "attack_loss",
    "ce_then_targeted",
    "checkpoints",
    "kl_to_clean",
    "l2_attack_at_radius",
    "malt_targets",
    "margin_loss",
    "model_loss",
    "pgd_iteration",
    "pgd_step",
    "projected_step",
    "random_start",
    "targeted_loss",
    "top_targets",
]
