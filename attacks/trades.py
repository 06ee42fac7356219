"""The training attacks of TRADES and MART: PGD from x + 0.001·N(0, I), on the KL or the CE.

TRADES (Zhang et al. 2019, Algorithm 1 and its reference code) maximises
KL(f(x) ‖ f(x')) over the eps-ball, starting from x' = x + 0.001·N(0, I); MART (Wang et al. 2020,
reference code) runs the same loop on the cross-entropy. Both then take the sign step and the
projection of PGD (:func:`robust_amo.attacks.core.pgd_iteration`, :func:`projected_step`). As in
both references, the attack runs in eval mode (the shared :class:`Attack` base) and the weight
update in train mode, and the start is not clipped to [0, 1] (the first projection clips it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.config import ThreatModel
from robust_amo.runtime import to_device

from .base import InputAttack
from .core import LossFn, pgd_iteration


def kl_to_clean(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) with p = softmax(clean_logits),
    q = softmax(logits), in float32 or wider (B,). TRADES's and MART's robust term.

    Args:
        clean_logits: (B, C) logits at the clean inputs (the reference distribution p).
        logits: (B, C) logits at the adversarial inputs (q).
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(clean_logits.to(wide), dim=1)
    log_q = F.log_softmax(logits.to(wide), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


class NoisyStartPGD(InputAttack):
    """PGD from x_0 = x + σ·N(0, I) (σ = 0.001): MART's training attack (CE, or the threat
    model's ``cw``), and the base of TRADES's.

    Args:
        model: classifier returning logits for inputs in [0, 1].
        threat: eps, step size, steps and norm (``random_start`` is not used: this start is
            always drawn; ``loss`` is the ascended loss, ``ce`` in MART).
        generator: source of the Gaussian start (default: a CPU generator seeded 0).
        start_std: σ of the start (default 0.001, both references).
    """

    def __init__(self, model: nn.Module, threat: ThreatModel,
                 generator: torch.Generator | None = None, start_std: float = 1e-3) -> None:
        super().__init__(model, threat, generator)
        self.start_std = start_std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(norm={self.norm}, eps={self.eps:.5g}, "
                f"step_size={self.step_size:.5g}, steps={self.steps}, "
                f"start_std={self.start_std:g})")

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """x + σ·N(0, I), not clipped; the noise is drawn on the generator's device (CPU by
        default) and moved to x's, so a seed gives the same start on every device."""
        gdev = self.generator.device
        noise = torch.randn(x.shape, generator=self.generator, device=gdev,
                            dtype=torch.float32)
        return x + to_device((self.start_std * noise).to(x.dtype), x.device)

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x' after ``steps`` signed steps from the noisy start: (B, ...) in the eps-ball ∩ [0, 1]
        (the start itself when ``steps == 0``)."""
        x_adv = self.start(x)
        loss_fn, step = self.loss_fn(x, y), self.step_fn(x)
        for _ in range(self.steps):
            x_adv = pgd_iteration(loss_fn, x_adv, step).x
        return x_adv.detach()


class TRADESAttack(NoisyStartPGD):
    """TRADES's inner maximisation (Zhang et al. 2019): x' maximises KL(f(x) ‖ f(x')).

    The clean prediction f(x) is computed once per batch, without gradient, before the loop (and
    before any all-layer hook: with ``RobustAMOAttack.around`` only the adversarial branch is
    perturbed). The labels are not used. Arguments as :class:`NoisyStartPGD`; the threat
    model's ``loss`` is ignored.
    """

    def loss_fn(self, x: torch.Tensor, y: torch.Tensor) -> LossFn:
        """``x' -> (KL(f(x) ‖ f(x')) per example (B,), logits at x')``."""
        with torch.no_grad():
            clean = self.model(x).detach()

        def fn(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(x_adv)
            return kl_to_clean(clean, logits), logits

        return fn
