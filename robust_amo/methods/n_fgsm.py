"""N-FGSM training (de Jorge et al. 2022, "Make some noise: reliable and efficient single-step
adversarial training"): cross-entropy at one FGSM step from strong noise, not projected.

docs/methods.md, "Fast adversarial training". The inner maximisation is
:class:`robust_amo.attacks.NFGSM` (x_0 = clip(x + η), η ~ U(−2ε, 2ε), one step of α = ε, clipped
to [0, 1] only, so x' may lie up to 3ε from x); the outer loss is PGD training's
(:func:`robust_amo.methods.pgd.adversarial_ce`), in the model's training mode. ε, the norm (L∞
only), the attack loss and the generator are the training attack's (``cfg.attack``); its
``steps``, ``step_size`` and ``random_start`` are not used. With ``method_args.all_layer`` one
joint step also moves the all-layer perturbations δ (Wei & Ma 2020).

The gradient of the attack is taken in eval mode (the toolkit's one convention for every
attack, :class:`robust_amo.attacks.Attack`), whereas the reference code takes it in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from robust_amo.attacks import NFGSM
from robust_amo.config import AllLayerOptions, finite_non_negative

from .adversarial import AdversarialObjective, Adversary
from .pgd import adversarial_ce
from .registry import MethodContext, Objective, register_method


@dataclass(frozen=True)
class NFGSMOptions:
    """``method_args`` of ``n-fgsm`` (ε, norm and loss are ``cfg.attack``'s).

    Attributes:
        noise_ratio: k, the noise η ~ U(−kε, kε) over ε (default 2, de Jorge et al.
            2022's k = 2, their code's ``--unif 2``; 0: no noise).
        step_ratio: α/ε (default 1: the paper's α = ε, their code's ``--alpha 8`` at
            ε = 8/255).
        all_layer: ρ, η_δ and ``delta_grad`` of all-layer perturbations moved by the same
            backward as x' (Wei & Ma 2020), or None (default: N-FGSM alone).

    Raises:
        ConfigError: a negative or non-finite ratio.
    """

    noise_ratio: float = 2.0
    step_ratio: float = 1.0
    all_layer: AllLayerOptions | None = None

    def __post_init__(self) -> None:
        finite_non_negative("noise_ratio", self.noise_ratio)
        finite_non_negative("step_ratio", self.step_ratio)


@register_method("n-fgsm", options=NFGSMOptions, needs_attack=True)
def build(options: NFGSMOptions, ctx: MethodContext) -> Objective:
    """``n-fgsm``: N-FGSM at ``cfg.attack``'s ε with the training attack's generator.

    Raises:
        ConfigError: ``attack.norm`` is l2 (N-FGSM is an L∞ method).
    """
    assert ctx.attack is not None
    attack = NFGSM.from_threat(ctx.attack.model, ctx.attack.threat, options.noise_ratio,
                               options.step_ratio, ctx.attack.generator)
    return AdversarialObjective(Adversary(attack, options.all_layer), adversarial_ce)
