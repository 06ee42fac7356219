"""Projected gradient descent (Madry et al. 2018), L∞ and L2, with restarts.

docs/algorithms.md, "PGD". Each step is :func:`robust_amo.attacks.core.pgd_iteration`; the model
runs in eval mode during the attack and its mode is restored afterwards (:class:`Attack`);
gradients are taken with respect to the input only, so nothing accumulates in the weights'
``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from robust_amo.config import AttackLoss, Norm, ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.runtime import eval_mode

from .base import InputAttack
from .core import per_example, pgd_iteration

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StartFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``start(active, r) -> x_0`` of restart r for the examples ``active`` (indices)."""


@dataclass
class WorstCase:
    """The per-example worst case over a PGD's restarts (:meth:`PGD.worst_case`).

    Attributes:
        x_adv: (B, ...) the first misclassified iterate of broken examples, else the final
            iterate of highest loss (x for examples not attacked).
        fooled: (B,) bool, broken by some iterate of some restart.
        after_restart: (R, B) bool, broken by restarts 1..r (non-decreasing in r).
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    after_restart: torch.Tensor


class PGD(InputAttack):
    """PGD attack object (torchattacks style): ``x_adv = PGD(model, ...)(x, y)``.

    Args:
        model: classifier returning logits for inputs in [0, 1].
        eps: radius of the threat model, in pixel units (default 8/255).
        step_size: α (default 2/255).
        steps: iterations per restart (default 10).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform point of the ball (default True).
        restarts: independent runs; the per-example worst case is kept (default 1).
        loss: ``"ce"`` (cross-entropy, default) or ``"cw"`` (margin max_{j≠y} z_j − z_y).
        generator: source of the random starts (default: a fresh CPU generator seeded 0, so
            the attack never touches the global RNG).
        early_stop: stop attacking an example once an iterate is misclassified and return that
            iterate (what evaluation wants; Madry training keeps ascending, default False).

    With ``restarts > 1`` the returned point of each example is a misclassified iterate if any
    restart found one, else the final iterate with the highest loss; restart r attacks only the
    examples no earlier restart has broken.
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
        loss: AttackLoss = "ce",
        generator: torch.Generator | None = None,
        early_stop: bool = False,
    ) -> None:
        self._setup(model, ThreatModel(norm, eps, step_size, steps, random_start, loss),
                    restarts, generator, early_stop)

    @classmethod
    def from_threat(cls, model: nn.Module, threat: ThreatModel, *, restarts: int = 1,
                    generator: torch.Generator | None = None, early_stop: bool = False) -> PGD:
        """The PGD of a :class:`~robust_amo.config.ThreatModel` (what the trainer, the
        evaluation and the margins hold); the keyword constructor builds one from its numbers.

        Args:
            model: classifier returning logits for inputs in [0, 1].
            threat: norm, eps, step size, steps, random start and loss.
            restarts, generator, early_stop: as in the constructor.

        Raises:
            ConfigError: ``restarts < 1``.
        """
        attack = cls.__new__(cls)
        attack._setup(model, threat, restarts, generator, early_stop)
        return attack

    def _setup(self, model: nn.Module, threat: ThreatModel, restarts: int,
               generator: torch.Generator | None, early_stop: bool) -> None:
        if restarts < 1:
            raise ConfigError(f"restarts must be >= 1 for PGD, got {restarts}",
                              params=("restarts",))
        InputAttack.__init__(self, model, threat, generator)
        self.restarts, self.early_stop = restarts, early_stop

    def __repr__(self) -> str:
        return (
            f"PGD(norm={self.norm}, eps={self.eps:.5g}, step_size={self.step_size:.5g}, "
            f"steps={self.steps}, restarts={self.restarts}, loss={self.loss})"
        )

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for (x, y): x (B, C, H, W) in [0, 1], y (B,) -> (B, C, H, W)."""
        if self.restarts == 1:
            return self.run_once(x, y)[0]
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
        """Every restart; the per-example worst case (docs/algorithms.md, "Evaluation").

        An example is broken once any iterate of any restart is misclassified; restart r runs
        on the examples not broken by restarts 1..r−1 (``early_exit``, default) or on all of
        ``attacked`` (same masks, more work: for checks). The kept point of an example is its
        first misclassified iterate, else the final iterate of highest loss.

        Args:
            x: clean inputs (B, ...); y: labels (B,).
            start: ``start(active, r)`` gives x_0 of restart r for the examples ``active``
                (indices into x); default: :meth:`start` from the attack's generator.
            attacked: (B,) bool, the examples to attack (default all); the others stay
                unbroken and keep x.
            early_exit: see above.

        Returns:
            :class:`WorstCase`.
        """
        todo = attacked if attacked is not None else torch.ones(len(y), dtype=torch.bool,
                                                                 device=x.device)
        best = x.clone()
        best_loss = torch.full((len(y),), float("-inf"), device=x.device)
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        curve = []
        for r in range(self.restarts):
            active = (todo & ~fooled if early_exit else todo).nonzero().squeeze(1)
            if active.numel() > 0:
                init = {"x_init": start(active, r)} if start is not None else {}
                xa, fa, la = self.run_once(x[active], y[active], final_eval=True, **init)
                # a fooling point beats any loss and, once found, is kept; among non-fooling
                # finals the highest loss wins
                new = ~fooled[active]
                better = new & (fa | (la > best_loss[active]))
                idx = active[better]
                best[idx] = xa[better].to(best.dtype)
                best_loss[idx] = la[better]
                fooled[active] |= fa
            curve.append(fooled.clone())
        return WorstCase(best, fooled, torch.stack(curve))

    def run_once(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        final_eval: bool = False,
        x_init: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart (the caller puts the model in the mode it wants; ``__call__``: eval).

        Args:
            x: clean inputs (B, ...); y: labels (B,).
            final_eval: evaluate the final iterate (one more forward) to report its loss and
                whether it is misclassified.
            x_init: the starting point x_0 (B, ...), a point of the eps-ball around x in
                [0, 1]; replaces the attack's own start (evaluation draws it per example so
                that it does not depend on the batch).

        Returns:
            ``(x_adv, fooled, loss)``: the point kept per example, whether a misclassified
            iterate was found (``early_stop`` or ``final_eval`` only, else all False), and its
            loss (−inf where not evaluated).
        """
        x_adv = x_init.detach().clone() if x_init is not None else self.start(x)
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        loss_out = torch.full((len(y),), float("-inf"), device=x.device)
        track = self.early_stop or final_eval
        loss_fn = self.loss_fn(x, y)
        step = self.step_fn(x)
        for _ in range(self.steps):
            it = pgd_iteration(loss_fn, x_adv, step)
            if track:
                # no `if hit.any()`: it would make the host wait for the device at every step
                hit = (it.logits.argmax(1) != y) & ~fooled
                fooled = fooled | hit
                loss_out = torch.where(hit, it.loss.float(), loss_out)
                # frozen examples keep the misclassified iterate
                x_adv = torch.where(per_example(fooled, x), x_adv, it.x)
            else:
                x_adv = it.x
        if final_eval:
            with torch.no_grad():
                loss, logits = loss_fn(x_adv)
            hit = (logits.argmax(1) != y) & ~fooled
            fooled |= hit
            loss_out = torch.where(fooled & ~hit, loss_out, loss.float())
        return x_adv, fooled, loss_out

    def iterates(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[torch.Tensor]:
        """Every iterate of every restart, the random starts included: B_adv(x) of the margins.

        No early stop (a misclassified iterate is a candidate too). Each gradient is taken in
        eval mode; between iterates the caller may run the model as it likes.

        Yields:
            (B, ...) tensors in the eps-ball around x, ``restarts·(steps + 1)`` of them.
        """
        x = x.detach()
        loss_fn = self.loss_fn(x, y)
        step = self.step_fn(x)
        for _ in range(self.restarts):
            x_adv = self.start(x)
            yield x_adv
            for _ in range(self.steps):
                with eval_mode(self.model):
                    x_adv = pgd_iteration(loss_fn, x_adv, step).x
                yield x_adv
