"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, Algorithm 1), L∞, with early exit per example.

From x_0 (a uniform point of the eps-ball), with η = 2·eps per example, momentum α = 0.75:

    x_1     = Π(x_0 + η·sign ∇f(x_0))
    z_{k+1} = Π(x_k + η·sign ∇f(x_k))
    x_{k+1} = Π(x_k + α·(z_{k+1} − x_k) + (1 − α)·(x_k − x_{k−1}))

keeping the point of highest loss x_max. At the checkpoints w_j = ⌈p_j·N⌉ (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)) an example halves its η and restarts from x_max
when (1) its loss rose in fewer than ρ = 75% of the steps since w_{j−1}, or (2) η was not halved
at w_{j−1} and f_max has not moved since. Every iteration is one
:func:`robust_amo.attacks.core.pgd_iteration` (one forward, one backward); an example stops being
attacked (and costs nothing more) as soon as an iterate is misclassified, which is what a robust
accuracy needs. The losses: cross-entropy, and the targeted DLR loss of APGD-T
(:func:`robust_amo.attacks.targeted.targeted_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from robust_amo.config import ThreatModel, check_choice, check_int, finite_non_negative

from .base import InputAttack
from .core import LossFn, per_example, pgd_iteration, random_start
from .targeted import targeted_loss, top_targets

APGDLoss = Literal["ce", "dlr-t"]
"""APGD's losses: cross-entropy, or the targeted DLR loss of APGD-T."""


def checkpoints(n_iter: int) -> list[int]:
    """APGD's checkpoints w_1 < w_2 < ... ≤ n_iter (w_0 = 0 is left out): ⌈p_j·n_iter⌉.

    ``p`` is rounded to 1e-9 before the ceiling, so float noise (0.22 + 0.19 =
    0.41000000000000003) does not move a checkpoint (to 42 instead of 41 for 100 iterations).
    """
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    out = sorted({math.ceil(round(q, 9) * n_iter) for q in p[1:]})
    return [w for w in out if 0 < w <= n_iter]


class APGD(InputAttack):
    """Auto-PGD, L∞: ``x_adv = APGD(model, eps=8/255)(x, y)`` (docstring of the module).

    Args:
        model: classifier returning logits for inputs in [0, 1].
        eps: L∞ radius (default 8/255).
        steps: N, iterations (forward + backward passes) per run (default 100, AutoAttack's).
        loss: ``"ce"`` (default) or ``"dlr-t"``: the targeted DLR loss towards ``target``
            (set per batch by :meth:`attack_targets`).
        generator: source of the uniform start (default: a CPU generator seeded 0).
        momentum: α (default 0.75). rho: ρ of condition (1) (default 0.75).

    ``attack(x, y)`` returns the first misclassified iterate of each broken example and x_max
    of the others; :attr:`last_fooled` holds which were broken, :attr:`zero_gradients` how
    many examples had an all-zero gradient at their start (a sign of gradient masking). Set
    per batch: :attr:`target` (``dlr-t``: the target class of each example) and
    :attr:`x_init` (the start x_0 of each example; default a uniform point of the ball from
    ``generator``).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100,
                 loss: APGDLoss = "ce", generator: torch.Generator | None = None,
                 momentum: float = 0.75, rho: float = 0.75) -> None:
        steps = check_int("steps", steps)
        threat = ThreatModel("linf", eps, 2 * eps, steps, True, "ce")
        super().__init__(model, threat, generator)
        self.apgd_loss: APGDLoss = check_choice("loss", loss, APGDLoss)
        self.momentum = finite_non_negative("momentum", momentum)
        self.rho = finite_non_negative("rho", rho)
        self.target: torch.Tensor | None = None
        self.x_init: torch.Tensor | None = None
        self.last_fooled: torch.Tensor | None = None
        self.zero_gradients = 0

    def __repr__(self) -> str:
        return f"APGD(eps={self.eps:.5g}, steps={self.steps}, loss={self.apgd_loss})"

    def loss_fn(self, x: torch.Tensor, y: torch.Tensor) -> LossFn:
        """Cross-entropy, or the targeted DLR loss towards :attr:`target` (per example)."""
        if self.apgd_loss == "ce":
            return super().loss_fn(x, y)
        target = self.target
        assert target is not None and len(target) == len(y)

        def fn(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(x_adv)
            return targeted_loss(logits, y, target, "dlr"), logits

        return fn

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial points of the batch (B, ...); broken examples in :attr:`last_fooled`.

        N iterations of one forward and one backward each, then one forward without gradient
        at the last iterate; an example leaves the batch at its first misclassified iterate.
        """
        x_out, fooled = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=x.device)
        idx = torch.arange(len(y), device=x.device)
        target = self.target
        x0 = self.x_init if self.x_init is not None else random_start(x, self.eps, "linf",
                                                                        self.generator)
        s = _State(x0.detach(), x, y, 2 * self.eps)
        marks, last_mark = set(checkpoints(self.steps)), 0
        for k in range(self.steps + 1):
            if target is not None:
                self.target = target[idx]
            if k < self.steps:
                it = pgd_iteration(self.loss_fn(s.x, s.y), s.x_k, lambda xa, g: xa)
                assert it.grad is not None
                logits, f_k, grad = it.logits, it.loss.float(), it.grad
                if k == 0:  # where AutoAttack's check_zero_gradients looks
                    self.zero_gradients = int((grad.flatten(1).abs().sum(1) == 0).sum())
            else:  # the last iterate is evaluated, not stepped from
                with torch.no_grad():
                    f_k, logits = self.loss_fn(s.x, s.y)(s.x_k)
                f_k, grad = f_k.float(), None
            assert logits is not None
            hit = logits.argmax(1) != s.y
            x_out[idx[hit]] = s.x_k[hit].to(x_out.dtype)
            fooled[idx[hit]] = True
            s.observe(k, f_k)
            if grad is None:
                break
            reset = torch.zeros_like(hit)
            if k in marks:
                reset = s.checkpoint(self.rho * (k - last_mark))
                last_mark = k
            s.step(k, grad, reset, self.momentum, self._project)
            keep = ~hit
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                idx = idx[keep]
                s.keep(keep)
        standing = ~fooled[idx]
        x_out[idx[standing]] = s.x_max[standing].to(x_out.dtype)
        self.target = target
        self.last_fooled = fooled
        return x_out

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp(0, 1)


class _State:
    """The per-example state of one APGD run, for the examples still attacked."""

    def __init__(self, x0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eta: float) -> None:
        n = len(y)
        self.x, self.y, self.x_k, self.x_prev, self.x_max = x, y, x0, x0, x0
        self.eta = torch.full((n,), eta, device=x.device)
        self.f_max = torch.full((n,), float("-inf"), device=x.device)
        self.f_prev = self.f_max
        self.rises = torch.zeros(n, device=x.device)
        self.f_max_ck = self.f_max
        self.halved_ck = torch.zeros(n, dtype=torch.bool, device=x.device)

    def observe(self, k: int, f_k: torch.Tensor) -> None:
        """The loss at x_k: x_max, f_max and the count of rises since the last checkpoint."""
        better = f_k > self.f_max
        self.x_max = torch.where(per_example(better, self.x_k), self.x_k, self.x_max)
        self.f_max = torch.maximum(self.f_max, f_k)
        if k == 0:
            self.f_max_ck = self.f_max  # f_max at w_0 = 0, for condition (2) at w_1
        else:
            self.rises += (f_k > self.f_prev).float()
        self.f_prev = f_k

    def checkpoint(self, needed_rises: float) -> torch.Tensor:
        """Conditions (1) or (2) per example: halve η there; returns where (B,)."""
        reset = (self.rises < needed_rises) | (~self.halved_ck & (self.f_max <= self.f_max_ck))
        self.eta = torch.where(reset, self.eta / 2, self.eta)
        self.f_max_ck, self.halved_ck = self.f_max, reset
        self.rises = torch.zeros_like(self.rises)
        return reset

    def step(self, k: int, grad: torch.Tensor, reset: torch.Tensor, momentum: float,
             project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """x_{k+1}: the signed step, with momentum after the first; x_max where ``reset``."""
        x_k = self.x_k
        z = project(x_k + per_example(self.eta, x_k) * grad.sign(), self.x)
        x_next = z if k == 0 else project(
            x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - self.x_prev), self.x)
        back = per_example(reset, x_k)
        self.x_k = torch.where(back, self.x_max, x_next)
        self.x_prev = torch.where(back, self.x_max, x_k)

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the examples already broken."""
        for name in ("x", "y", "x_k", "x_prev", "x_max", "eta", "f_max", "f_prev", "rises",
                     "f_max_ck", "halved_ck"):
            setattr(self, name, getattr(self, name)[keep])


def apgd_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The k targets of APGD-T for each example: the classes the clean logits rank next (B, k)."""
    with torch.no_grad():
        return top_targets(model(x), y, k)


def ce_then_targeted(attack_ce: APGD, attack_t: APGD, x: torch.Tensor, y: torch.Tensor,
                     targets: torch.Tensor,
                     start: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """APGD-CE on every example, then APGD-T towards each target in turn on those still
    standing: ``(x_adv (B, ...), fooled (B,))``, the cascade that spends passes only on examples
    no earlier attack broke.

    Args:
        attack_ce, attack_t: an ``ce`` and a ``dlr-t`` :class:`APGD` on the same model.
        x, y: the batch (the caller passes the clean-correct examples).
        targets: (B, k) target classes in the order to try (:func:`apgd_targets`).
        start: ``start(examples, stage)``: the x_0 of the examples (indices into x) in stage 0
            (CE) or j + 1 (target j); default: each attack's own uniform start.

    Returns:
        ``(x_adv, fooled, after)``: the points, which examples some stage broke, and the
        fooled mask after each stage (CE, then each target).
    """
    every = torch.arange(len(y), device=x.device)
    attack_ce.x_init = start(every, 0) if start is not None else None
    x_adv = attack_ce(x, y)
    fooled = attack_ce.last_fooled.clone()
    after = [fooled.clone()]
    for j in range(targets.shape[1]):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() > 0:
            attack_t.target = targets[todo, j]
            attack_t.x_init = start(todo, j + 1) if start is not None else None
            x_adv[todo] = attack_t(x[todo], y[todo])
            fooled[todo] |= attack_t.last_fooled
        after.append(fooled.clone())
    attack_ce.x_init = attack_t.x_init = None
    return x_adv, fooled, after

