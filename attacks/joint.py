"""Robust AMO's joint attack: PGD on the input x' and ascent on the all-layer perturbations δ.

Wei & Ma 2020, Sections 4–5 and Appendix F.2 (docs/algorithms.md, "Robust AMO"). Per step one
:func:`robust_amo.attacks.core.pgd_iteration` of the perturbed model F(x', δ) gives ∇_{x'} and
∇_δ from the same backward; x' takes PGD's step and δ takes
:func:`robust_amo.perturb.delta_step` with shrink ρ and step η_δ.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_amo.config import AllLayerOptions, AttackLoss, DeltaGrad, Norm, ThreatModel
from robust_amo.distributed import global_batch
from robust_amo.errors import ConfigError
from robust_amo.models import ExternalModel
from robust_amo.perturb import DeltaDtype, delta_step, perturb, unwrap

from .base import InputAttack
from .core import pgd_iteration
from .pgd import PGD


class RobustAMOAttack(InputAttack):
    """Joint PGD-on-x' and ascent-on-δ attack of robust AMO: ``x_adv, deltas = attack(x, y)``.

    Per step s = 1..K, one forward of F(x', δ) and one backward of the summed per-example attack
    loss give ∇_{x'} and ∇_δ together; then x' ← Π(x' + α·sign(∇_{x'})) and δ ← ρ·δ + η_δ·∇_δ.

    Args:
        model: a registered model (declares ``perturbation_points()``), inputs in [0, 1].
        eps: input radius in pixel units (default 8/255).
        step_size: α (default 2/255).
        steps: K, the number of joint steps (default 10).
        norm: ``"linf"`` (default) or ``"l2"``.
        random_start: start x' from a uniform point of the eps-ball (default True); the noise
            comes from ``generator`` exactly as in :class:`PGD`.
        loss: ``"ce"`` (default) or ``"cw"``, the per-example loss both variables ascend.
        generator: source of the random start (default: a CPU generator seeded 0).
        rho: ρ, the shrink factor of δ per step (default 0.92).
        eta_delta: η_δ, the δ step size (default 6.4e-3).
        delta_grad: ``"mean"`` (default): ∇_δ of the batch-mean loss, as the robustness library
            that the authors built on averages the loss; ``"sum"``: of the summed loss, so each
            example's step does not depend on the batch size.
        delta_dtype: ``"activation"`` (default): δ_j in bf16 where its activation is bf16;
            ``"wide"``: always float32 (the benchmarks' comparison row).

    δ is float32, except under bf16 autocast where each δ_j is stored in bf16 like its
    activation (``perturb(..., delta_dtype="activation")``: half the memory of δ and ∇δ); the
    norm, s·δ and the update ρ·δ + η_δ·∇δ are still formed in float32 and rounded once. With
    ``eta_delta = 0`` every x' iterate is bit-identical to :class:`PGD` with the same generator
    state.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: Norm = "linf",
        random_start: bool = True,
        loss: AttackLoss = "ce",
        generator: torch.Generator | None = None,
        rho: float = 0.92,
        eta_delta: float = 6.4e-3,
        delta_grad: DeltaGrad = "mean",
        delta_dtype: DeltaDtype = "activation",
    ) -> None:
        self._setup(model, ThreatModel(norm, eps, step_size, steps, random_start, loss),
                    AllLayerOptions(rho, eta_delta, delta_grad), generator)
        self.delta_dtype = delta_dtype

    @classmethod
    def from_threat(cls, model: nn.Module, threat: ThreatModel,
                    options: AllLayerOptions | None = None,
                    generator: torch.Generator | None = None) -> RobustAMOAttack:
        """The joint attack of a threat model and δ options (default :class:`AllLayerOptions`).

        Args:
            model: a registered model (declares ``perturbation_points()``), inputs in [0, 1].
            threat: the input attack's norm, eps, step size, steps, random start and loss.
            options: ρ, η_δ and ``delta_grad``.
            generator: source of the random start (default: a CPU generator seeded 0).
        """
        attack = cls.__new__(cls)
        attack._setup(model, threat, options or AllLayerOptions(), generator)
        return attack

    @classmethod
    def from_pgd(
        cls, pgd: PGD, rho: float = 0.92, eta_delta: float = 6.4e-3,
        delta_grad: DeltaGrad = "mean",
    ) -> RobustAMOAttack:
        """The robust AMO attack with a :class:`PGD`'s model, threat model and generator.

        The generator is shared, not copied: reseeding the PGD object's generator (as the trainer
        does every epoch) reseeds this attack too.

        Raises:
            ConfigError: for ``restarts > 1`` or ``early_stop`` (training attacks have neither).
        """
        if pgd.restarts != 1 or pgd.early_stop:
            raise ConfigError("robust AMO trains on one PGD run: restarts=1, early_stop=False")
        return cls.around(pgd, AllLayerOptions(rho, eta_delta, delta_grad))

    @classmethod
    def around(cls, attack: InputAttack, options: AllLayerOptions | None = None
               ) -> RobustAMOAttack:
        """All-layer perturbations on top of any input attack: its start, loss and step for x',
        δ ← ρ·δ + η_δ·∇_δ of that same loss from the same backward.

        ``around(PGD)`` is robust AMO; ``around`` TRADES's KL attack gives TRADES + all-layer.
        The base's model, threat model and generator are shared, not copied.

        Args:
            attack: an input attack (:class:`InputAttack`); its ``steps`` are the joint steps.
            options: ρ, η_δ and ``delta_grad`` (default :class:`AllLayerOptions`).
        """
        joint = cls.__new__(cls)
        joint._setup(attack.model, attack.threat, options or AllLayerOptions(),
                     attack.generator, base=attack)
        return joint

    def _setup(self, model: nn.Module, threat: ThreatModel, options: AllLayerOptions,
               generator: torch.Generator | None, base: InputAttack | None = None) -> None:
        InputAttack.__init__(self, model, threat, generator)
        # the input attack whose start, loss and step x' follows (default: this threat model's)
        self.base = base if base is not None else InputAttack(model, threat, self.generator)
        self.options = options
        self.rho, self.eta_delta, self.delta_grad = options.rho, options.eta_delta, \
            options.delta_grad
        self.delta_dtype: DeltaDtype = "activation"

    def saves_output(self) -> bool:
        """Whether the perturbation points save their output instead of h
        (:class:`robust_amo.perturb.PerturbPointSavingOutput`): for the package's own
        architectures, which never change a point's output in place; not for your own model
        (``models.external``), which might."""
        return not isinstance(unwrap(self.model), ExternalModel)

    def __repr__(self) -> str:
        if type(self.base) is not InputAttack:
            return (f"RobustAMOAttack(around={self.base!r}, rho={self.rho:g}, "
                    f"eta_delta={self.eta_delta:g}, delta_grad={self.delta_grad})")
        return (f"RobustAMOAttack(norm={self.norm}, eps={self.eps:.5g}, steps={self.steps}, "
                f"rho={self.rho:g}, eta_delta={self.eta_delta:g}, delta_grad={self.delta_grad})")

    def attack(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """x' and δ for a batch.

        Args:
            x: clean inputs (B, C, H, W) in [0, 1]; y: labels (B,).

        Returns:
            ``(x_adv, deltas)``, both detached: x' (B, C, H, W) and one δ_j per perturbation
            point with its activation's shape and its activation's dtype if that is bf16, else
            float32 or wider (``None`` entries when ``steps == 0``).
        """
        x_adv = self.base.start(x)
        # "mean" is the gradient of the global batch-mean loss: divide by the global batch, so
        # N data-parallel ranks take the δ step of one process with the same global batch
        scale = self.eta_delta
        if self.delta_grad == "mean":
            scale = scale / global_batch(len(y))
        # built before the hooks: a loss that reads the clean prediction (TRADES) sees the
        # unperturbed model
        loss_fn = self.base.loss_fn(x, y)
        step = self.base.step_fn(x)
        # δ in bf16 where the activation is bf16: the δ's, their gradients and the graph's saved
        # copies are the attack's memory cost over PGD (docs/benchmarks.md, "Robust AMO's memory")
        with perturb(self.model, delta_dtype=self.delta_dtype,
                     save_output=self.saves_output()) as p:
            for _ in range(self.steps):
                # summed as in PGD (same x' bit for bit); δ's scale is set above. The δ's are
                # read after the forward, whose hooks create them (zeros) on the first step
                it = pgd_iteration(loss_fn, x_adv, step, extra=lambda: p.deltas)
                x_adv = it.x
                p.deltas = delta_step(p.deltas, it.extra_grads, scale, self.rho)
            deltas = p.detached()
        return x_adv.detach(), deltas
