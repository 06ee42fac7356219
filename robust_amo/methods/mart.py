"""MART (Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", Eq. 8 and its reference code): boosted CE at x' + λ·KL(p(x) ‖ p(x'))·(1 − p_y(x)).

x' maximises the cross-entropy by PGD from x + 0.001·N(0, I) (the reference's start;
:class:`robust_amo.attacks.NoisyStartPGD`) with the threat model's eps, step size and steps, in
eval mode; the loss runs in train mode. The boosted CE is
−log p_y(x') − log(1 − max_{k≠y} p_k(x')), and the KL term of each example is weighted by
1 − p_y(x), the clean prediction's confidence in the wrong classes (gradient flows through it, as in
the reference). The reference's numerical guards are kept: log(1.0001 − p + 1e-12),
log(p(x') + 1e-12) inside the KL, and 1.0000001 − p_y(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import NoisyStartPGD
from robust_amo.runtime import wide

from .adversarial import AdversarialObjective, AdversarialPoint, Adversary
from .registry import MethodContext, Objective, register_method
from .trades import KLTermOptions


@dataclass(frozen=True)
class MARTOptions(KLTermOptions):
    """``method_args`` of ``mart``: ``beta`` is λ, the weight of the misclassification-aware KL
    term (default 6, the reference's default; the paper's CIFAR-10 runs use 5-6);
    ``start_std`` and ``all_layer`` as in :class:`~robust_amo.methods.trades.KLTermOptions`."""


def mart_loss(model: nn.Module, x: torch.Tensor, point: AdversarialPoint, y: torch.Tensor,
              *, beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MART's loss in the model's current mode.

    BCE(p(x'), y) + β·mean_i [KL(p(x_i) ‖ p(x'_i))·(1 − p_y(x_i))], with
    BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x')).

    Args:
        model: the network (train mode in the trainer).
        x: clean inputs (B, ...); point: x' (and δ for the adversarial branch); y: labels (B,).
        beta: λ (default 6).

    Returns:
        (scalar loss in float32 or wider, logits (B, C) at the adversarial point).
    """
    adv = point.logits(model)
    clean = model(x)
    adv_w, clean_w = wide(adv), wide(clean)
    p_adv = F.softmax(adv_w, dim=1)
    # the most likely wrong class at x'
    wrong = p_adv.scatter(1, y[:, None], float("-inf")).argmax(1)
    bce = F.cross_entropy(adv_w, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_clean = F.softmax(clean_w, dim=1)
    # xlogy: 0·log 0 = 0, as KLDivLoss in the reference
    kl = (torch.xlogy(p_clean, p_clean) - p_clean * torch.log(p_adv + 1e-12)).sum(1)
    true = p_clean.gather(1, y[:, None]).squeeze(1)
    return bce + beta * (kl * (1.0000001 - true)).mean(), adv


@register_method("mart", options=MARTOptions, needs_attack=True)
def build(options: MARTOptions, ctx: MethodContext) -> Objective:
    """``mart``: PGD on the CE from the noisy start, with ``cfg.attack``'s eps, step, steps."""
    assert ctx.attack is not None
    attack = NoisyStartPGD(ctx.attack.model, ctx.attack.threat, ctx.attack.generator,
                           options.start_std)

    def loss(model: nn.Module, x: torch.Tensor, point: AdversarialPoint, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return mart_loss(model, x, point, y, beta=options.beta)

    return AdversarialObjective(Adversary(attack, options.all_layer), loss)
