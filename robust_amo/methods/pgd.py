"""Madry et al. 2018 PGD training: cross-entropy at the PGD adversarial examples.

docs/algorithms.md, "PGD": the attack runs in eval mode (:class:`robust_amo.attacks.PGD`), the
weight update in the model's training mode. With ``method_args.all_layer`` the attack also moves
the all-layer perturbations δ (Wei & Ma 2020) and the loss is taken at (x', δ): that is robust
AMO, bit for bit the ``robust-amo`` method (docs/algorithms.md, "Robust AMO").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import AttackFn
from robust_amo.config import AllLayerOptions
from robust_amo.runtime import wide

from .adversarial import AdversarialObjective, AdversarialPoint, Adversary
from .registry import MethodContext, Objective, register_method


@dataclass(frozen=True)
class PGDOptions:
    """``method_args`` of ``pgd`` (the attack itself is ``cfg.attack``).

    Attributes:
        all_layer: ρ, η_δ and ``delta_grad`` of all-layer perturbations moved by the same
            backward as x' (Wei & Ma 2020, Sections 4–5), or None (default: Madry PGD).
    """

    all_layer: AllLayerOptions | None = None


def pgd_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: AttackFn
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Madry PGD training loss: mean cross-entropy at ``attack(x, y)`` (train mode).

    Returns:
        (loss, logits of the adversarial batch).
    """
    return adversarial_ce(model, x, AdversarialPoint(attack(x, y)), y)


def adversarial_ce(model: nn.Module, x: torch.Tensor, point: AdversarialPoint, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer loss of PGD training: mean cross-entropy of F(x', δ) (F(x') without δ) in the
    model's current mode; float32 or wider even under bf16 autocast.

    Returns:
        (scalar loss, logits (B, C) at the point).
    """
    logits = point.logits(model)
    return F.cross_entropy(wide(logits), y), logits


@register_method("pgd", options=PGDOptions, needs_attack=True)
def build(options: PGDOptions, ctx: MethodContext) -> Objective:
    """``pgd``: the training attack of ``cfg.attack``; ``all_layer`` adds δ (robust AMO)."""
    assert ctx.attack is not None
    return AdversarialObjective(Adversary(ctx.attack, options.all_layer), adversarial_ce)
