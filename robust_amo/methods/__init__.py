"""Training methods: one file each, with its options dataclass, its loss and its builder.

- ``standard`` (:mod:`.standard`): cross-entropy on clean inputs.
- ``pgd`` (:mod:`.pgd`): Madry et al. 2018, cross-entropy at PGD adversarial examples
  (``all_layer``: with Wei & Ma's all-layer perturbations, robust AMO).
- ``robust-amo`` (:mod:`.robust_amo`): Wei & Ma 2020, the joint x'/δ adversary.
- ``trades`` (:mod:`.trades`): Zhang et al. 2019, CE + β·KL(f(x) ‖ f(x')).
- ``mart`` (:mod:`.mart`): Wang et al. 2020, boosted CE + λ·KL weighted by 1 − p_y(x).
- ``amo`` (:mod:`.amo`): Wei & Ma 2020 Algorithm 1, clean AMO.
- ``jacobian-lm`` (:mod:`.jacobian_lm`): Sokolić et al. 2017, the Jacobian large-margin term.
- ``fgsm-rs`` (:mod:`.fgsm_rs`): Wong et al. 2020, one FGSM step from a random start.
- ``n-fgsm`` (:mod:`.n_fgsm`): de Jorge et al. 2022, one FGSM step from 2ε noise, unprojected.
- ``awp`` (:mod:`.awp`): Wu et al. 2020, adversarial weight perturbation on ``pgd`` or ``trades``.

Each registers itself with :func:`register_method` (:mod:`.registry`) when imported here; the
trainer only calls :func:`build_objective`. docs/architecture.md says how to add one.
"""

from . import (
    adversarial,
    amo,
    awp,
    fgsm_rs,
    jacobian_lm,
    mart,
    n_fgsm,
    pgd,
    robust_amo,
    standard,
    trades,
)
from .adversarial import (
    AdversarialLoss,
    AdversarialObjective,
    AdversarialPoint,
    Adversary,
    EpochAware,
)
from .amo import AMOOptions, amo_loss
from .awp import (
    AWPObjective,
    AWPOptions,
    WeightPerturbation,
    at_weights,
    awp_parameters,
    weight_perturbation,
)
from .fgsm_rs import FGSMRSOptions
from .jacobian_lm import JacobianLMOptions, jacobian_lm_loss, jacobian_penalty, multiclass_hinge
from .mart import MARTOptions, mart_loss
from .n_fgsm import NFGSMOptions
from .pgd import PGDOptions, adversarial_ce, pgd_loss
from .registry import (
    METHODS,
    MethodContext,
    MethodSpec,
    Objective,
    build_objective,
    method_options,
    method_spec,
    register_method,
)
from .robust_amo import RobustAMOOptions, robust_amo_loss
from .standard import standard_loss
from .trades import TRADESOptions, trades_loss

__all__ = [
    "METHODS",
    "AMOOptions",
    "AWPObjective",
    "AWPOptions",
    "AdversarialLoss",
    "AdversarialObjective",
    "AdversarialPoint",
    "Adversary",
    "EpochAware",
    "FGSMRSOptions",
    "NFGSMOptions",
    "PGDOptions",
    "adversarial",
    "adversarial_ce",
    "JacobianLMOptions",
    "MARTOptions",
    "MethodContext",
    "MethodSpec",
    "Objective",
    "RobustAMOOptions",
    "TRADESOptions",
    "amo",
    "amo_loss",
    "at_weights",
    "awp",
    "awp_parameters",
    "build_objective",
    "fgsm_rs",
    "jacobian_lm",
    "jacobian_lm_loss",
    "jacobian_penalty",
    "mart",
    "mart_loss",
    "method_options",
    "method_spec",
    "multiclass_hinge",
    "n_fgsm",
    "pgd",
    "pgd_loss",
    "register_method",
    "robust_amo",
    "robust_amo_loss",
    "standard",
    "standard_loss",
    "trades",
    "trades_loss",
    "weight_perturbation",
    "WeightPerturbation",
]
