"""FGSM-RS training (Wong, Rice & Kolter 2020, "Fast is better than free"): cross-entropy at
one FGSM step from a uniform random start.

docs/methods.md, "Fast adversarial training". The inner maximisation is
:class:`robust_amo.attacks.FGSMRS` (x_0 = clip(x + U(−ε, ε)), one step of α = 1.25·ε, projected
onto the ε-ball ∩ [0, 1]^d); the outer loss is PGD training's
(:func:`robust_amo.methods.pgd.adversarial_ce`), in the model's training mode. ε, the norm
(L∞ only), the attack loss and the generator are the training attack's (``cfg.attack``); its
``steps``, ``step_size`` and ``random_start`` are not used. With ``method_args.all_layer`` one
joint step also moves the all-layer perturbations δ (Wei & Ma 2020).

The gradient of the attack is taken in eval mode (the toolkit's one convention for every
attack, :class:`robust_amo.attacks.Attack`: BatchNorm uses its running statistics and the
attack's forward does not update them), whereas the reference code takes it in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from robust_amo.attacks import FGSMRS
from robust_amo.config import AllLayerOptions, finite_non_negative

from .adversarial import AdversarialObjective, Adversary
from .pgd import adversarial_ce
from .registry import MethodContext, Objective, register_method


@dataclass(frozen=True)
class FGSMRSOptions:
    """``method_args`` of ``fgsm-rs`` (ε, norm and loss are ``cfg.attack``'s).

    Attributes:
        step_ratio: α/ε, the FGSM step over the radius (default 1.25: Wong et al. 2020's
            α = 1.25·ε, 10/255 at ε = 8/255 in their CIFAR-10 code; they report that larger
            steps lead to catastrophic overfitting).
        all_layer: ρ, η_δ and ``delta_grad`` of all-layer perturbations moved by the same
            backward as x' (Wei & Ma 2020), or None (default: FGSM-RS alone).

    Raises:
        ConfigError: a negative or non-finite ``step_ratio``.
    """

    step_ratio: float = 1.25
    all_layer: AllLayerOptions | None = None

    def __post_init__(self) -> None:
        finite_non_negative("step_ratio", self.step_ratio)


@register_method("fgsm-rs", options=FGSMRSOptions, needs_attack=True)
def build(options: FGSMRSOptions, ctx: MethodContext) -> Objective:
    """``fgsm-rs``: FGSM-RS at ``cfg.attack``'s ε with the training attack's generator.

    Raises:
        ConfigError: ``attack.norm`` is l2 (FGSM-RS is an L∞ method).
    """
    assert ctx.attack is not None
    attack = FGSMRS.from_threat(ctx.attack.model, ctx.attack.threat, options.step_ratio,
                                ctx.attack.generator)
    return AdversarialObjective(Adversary(attack, options.all_layer), adversarial_ce)
