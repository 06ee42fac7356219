"""Robust AMO inside robustness's ``train_model``: an ``AttackerModel`` subclass.

During training its attack moves x' exactly as robustness's PGD does (robustness's own
``AttackerStep`` for the ``constraint``, so ``eps``, ``attack_lr``, ``attack_steps``,
``random_start`` and ``use_best`` keep their meaning) and, from the same backward
(:func:`robust_amo.attacks.pgd_iteration`), the all-layer perturbations δ by
:func:`robust_amo.perturb.delta_step`; the training forward then runs at (x', δ)
(docs/algorithms.md, "Robust AMO"). Validation attacks are robustness's plain PGD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from robustness.attacker import STEPS, AttackerModel
from robustness.datasets import DataSet

from robust_amo.attacks import pgd_iteration
from robust_amo.config import AllLayerOptions, DeltaGrad, ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.models import RobustModel
from robust_amo.perturb import delta_step, perturb
from robust_amo.runtime import eval_mode

from .architectures import check_model


class RobustAMOAttackerModel(AttackerModel):
    """robustness's ``AttackerModel`` whose training attack is robust AMO's joint x'/δ update.

    In train mode with ``make_adv=True`` (robustness's training loop) the forward runs the joint
    attack (model in eval mode during it) and returns the logits of F(x', δ) with x' and δ
    detached, so that ``train_model`` trains on ℓ(F(x', δ), y) (docs/algorithms.md "Robust AMO").
    Everything else (eval mode, ``make_adv=False``) is robustness's ``AttackerModel``: validation
    uses its plain PGD. The state dict is the parent's, so checkpoints load either way.

    Args:
        model: a registered architecture with identity normalisation (:func:`architecture`).
        dataset: the robustness dataset (its mean/std normalise inputs).
        rho: ρ, δ's shrink factor per step (default 0.92, Wei & Ma F.2).
        eta_delta: η_δ, δ's step size (default 6.4e-3, F.2). With 0 the training step is
            robustness's PGD step exactly.
        delta_grad: ``"mean"`` (default): ∇_δ of the batch-mean attack loss (robustness averages
            the loss, as the authors' code); ``"sum"``: of the summed loss.

    Attributes:
        last_adv: the x' of the latest training step (detached), for inspection.
        last_deltas: the δ's of the latest training step (detached, one per perturbation point).
            Under multi-GPU ``DataParallel`` both are set on the replicas, not on this module.
    """

    def __init__(self, model: RobustModel, dataset: DataSet, *, rho: float = 0.92,
                 eta_delta: float = 6.4e-3, delta_grad: DeltaGrad = "mean") -> None:
        check_model(model)
        options = AllLayerOptions(rho, eta_delta, delta_grad)
        super().__init__(model, dataset)
        self.options = options
        self.rho, self.eta_delta, self.delta_grad = options.rho, options.eta_delta, \
            options.delta_grad
        self.last_adv: torch.Tensor | None = None
        self.last_deltas: list[torch.Tensor | None] | None = None

    def extra_repr(self) -> str:  # noqa: D102
        return f"rho={self.rho:g}, eta_delta={self.eta_delta:g}, delta_grad={self.delta_grad}"

    def forward(self, inp: torch.Tensor, target: torch.Tensor | None = None,
                make_adv: bool = False, with_latent: bool = False, fake_relu: bool = False,
                no_relu: bool = False, with_image: bool = True, **attacker_kwargs: Any):
        """robustness's ``AttackerModel.forward``; robust AMO when training with ``make_adv``."""
        if not (make_adv and self.training):
            return super().forward(inp, target, make_adv, with_latent, fake_relu, no_relu,
                                   with_image, **attacker_kwargs)
        if target is None:
            raise ValueError("make_adv=True needs the labels (target)")
        if no_relu and fake_relu:
            raise ValueError("options no_relu and fake_relu are exclusive")
        with eval_mode(self):
            x_adv, deltas = self.joint_attack(inp, target, **attacker_kwargs)
        self.last_adv, self.last_deltas = x_adv, deltas
        with perturb(self.model, deltas, requires_grad=False):
            output = self.model(self.normalizer(x_adv), with_latent=with_latent,
                                fake_relu=fake_relu, no_relu=no_relu)
        return (output, x_adv) if with_image else output

    def _losses(self, x: torch.Tensor, target: torch.Tensor,
                custom_loss: Callable | None) -> torch.Tensor:
        xn = self.normalizer(x)
        if custom_loss is not None:
            # robustness's contract: custom_loss(model, normalised input, target) -> (losses, _)
            return custom_loss(self.model, xn, target)[0]
        return F.cross_entropy(self.model(xn).float(), target, reduction="none")

    def joint_attack(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        constraint: str | type,
        eps: float,
        step_size: float,
        iterations: int,
        random_start: bool = False,
        random_restarts: int | bool = False,
        use_best: bool = True,
        custom_loss: Callable | None = None,
        orig_input: torch.Tensor | None = None,
        do_tqdm: bool = False,
        targeted: bool = False,
        should_normalize: bool = True,
        return_image: bool = True,
        est_grad: Any = None,
        mixed_precision: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Robust AMO's joint attack with robustness's attack arguments.

        Per step, one forward of F(x', δ) and one backward of the batch-mean loss give ∇_{x'}
        and ∇_δ; x' takes robustness's step and projection for ``constraint`` (its random start,
        from torch's global RNG as in robustness) and δ ← ρ·δ + η_δ·∇_δ. With ``use_best`` the
        (x', δ) pair of the highest per-example loss is kept, the final pair included, as
        robustness does for x'. The arguments mean what they mean in robustness's
        ``Attacker.forward``; restarts, targeted attacks, gradient estimation and mixed
        precision are not part of robust AMO training and are refused.

        Returns:
            ``(x_adv, deltas)``, detached: (B, C, H, W) and one δ per perturbation point
            (``None`` entries when ``iterations == 0``).
        """
        refused = {"random_restarts": random_restarts, "targeted": targeted,
                   "est_grad": est_grad is not None, "mixed_precision": mixed_precision,
                   "should_normalize=False": not should_normalize,
                   "return_image=False": not return_image}
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ValueError(f"robust AMO training does not support {', '.join(bad)}; "
                             "use robustness's AttackerModel for such attacks")
        step_cls = STEPS[constraint] if isinstance(constraint, str) else constraint
        orig = (x if orig_input is None else orig_input).detach()
        step = step_cls(eps=eps, orig_input=orig, step_size=step_size)
        if not step.use_grad:
            raise ValueError(f"constraint {constraint!r} takes no gradient steps; robust AMO "
                             "needs one ('inf' or '2')")
        x = x.detach()
        if random_start:
            x = step.random_perturb(x)
        best: tuple[torch.Tensor, torch.Tensor, list] | None = None
        eta = self.eta_delta * (len(target) if self.delta_grad == "sum" else 1)

        def loss_fn(x_adv: torch.Tensor) -> tuple[torch.Tensor, None]:
            return self._losses(step.to_image(x_adv), target, custom_loss), None

        def step_fn(x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            return step.project(step.step(x_adv, grad))

        with perturb(self.model) as p:
            for _ in range(iterations):
                x = x.clone().detach()
                # robustness averages the loss before its backward: the same here, for x' and δ
                it = pgd_iteration(loss_fn, x, step_fn, extra=lambda: p.deltas,
                                   reduction="mean")
                if use_best:
                    best = _keep_best(best, it.loss, x, p.deltas)
                x = it.x
                p.deltas = delta_step(p.deltas, it.extra_grads, eta, self.rho)
            deltas = p.detached()
            if use_best and iterations > 0:
                with torch.no_grad():
                    losses = self._losses(step.to_image(x), target, custom_loss)
                    _, x, deltas = _keep_best(best, losses, x, deltas)
        return step.to_image(x).detach(), deltas


CONSTRAINTS = {"linf": "inf", "l2": "2"}
"""Our norms as robustness's ``constraint`` names."""


def attack_args(threat: ThreatModel) -> dict[str, Any]:
    """robustness's training-attack arguments (``args.constraint``, ``eps``, ``attack_lr``,
    ``attack_steps``, ``random_start``) of one of our threat models, so a robustness run and a
    ``robust-amo train`` run attack alike: ``Parameters({..., **attack_args(threat)})``.

    Raises:
        ConfigError: a ``cw`` loss, which robustness's attacker has no name for (it ascends
            cross-entropy unless given a ``custom_loss``).
    """
    if threat.loss != "ce":
        raise ConfigError(f"loss {threat.loss!r}: robustness's attacker ascends cross-entropy; "
                          "use loss ce", params=("loss",))
    return {"constraint": CONSTRAINTS[threat.norm], "eps": threat.eps,
            "attack_lr": threat.step_size, "attack_steps": threat.steps,
            "random_start": int(threat.random_start)}


def _keep_best(best, losses, x, deltas):
    """robustness's ``use_best`` bookkeeping, extended to carry δ with x'."""
    losses = losses.detach()
    if best is None:
        return losses.clone(), x.detach().clone(), [d.detach().clone() for d in deltas]
    b_loss, b_x, b_d = best
    better = b_loss < losses
    b_loss[better] = losses[better]
    b_x[better] = x.detach()[better]
    for bd, d in zip(b_d, deltas, strict=True):
        bd[better] = d.detach()[better]
    return b_loss, b_x, b_d
