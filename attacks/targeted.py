"""Targeted PGD towards the classes the clean logits rank next: the worst case over targets.

docs/evaluation.md, "Targeted PGD". For an example (x, y) with clean logits z(x), the targets are
the k classes other than y with the highest clean logits, in that order (t_1 is the runner-up
class). For each target t the attack is PGD (:class:`~robust_amo.attacks.PGD`, the same
``pgd_iteration``, start and projection) ascending a loss that pulls the logits towards t:

- ``cw``, the targeted Carlini-Wagner margin ``z_t − z_y`` (Carlini & Wagner 2017, as A3 and
  MALT use it), positive once t beats the label;
- ``dlr``, the targeted DLR loss of AutoAttack's APGD-T (Croce & Hein 2020, eq. 7),
  ``(z_t − z_y) / (z_π1 − (z_π3 + z_π4) / 2)`` with π the classes sorted by decreasing logit
  at the current point: invariant to shifting and scaling the logits.

An example counts as broken when any iterate is misclassified (as any class, not only t), as in
untargeted PGD; the worst case over targets is taken like the worst case over restarts: target
t + 1 runs only on the examples targets 1..t left standing (early exit), each target with the
attack's restarts.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from robust_amo.config import Norm, ThreatModel, check_choice
from robust_amo.errors import ConfigError

from .core import LossFn
from .pgd import PGD, StartFn, WorstCase

TargetLoss = Literal["cw", "dlr"]
"""The targeted losses: ``cw`` (z_t − z_y) and ``dlr`` (APGD-T's targeted DLR)."""


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The k classes other than y with the highest logits, best first (B, k).

    Ties go to the lower class index (a stable sort), so the order is reproducible.

    Raises:
        ConfigError: k is more than the number of classes minus one.
    """
    n_classes = logits.shape[1]
    if k > n_classes - 1:
        raise ConfigError(f"targeted PGD with {k} targets needs at least {k + 1} classes; this "
                          f"model has {n_classes}: ask for at most {n_classes - 1} targets")
    z = logits.detach().float().clone()
    z.scatter_(1, y[:, None], float("-inf"))
    return z.sort(dim=1, descending=True, stable=True).indices[:, :k]


def malt_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int | None = None,
                 norm: Norm = "linf") -> torch.Tensor:
    """The k classes other than y nearest to x by the linearised boundary, nearest first (B, k);
    all C − 1 of them when k is None.

    MALT's target ranking (Melamed et al. 2024, "MALT powers up adversarial attacks"): for each
    class t ≠ y the distance of x to the boundary between y and t of the model linearised at x,
    ``(z_y(x) − z_t(x)) / ‖∇_x z_y(x) − ∇_x z_t(x)‖_*`` with ‖·‖_* the dual norm of the threat
    model's (ℓ1 for L∞, ℓ2 for L2); the targets are the k smallest, ties to the lower class index.
    For a linear model these are the exact distances. Cost: one forward and C backward passes of
    the batch (one per class; in eval mode the examples do not interact). The model's mode is the
    caller's; call it in eval mode.

    Raises:
        ConfigError: k is more than the number of classes minus one.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()
        n_classes = logits.shape[1]
        k = n_classes - 1 if k is None else k
        if k > n_classes - 1:
            raise ConfigError(f"{k} targets need at least {k + 1} classes; this model has "
                              f"{n_classes}: ask for at most {n_classes - 1} targets")
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        dist = torch.empty_like(logits)
        for c in range(n_classes):
            gap = z_y - logits[:, c]
            (g,) = torch.autograd.grad(gap.sum(), x, retain_graph=c < n_classes - 1)
            g = g.flatten(1).float()
            dual = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
            dist[:, c] = gap.detach() / dual.clamp_min(1e-12)
    dist.scatter_(1, y[:, None], float("inf"))
    return dist.sort(dim=1, stable=True).indices[:, :k]


def targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                  loss: TargetLoss) -> torch.Tensor:
    """Per-example targeted loss (B,), in float32, that the attack ascends.

    Args:
        logits: (B, C). y: labels (B,). target: target classes (B,), never equal to y.
        loss: ``cw``: z_t − z_y; ``dlr``: (z_t − z_y) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12),
            π sorting the logits in decreasing order (needs at least 4 classes).
    """
    z = logits.float()
    margin = z.gather(1, target[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
    if loss == "cw":
        return margin
    check_choice("target_loss", loss, TargetLoss)
    if z.shape[1] < 4:
        raise ConfigError(f"the DLR-targeted loss needs at least 4 classes; this model has "
                          f"{z.shape[1]}: use the CW-targeted loss")
    s = z.sort(1, descending=True).values
    return margin / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12)


class TargetedPGD(PGD):
    """PGD towards each of the top-``targets`` other classes; the worst case over them.

    Args:
        model, eps, step_size, steps, norm, random_start, restarts, generator, early_stop: as
            for :class:`~robust_amo.attacks.PGD` (``restarts`` per target).
        targets: how many targets, k (default 9: every other class of a 10-class problem).
        target_loss: ``"cw"`` (default) or ``"dlr"`` (module docstring).

    Attributes:
        target_rank: the target :meth:`run_once` attacks (0: the runner-up class);
            :meth:`worst_case` runs every rank below ``targets``.

    Cost: each restart of each target first classifies its clean examples once (one forward
    pass, no backward) to rank their targets.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: Norm = "linf",
        random_start: bool = True,
        restarts: int = 1,
        targets: int = 9,
        target_loss: TargetLoss = "cw",
        generator: torch.Generator | None = None,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps, step_size, steps, norm, random_start, restarts,
                         generator=generator, early_stop=early_stop)
        self._targets(targets, target_loss)

    @classmethod
    def from_threat(cls, model: nn.Module, threat: ThreatModel, *, restarts: int = 1,
                    generator: torch.Generator | None = None, early_stop: bool = False,
                    targets: int = 9, target_loss: TargetLoss = "cw") -> TargetedPGD:
        """The targeted PGD of a threat model (its ``loss`` is not used: ``target_loss`` is).

        Raises:
            ConfigError: ``restarts < 1``, ``targets < 1`` or an unknown ``target_loss``.
        """
        attack = super().from_threat(model, threat, restarts=restarts, generator=generator,
                                     early_stop=early_stop)
        attack._targets(targets, target_loss)
        return attack

    def _targets(self, targets: int, target_loss: TargetLoss) -> None:
        if targets < 1:
            raise ConfigError(f"targets must be >= 1 for targeted PGD, got {targets}",
                              params=("targets",))
        check_choice("target_loss", target_loss, TargetLoss)
        self.targets, self.target_loss, self.target_rank = targets, target_loss, 0

    def __repr__(self) -> str:
        return (f"TargetedPGD(norm={self.norm}, eps={self.eps:.5g}, "
                f"step_size={self.step_size:.5g}, steps={self.steps}, restarts={self.restarts}, "
                f"targets={self.targets}, target_loss={self.target_loss})")

    def loss_fn(self, x: torch.Tensor, y: torch.Tensor) -> LossFn:
        """The targeted loss towards target ``target_rank`` of each example, ranked by the
        clean logits of x (one forward pass without gradient)."""
        with torch.no_grad():
            clean = self.model(x)
        target = top_targets(clean, y, self.target_rank + 1)[:, self.target_rank]

        def fn(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(x_adv)
            return targeted_loss(logits, y, target, self.target_loss), logits

        return fn

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for (x, y): the worst case over targets and restarts."""
        return self.worst_case(x, y).x_adv

    def worst_case(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        start: StartFn | None = None,
        attacked: torch.Tensor | None = None,
        early_exit: bool = True,
    ) -> WorstCase:
        """Every target, each with every restart (:meth:`PGD.worst_case`); the worst case.

        Target t + 1 attacks only the examples not broken by targets 1..t (``early_exit``) or
        all of ``attacked``. ``start(active, r)`` is asked for restart ``r = t·R + r'`` (t the
        target's rank, R the restarts), so every (target, restart) has its own start.

        Returns:
            :class:`~robust_amo.attacks.pgd.WorstCase` whose ``after_restart`` has one row per
            (target, restart), targets outer; ``x_adv`` is the first misclassified iterate of
            a broken example, else the kept point of the first target.
        """
        todo = attacked if attacked is not None else torch.ones(len(y), dtype=torch.bool,
                                                                 device=x.device)
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        best = x.clone()
        curve = []
        for t in range(self.targets):
            one = copy.copy(self)
            one.target_rank = t
            shifted = None
            if start is not None:
                def shifted(active: torch.Tensor, r: int, t: int = t) -> torch.Tensor:
                    return start(active, t * self.restarts + r)
            wc = PGD.worst_case(one, x, y, start=shifted,
                                attacked=todo & ~fooled if early_exit else todo,
                                early_exit=early_exit)
            take = wc.fooled & ~fooled
            if t == 0:  # an example no target breaks keeps the first target's point
                take |= ~wc.fooled
            best[take] = wc.x_adv[take].to(best.dtype)
            curve += [fooled | row for row in wc.after_restart]
            fooled = fooled | wc.fooled
        return WorstCase(best, fooled, torch.stack(curve))
