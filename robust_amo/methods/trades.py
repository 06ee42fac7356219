"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy", Eq. 5 and Algorithm 1): CE(f(x), y) + β·KL(f(x) ‖ f(x')).

x' maximises KL(f(x) ‖ f(x')) by PGD from x + 0.001·N(0, I) with the threat model's eps, step
size and steps (:class:`robust_amo.attacks.TRADESAttack`; the paper's CIFAR-10 setting is eps
0.031, step 0.007, 10 steps, β = 6). As in the reference code the attack runs in eval mode (no
BatchNorm statistics of adversarial batches while searching) and the loss in train mode, where
both the clean and the adversarial forward carry gradient; the robust term is averaged over the
batch. With ``all_layer`` the all-layer perturbations δ move with x' on the same KL and the
adversarial branch is F(x', δ); the clean branch is never perturbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import TRADESAttack, kl_to_clean
from robust_amo.config import AllLayerOptions, finite_non_negative
from robust_amo.runtime import wide

from .adversarial import AdversarialObjective, AdversarialPoint, Adversary
from .registry import MethodContext, Objective, register_method


@dataclass(frozen=True)
class KLTermOptions:
    """``method_args`` of the methods with a KL term and a noisy-start attack (TRADES, MART).

    Attributes:
        beta: the weight of the KL term (default 6: TRADES's β, MART's λ).
        start_std: σ of the attack's start x + σ·N(0, I) (default 0.001, both references).
        all_layer: ρ, η_δ and ``delta_grad`` of all-layer perturbations on the adversarial
            branch (Wei & Ma 2020), or None (default: none).
    """

    beta: float = 6.0
    start_std: float = 1e-3
    all_layer: AllLayerOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", finite_non_negative("beta", self.beta))
        object.__setattr__(self, "start_std", finite_non_negative("start_std", self.start_std))


@dataclass(frozen=True)
class TRADESOptions(KLTermOptions):
    """``method_args`` of ``trades``: ``beta`` is β (default 6, the paper's CIFAR-10 and the
    reference's default; 1/λ in the paper's notation); ``start_std`` and ``all_layer`` as in
    :class:`KLTermOptions`."""


def trades_loss(model: nn.Module, x: torch.Tensor, point: AdversarialPoint, y: torch.Tensor,
                *, beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(f(x), y) + β·mean_i KL(f(x_i) ‖ f(x'_i)), in the model's current mode.

    Args:
        model: the network (train mode in the trainer).
        x: clean inputs (B, ...); point: x' (and δ for the adversarial branch); y: labels (B,).
        beta: β (default 6).

    Returns:
        (scalar loss in float32 or wider, logits (B, C) at the adversarial point).
    """
    clean = model(x)
    adv = point.logits(model)
    loss = F.cross_entropy(wide(clean), y) + beta * kl_to_clean(clean, adv).mean()
    return loss, adv


def trades_adversary(options: TRADESOptions, ctx: MethodContext) -> Adversary:
    """TRADES's inner maximisation on the training attack's model, threat model and generator
    (with all-layer δ when ``options.all_layer`` is set)."""
    assert ctx.attack is not None
    attack = TRADESAttack(ctx.attack.model, ctx.attack.threat, ctx.attack.generator,
                          options.start_std)
    return Adversary(attack, options.all_layer)


@register_method("trades", options=TRADESOptions, needs_attack=True)
def build(options: TRADESOptions, ctx: MethodContext) -> Objective:
    """``trades``: the KL attack of ``cfg.attack``'s eps, step size and steps, then the loss."""
    def loss(model: nn.Module, x: torch.Tensor, point: AdversarialPoint, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return trades_loss(model, x, point, y, beta=options.beta)

    return AdversarialObjective(trades_adversary(options, ctx), loss)
