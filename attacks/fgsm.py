"""Single-step L∞ attacks of fast adversarial training: FGSM-RS and N-FGSM.

Both are one :func:`robust_amo.attacks.core.pgd_iteration` from a random start; they differ in
the start's noise, the step size and whether the step is projected back onto the eps-ball:

- FGSM-RS (Wong, Rice & Kolter 2020, "Fast is better than free", ICLR 2020):
  x_0 = clip_[0,1](x + U(−ε, ε)), x' = Π(x_0 + α·sign(∇ℓ(x_0))) with α = 1.25·ε and Π the
  projection onto the ε-ball ∩ [0, 1]^d, which is PGD's step (:func:`~.core.pgd_step`).
- N-FGSM (de Jorge et al. 2022, "Make some noise", NeurIPS 2022): x_0 = clip_[0,1](x + η),
  η ~ U(−kε, kε) with k = 2, and x' = clip_[0,1](x_0 + α·sign(∇ℓ(x_0))) with α = ε: no
  projection onto the ε-ball, so ‖x' − x‖∞ can reach (k + 1)·ε = 3ε.

The model runs in eval mode while the gradient is taken (:class:`~.base.Attack`, the one
convention of this toolkit; both reference implementations take it in train mode, see
docs/methods.md, "Fast adversarial training").
"""

from __future__ import annotations

import torch
from torch import nn

from robust_amo.config import AttackLoss, ThreatModel, finite_non_negative
from robust_amo.errors import ConfigError

from .base import InputAttack
from .core import StepFn, pgd_iteration, random_start


def _linf_threat(method: str, threat: ThreatModel, step_ratio: float) -> ThreatModel:
    """``threat`` as a single step of α = step_ratio·ε from a random start (L∞ only)."""
    if threat.norm != "linf":
        raise ConfigError(f"{method} is an L∞ attack (its step is a gradient sign): set "
                          f"attack.norm to linf, got {threat.norm!r}", params=("attack.norm",))
    return threat.replace(steps=1, step_size=step_ratio * threat.eps, random_start=True)


class SingleStepAttack(InputAttack):
    """One :func:`~.core.pgd_iteration` from :meth:`start` with :meth:`step_fn`: the shared
    body of :class:`FGSMRS` and :class:`NFGSM`. Its threat model has ``steps = 1``, which is
    also the number of joint steps when all-layer perturbations wrap it
    (:meth:`robust_amo.attacks.RobustAMOAttack.around`)."""

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x' for x (B, ...) in [0, 1] and labels y (B,): one signed-gradient step, (B, ...)."""
        return pgd_iteration(self.loss_fn(x, y), self.start(x), self.step_fn(x)).x


class FGSMRS(SingleStepAttack):
    """FGSM with a random start (Wong, Rice & Kolter 2020): ``x_adv = FGSMRS(model, eps)(x, y)``.

    x_0 = clip_[0,1](x + U(−ε, ε)) from ``generator`` (PGD's :func:`~.core.random_start`), then
    one PGD step of α = ``step_ratio``·ε with its projection onto the ε-ball ∩ [0, 1]^d. The
    reference (github.com/locuslab/fast_adversarial, CIFAR10/train_fgsm.py) does the same: it
    clips the start to the image range, and the step first to the ε-ball, then to [0, 1].

    Args:
        model: classifier returning logits for inputs in [0, 1].
        eps: the L∞ radius ε in pixel units (default 8/255).
        step_ratio: α/ε (default 1.25, the paper's α = 1.25·ε: 10/255 at ε = 8/255, also
            the reference code's default).
        loss: ``"ce"`` (default, the paper's) or ``"cw"``, the loss of the gradient.
        generator: source of the random start (default: a CPU generator seeded 0).

    Raises:
        ConfigError: a negative or non-finite ``eps`` or ``step_ratio`` (naming it).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_ratio: float = 1.25,
                 loss: AttackLoss = "ce", generator: torch.Generator | None = None) -> None:
        threat = ThreatModel("linf", eps, 0.0, 1, True, loss)
        self._setup(model, threat, step_ratio, generator)

    @classmethod
    def from_threat(cls, model: nn.Module, threat: ThreatModel, step_ratio: float = 1.25,
                    generator: torch.Generator | None = None) -> FGSMRS:
        """FGSM-RS with a threat model's ε and loss (its ``steps``, ``step_size`` and
        ``random_start`` are the method's own: 1, ``step_ratio``·ε and a random start).

        Raises:
            ConfigError: an L2 threat model (naming ``attack.norm``), or a bad ``step_ratio``.
        """
        attack = cls.__new__(cls)
        attack._setup(model, threat, step_ratio, generator)
        return attack

    def _setup(self, model: nn.Module, threat: ThreatModel, step_ratio: float,
               generator: torch.Generator | None) -> None:
        self.step_ratio = finite_non_negative("step_ratio", step_ratio)
        InputAttack.__init__(self, model, _linf_threat("fgsm-rs", threat, self.step_ratio),
                             generator)

    def __repr__(self) -> str:
        return f"FGSMRS(eps={self.eps:.5g}, step_ratio={self.step_ratio:g}, loss={self.loss})"


class NFGSM(SingleStepAttack):
    """N-FGSM (de Jorge et al. 2022): ``x_adv = NFGSM(model, eps)(x, y)``.

    x_0 = clip_[0,1](x + η) with η ~ U(−kε, kε), k = ``noise_ratio``, from ``generator``; then
    x' = clip_[0,1](x_0 + α·sign(∇ℓ(x_0))) with α = ``step_ratio``·ε. There is no projection
    onto the ε-ball: ‖x' − x‖∞ ≤ (k + step_ratio)·ε. Clipping to the image range, at the start
    and after the step, follows the reference (github.com/pdejorge/N-FGSM, train.py: η is
    clamped so that x + η lies in the image range before the gradient, and x + η + α·sign(∇)
    again after the step; its ``--clip`` to an ε-ball is off by default, as here).

    Args:
        model: classifier returning logits for inputs in [0, 1].
        eps: the L∞ radius ε in pixel units (default 8/255).
        noise_ratio: k, the noise's half-width over ε (default 2, the paper's; 0: no noise,
            x_0 = x, nothing drawn).
        step_ratio: α/ε (default 1, the paper's α = ε).
        loss: ``"ce"`` (default, the paper's) or ``"cw"``, the loss of the gradient.
        generator: source of the noise (default: a CPU generator seeded 0).

    Raises:
        ConfigError: a negative or non-finite ``eps``, ``noise_ratio`` or ``step_ratio``
            (naming it).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, noise_ratio: float = 2.0,
                 step_ratio: float = 1.0, loss: AttackLoss = "ce",
                 generator: torch.Generator | None = None) -> None:
        threat = ThreatModel("linf", eps, 0.0, 1, True, loss)
        self._setup(model, threat, noise_ratio, step_ratio, generator)

    @classmethod
    def from_threat(cls, model: nn.Module, threat: ThreatModel, noise_ratio: float = 2.0,
                    step_ratio: float = 1.0, generator: torch.Generator | None = None
                    ) -> NFGSM:
        """N-FGSM with a threat model's ε and loss (its ``steps``, ``step_size`` and
        ``random_start`` are the method's own).

        Raises:
            ConfigError: an L2 threat model (naming ``attack.norm``), or a bad ratio.
        """
        attack = cls.__new__(cls)
        attack._setup(model, threat, noise_ratio, step_ratio, generator)
        return attack

    def _setup(self, model: nn.Module, threat: ThreatModel, noise_ratio: float,
               step_ratio: float, generator: torch.Generator | None) -> None:
        self.step_ratio = finite_non_negative("step_ratio", step_ratio)
        self.noise_ratio = finite_non_negative("noise_ratio", noise_ratio)
        InputAttack.__init__(self, model, _linf_threat("n-fgsm", threat, self.step_ratio),
                             generator)

    def __repr__(self) -> str:
        return (f"NFGSM(eps={self.eps:.5g}, noise_ratio={self.noise_ratio:g}, "
                f"step_ratio={self.step_ratio:g}, loss={self.loss})")

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """x_0 = clip_[0,1](x + η), η ~ U(−kε, kε) from the generator (x itself for k = 0)."""
        if self.noise_ratio == 0:
            return x.clone()
        return random_start(x, self.noise_ratio * self.eps, "linf", self.generator)

    def step_fn(self, x: torch.Tensor) -> StepFn:
        """x' = clip_[0,1](x_t + α·sign(∇)): the signed step without the ε-ball's projection."""
        alpha = self.step_size
        return lambda x_adv, grad: (x_adv + alpha * grad.sign()).clamp(0, 1)
