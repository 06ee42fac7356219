"""What every adversarial training method shares: an inner maximisation, then an outer loss.

A method that trains at adversarial points (``pgd``, ``trades``, ``mart``, ``awp``, ``fgsm-rs``,
``n-fgsm``) is an :class:`AdversarialObjective`: an :class:`Adversary` finds the point (x' alone,
or x' and the all-layer perturbations δ when the method's ``all_layer`` option is set), and the
method's loss ``(model, x, point, y) -> (loss, logits)`` is evaluated there. The split is what
lets AWP perturb the weights of any such method between the two halves, and what makes the
all-layer perturbations an option of every method instead of a method of their own
(docs/methods.md, "All-layer perturbations on any adversarial method").

With ``all_layer`` the δ loop is :class:`robust_amo.attacks.RobustAMOAttack` around the method's
own input attack (its start, loss and step): no method file repeats it. The objective then logs
what δ does every ``log_every`` steps (:meth:`AdversarialObjective.epoch_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import InputAttack, RobustAMOAttack
from robust_amo.config import AllLayerOptions
from robust_amo.perturb import perturb
from robust_amo.runtime import eval_mode, wide


@dataclass
class AdversarialPoint:
    """Where the outer loss is evaluated: x' (B, ...) and, with all-layer, one δ_j per point.

    Attributes:
        x: the adversarial inputs, detached.
        deltas: the all-layer perturbations (detached, one per perturbation point, ``None``
            entries when the attack ran 0 steps), or None for an input-only method.
        save_output: the perturbation points may save their output instead of h (the
            package's own architectures; see :meth:`RobustAMOAttack.saves_output`).
    """

    x: torch.Tensor
    deltas: list[torch.Tensor | None] | None = None
    save_output: bool = False

    def logits(self, model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        """``model`` at the point, in its current mode: F(x', δ), or F(x') without δ.

        Args:
            model: the network (the trainer's, possibly DDP-wrapped).
            x: another input to run at the same δ (default: the point's own x').
        """
        inp = self.x if x is None else x
        if self.deltas is None:
            return model(inp)
        with perturb(model, self.deltas, requires_grad=False, save_output=self.save_output):
            return model(inp)


class Adversary:
    """The inner maximisation of a method: its input attack, with or without all-layer δ.

    Args:
        attack: the method's input attack (PGD, TRADES's KL attack, FGSM-RS, ...).
        all_layer: ρ, η_δ and ``delta_grad`` of the δ ascent (Wei & Ma 2020), or None for the
            input attack alone.
    """

    def __init__(self, attack: InputAttack, all_layer: AllLayerOptions | None = None) -> None:
        self.attack = attack
        self.all_layer = all_layer
        self.joint = RobustAMOAttack.around(attack, all_layer) if all_layer is not None else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> AdversarialPoint:
        """The adversarial point of the batch (x (B, ...) in [0, 1], y (B,))."""
        if self.joint is None:
            return AdversarialPoint(self.attack(x, y))
        x_adv, deltas = self.joint(x, y)
        return AdversarialPoint(x_adv, deltas, self.joint.saves_output())


AdversarialLoss = Callable[[nn.Module, torch.Tensor, AdversarialPoint, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor]]
"""``(model, x, point, y) -> (scalar loss, logits (B, C))``: a method's outer loss."""


@runtime_checkable
class EpochAware(Protocol):
    """An objective that wants to know the epoch and reports per-epoch metrics: the trainer
    calls :meth:`begin_epoch` before the epoch's first step, :meth:`log_next` before every
    ``log_every``-th step (the first of each epoch included), and merges :meth:`epoch_metrics`
    into the epoch's metrics line. Outside the trainer (a benchmark timing one step) nothing is
    armed, so nothing extra is computed."""

    def begin_epoch(self, epoch: int) -> None:  # noqa: D102
        ...

    def log_next(self) -> None:  # noqa: D102
        ...

    def epoch_metrics(self) -> dict[str, float | list[float]]:  # noqa: D102
        ...


@dataclass
class _DeltaLog:
    """Sums of the logged δ figures of one epoch, kept on the device until it ends."""

    rel_size: torch.Tensor | None = None
    loss_gain: torch.Tensor | None = None
    batches: int = 0


class AdversarialObjective:
    """A method's objective: ``point = adversary(x, y)``, then ``loss(model, x, point, y)``.

    With all-layer perturbations it also measures, on the batch of the next step after each
    :meth:`log_next` (the trainer calls it every ``log_every`` steps, the first step of each
    epoch included), what δ does (docs/methods.md, "What δ does"):

    - ``delta_rel_size``: per perturbation point j, the batch mean of ‖‖h_j‖₂·δ_j‖₂ / ‖h_j‖₂,
      which is ‖δ_j‖₂ per example (the hook scales δ_j by the example's ‖h_j‖₂);
    - ``delta_loss_gain``: the mean cross-entropy at (x', δ) minus at (x', 0), both in eval
      mode without gradient, so that measuring changes neither the weights, the BatchNorm
      statistics nor any random stream: training is the same with or without it.

    Args:
        adversary: the inner maximisation.
        loss: the method's outer loss.
    """

    def __init__(self, adversary: Adversary, loss: AdversarialLoss) -> None:
        self.adversary = adversary
        self.loss = loss
        self._armed = False
        self._log = _DeltaLog()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of the method at the batch's adversarial point."""
        point = self.adversary(x, y)
        out = self.loss(model, x, point, y)
        if self._armed and point.deltas is not None:
            self._measure(model, point, y)
        self._armed = False
        return out

    def begin_epoch(self, epoch: int) -> None:
        """Start the epoch's δ log."""
        self._armed = False
        self._log = _DeltaLog()

    def log_next(self) -> None:
        """Measure δ on the next step's batch."""
        self._armed = True

    def epoch_metrics(self) -> dict[str, float | list[float]]:
        """The epoch's mean δ figures (empty for an input-only method or no measured batch)."""
        log = self._log
        if log.batches == 0 or log.rel_size is None or log.loss_gain is None:
            return {}
        sizes = (log.rel_size / log.batches).tolist()  # one host sync per epoch
        return {"delta_rel_size": [round(v, 6) for v in sizes],
                "delta_loss_gain": round(float(log.loss_gain) / log.batches, 6)}

    @torch.no_grad()
    def _measure(self, model: nn.Module, point: AdversarialPoint, y: torch.Tensor) -> None:
        assert point.deltas is not None
        rel = torch.stack([
            torch.zeros((), device=y.device) if d is None
            else torch.linalg.vector_norm(d.float().flatten(1), dim=1).mean()
            for d in point.deltas])
        with eval_mode(model):
            gain = (F.cross_entropy(wide(point.logits(model)), y)
                    - F.cross_entropy(wide(model(point.x)), y))
        log = self._log
        log.rel_size = rel if log.rel_size is None else log.rel_size + rel
        log.loss_gain = gain.float() if log.loss_gain is None else log.loss_gain + gain.float()
        log.batches += 1
