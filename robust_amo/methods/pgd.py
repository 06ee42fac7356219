"""Madry et al. 2018 PGD training: cross-entropy at the PGD adversarial examples.

docs/algorithms.md, "PGD": the attack runs in eval mode (:class:`robust_amo.attacks.PGD`), the
weight update in the model's training mode.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import AttackFn

from .registry import MethodContext, Objective, register_method


def pgd_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: AttackFn
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Madry PGD training loss: mean cross-entropy at ``attack(x, y)`` (train mode).

    Returns:
        (loss, logits of the adversarial batch).
    """
    x_adv = attack(x, y)
    logits = model(x_adv)
    return F.cross_entropy(logits.float(), y), logits


@register_method("pgd", needs_attack=True)
def build(options: None, ctx: MethodContext) -> Objective:
    """``pgd``: the training attack of ``cfg.attack``, no options."""
    return functools.partial(pgd_loss, attack=ctx.attack)
