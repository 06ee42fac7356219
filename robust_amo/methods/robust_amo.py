"""Robust AMO (Wei & Ma 2020, Sections 4–5 and F.2): train at the joint x'/δ adversary.

docs/algorithms.md, "Robust AMO": :class:`robust_amo.attacks.RobustAMOAttack` moves the input x'
by PGD and the all-layer perturbations δ by δ ← ρ·δ + η_δ·∇_δ ℓ, both from ONE forward and ONE
backward per step; the weights are trained on ℓ(F(x', δ), y) with x' and δ detached. With
η_δ = 0 it is exactly Madry PGD training.

``robust-amo`` is the name of ``pgd`` with ``method_args.all_layer`` set to its options: the two
configs train bit for bit the same run.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_amo.attacks import RobustAMOAttack
from robust_amo.config import AllLayerOptions

from .adversarial import AdversarialPoint
from .pgd import PGDOptions, adversarial_ce
from .pgd import build as build_pgd
from .registry import MethodContext, Objective, register_method

RobustAMOOptions = AllLayerOptions
"""``method_args`` of ``robust-amo`` (docs/algorithms.md "Robust AMO"; PGD is ``attack:``):
ρ, η_δ and ``delta_grad``, validated by :class:`robust_amo.config.AllLayerOptions` (the config
loader names them ``method_args.rho``, ...)."""


def robust_amo_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: RobustAMOAttack
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust AMO training loss: mean cross-entropy of F(x', δ) from ``attack(x, y)``.

    The forward runs in the model's current mode (train, in the trainer) with x' and δ detached,
    so the backward reaches the weights only.

    Returns:
        (scalar loss, logits (B, C) of the perturbed adversarial batch).
    """
    x_adv, deltas = attack(x, y)
    return adversarial_ce(model, x, AdversarialPoint(x_adv, deltas, attack.saves_output()), y)


@register_method("robust-amo", options=RobustAMOOptions, needs_attack=True)
def build(options: RobustAMOOptions, ctx: MethodContext) -> Objective:
    """``robust-amo``: ``pgd`` with ``all_layer`` = these options."""
    return build_pgd(PGDOptions(all_layer=options), ctx)
