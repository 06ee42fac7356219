"""The base of every attack object: hyperparameters in the constructor, ``attack(x, y)`` to run.

In the style of torchattacks: ``x_adv = PGD(model, eps=8/255)(x, y)``. The base holds the model
and a ``torch.Generator`` for the attack's randomness (never the global RNG), runs the attack in
eval mode and gives the model's mode back once, also on error, and takes the device from the
input (no ``.cuda()`` anywhere).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robust_amo.config import AttackLoss, Norm, ThreatModel
from robust_amo.runtime import eval_mode

from .core import LossFn, StepFn, model_loss, projected_step, random_start


class Attack:
    """Base class: subclasses implement :meth:`attack` on detached inputs.

    Args:
        model: classifier returning logits for inputs in [0, 1].
        generator: source of the attack's randomness (default: a fresh CPU generator seeded 0,
            so an attack never touches the global RNG and two runs give the same result).
    """

    def __init__(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        self.model = model
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """Run :meth:`attack` on (x, y) with the model in eval mode (mode restored afterwards)."""
        with eval_mode(self.model):
            return self.attack(x.detach(), y)

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The attack proper: x (B, ...) in [0, 1] on the model's device, y (B,) labels."""
        raise NotImplementedError


class InputAttack(Attack):
    """An attack inside the eps-ball around the input: its threat model and its random start.

    Args:
        model, generator: see :class:`Attack`.
        threat: the :class:`~robust_amo.config.ThreatModel` (norm, eps, step size, steps,
            random start, loss), validated when it was built.

    Attributes:
        threat: as given; ``eps``, ``step_size``, ``steps``, ``norm``, ``random_start`` and
            ``loss`` read its fields.
    """

    def __init__(self, model: nn.Module, threat: ThreatModel,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(model, generator)
        self.threat = threat

    @property
    def eps(self) -> float:  # noqa: D102
        return self.threat.eps

    @property
    def step_size(self) -> float:  # noqa: D102
        return self.threat.step_size

    @property
    def steps(self) -> int:  # noqa: D102
        return self.threat.steps

    @property
    def norm(self) -> Norm:  # noqa: D102
        return self.threat.norm

    @property
    def random_start(self) -> bool:  # noqa: D102
        return self.threat.random_start

    @property
    def loss(self) -> AttackLoss:  # noqa: D102
        return self.threat.loss

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """x_0: a random point of the eps-ball from the attack's generator, or a copy of x.

        Subclasses with another start (TRADES's x + 0.001·N(0, I)) override this.
        """
        if self.random_start:
            return random_start(x, self.eps, self.norm, self.generator)
        return x.clone()

    def loss_fn(self, x: torch.Tensor, y: torch.Tensor) -> LossFn:
        """The per-example loss the attack ascends around the clean batch (x, y).

        Default: the threat model's ``ce`` or ``cw`` of the model's logits at labels y.
        Subclasses change the objective (TRADES's KL to the clean prediction, a targeted margin).
        It is built once per batch, before any perturbation hook is installed, so whatever it
        computes from the clean x sees the plain model.
        """
        return model_loss(self.model, y, self.loss)

    def step_fn(self, x: torch.Tensor) -> StepFn:
        """The ascent step and projection around the clean batch x (default: PGD's, onto the
        eps-ball ∩ [0, 1]^d; N-FGSM's, without the eps-ball, overrides it)."""
        return projected_step(x, self.eps, self.step_size, self.norm)
