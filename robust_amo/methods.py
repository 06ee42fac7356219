"""The papers' training methods: robust AMO, clean AMO (Wei & Ma 2020) and Jacobian-LM (Sokolić
et al. 2017), as objectives ``(model, x, y) -> (loss, logits)`` registered with the trainer.

ALGORITHMS.md is the specification; section names below refer to it.

- ``robust-amo`` ("Robust AMO"): a joint attack moves the input x' by PGD and the all-layer
  perturbations δ by δ ← ρ·δ + η_δ·∇_δ ℓ, both from ONE forward and ONE backward per step
  (:class:`RobustAMOAttack`); the weights are trained on ℓ(F(x', δ), y) with x' and δ detached
  (:func:`robust_amo_loss`). With η_δ = 0 it is exactly Madry PGD training.
- ``amo`` ("Clean AMO", Algorithm 1): t ascent steps on δ for the clean input, then the weight
  update at the final δ (:func:`amo_loss`). With η_p = 0 it is exactly standard training.
- ``jacobian-lm`` ("Jacobian large-margin regularizer", Sokolić eq. 26): task loss (multi-class
  hinge or cross-entropy) + λ_LM · mean_i Σ_c ‖∇_x F(x_i)_c‖₂ / ‖v_c‖₂, differentiated through
  by double backpropagation (:func:`jacobian_penalty`, :func:`jacobian_lm_loss`).

Every option has an options dataclass with the defaults of ALGORITHMS.md; the trainer fills it
from the config's ``method_args`` (unknown keys are errors).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import PGD, attack_loss, margin_loss, pgd_step, random_start

from .config import TrainConfig
from .data import to_device
from .distributed import global_batch
from .errors import ConfigError
from .objectives import Objective, register_objective
from .perturb import perturb, unwrap

DELTA_GRADS = ("mean", "sum")
JACOBIAN_VARIANTS = ("all", "random")
TASK_LOSSES = ("hinge", "ce")
VJP_MODES = ("loop", "batched")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16 tensors (losses under autocast), unchanged for float32/float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _nonneg(key: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"{key} must be >= 0, got {value}")


# --------------------------------------------------------------------------------------------
# Robust AMO
# --------------------------------------------------------------------------------------------


class RobustAMOAttack:
    """Joint PGD-on-x' and ascent-on-δ attack of robust AMO (Wei & Ma 2020, Sections 4-5, F.2).

    Per step s = 1..K, one forward of the perturbed model F(x', δ) and one backward of the summed
    per-example attack loss give ∇_{x'} and ∇_δ together; then
    x' ← Π(x' + α·sign(∇_{x'})) (``attacks.pgd.pgd_step``) and δ ← ρ·δ + η_δ·∇_δ.

    Args:
        model: a registered model (declares ``perturbation_points()``), inputs in [0, 1].
        eps: input radius in pixel units (default 8/255).
        step_size: α (default 2/255).
        steps: K, the number of joint steps (default 10).
        norm: ``"linf"`` (default) or ``"l2"``.
        random_start: start x' from a uniform point of the eps-ball (default True); the noise
            comes from ``generator`` exactly as in :class:`attacks.PGD`.
        loss: ``"ce"`` (default) or ``"cw"``, the per-example loss both variables ascend.
        generator: source of the random start (default: a CPU generator seeded 0).
        rho: ρ, the shrink factor of δ per step (default 0.92).
        eta_delta: η_δ, the δ step size (default 6.4e-3).
        delta_grad: ``"mean"`` (default): ∇_δ of the batch-mean loss, as the robustness library
            that the authors built on averages the loss; ``"sum"``: of the summed loss, so each
            example's step does not depend on the batch size.

    The model runs in eval mode during the attack (its mode is restored afterwards, also on
    error); δ and its update are float32 even under bf16 autocast. With ``eta_delta = 0`` every
    x' iterate is bit-identical to :class:`attacks.PGD` with the same generator state.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        loss: str = "ce",
        generator: torch.Generator | None = None,
        rho: float = 0.92,
        eta_delta: float = 6.4e-3,
        delta_grad: str = "mean",
    ) -> None:
        # the x' part is PGD's: its constructor validates the threat model and makes the generator
        pgd = PGD(model, eps, step_size, steps, norm, random_start, 1, loss, generator)
        if delta_grad not in DELTA_GRADS:
            raise ValueError(f"unknown delta_grad {delta_grad!r}; choose one of {DELTA_GRADS}")
        if not (rho >= 0 and eta_delta >= 0):
            raise ValueError(f"robust AMO needs rho, eta_delta >= 0, got {rho}, {eta_delta}")
        self.model, self.generator = model, pgd.generator
        self.eps, self.step_size, self.steps = pgd.eps, pgd.step_size, pgd.steps
        self.norm, self.random_start, self.loss = pgd.norm, pgd.random_start, pgd.loss
        self.rho, self.eta_delta, self.delta_grad = float(rho), float(eta_delta), delta_grad

    @classmethod
    def from_pgd(
        cls, pgd: PGD, rho: float = 0.92, eta_delta: float = 6.4e-3, delta_grad: str = "mean"
    ) -> RobustAMOAttack:
        """The robust AMO attack with a :class:`attacks.PGD`'s model, threat model and generator.

        The generator is shared, not copied: reseeding the PGD object's generator (as the trainer
        does every epoch) reseeds this attack too.

        Raises:
            ValueError: for ``restarts > 1`` or ``early_stop`` (training attacks have neither).
        """
        if pgd.restarts != 1 or pgd.early_stop:
            raise ValueError("robust AMO trains on one PGD run: restarts=1, early_stop=False")
        return cls(pgd.model, pgd.eps, pgd.step_size, pgd.steps, pgd.norm, pgd.random_start,
                   pgd.loss, pgd.generator, rho, eta_delta, delta_grad)

    def __repr__(self) -> str:
        return (
            f"RobustAMOAttack(norm={self.norm}, eps={self.eps:.5g}, "
            f"step_size={self.step_size:.5g}, steps={self.steps}, loss={self.loss}, "
            f"rho={self.rho:.5g}, eta_delta={self.eta_delta:.5g}, delta_grad={self.delta_grad})"
        )

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Run the joint attack on a batch.

        Args:
            x: clean inputs (B, C, H, W) in [0, 1]; y: labels (B,).

        Returns:
            ``(x_adv, deltas)``, both detached: x' (B, C, H, W) and one δ_j per perturbation
            point with its activation's shape (``None`` entries when ``steps == 0``).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            return self._attack(x.detach(), y)
        finally:
            self.model.train(was_training)

    def _attack(self, x: torch.Tensor, y: torch.Tensor):
        x_adv = random_start(x, self.eps, self.norm, self.generator) if self.random_start else x
        x_adv = x_adv.clone()
        # "mean" is the gradient of the global batch-mean loss: divide by the global batch, so
        # N data-parallel ranks take the δ step of one process with the same global batch
        scale = self.eta_delta
        if self.delta_grad == "mean":
            scale = scale / global_batch(len(y))
        with perturb(self.model) as p:
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    logits = self.model(x_adv)
                    loss = attack_loss(logits, y, self.loss)
                    # summed as in attacks.PGD (same x' bit for bit); δ's scale is set below
                    grads = torch.autograd.grad(loss.sum(), [x_adv, *p.deltas])
                x_adv = pgd_step(x_adv.detach(), grads[0], x, self.eps, self.step_size, self.norm)
                with torch.no_grad():
                    p.deltas = [self.rho * d.detach() + scale * g
                                for d, g in zip(p.deltas, grads[1:], strict=True)]
                for d in p.deltas:
                    d.requires_grad_(True)
            deltas = p.detached()
        return x_adv.detach(), deltas


def robust_amo_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: RobustAMOAttack
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust AMO training loss: mean cross-entropy of F(x', δ) from ``attack(x, y)``.

    The forward runs in the model's current mode (train, in the trainer) with x' and δ detached,
    so the backward reaches the weights only.

    Returns:
        (scalar loss, logits (B, C) of the perturbed adversarial batch).
    """
    x_adv, deltas = attack(x, y)
    with perturb(model, deltas, requires_grad=False):
        logits = model(x_adv)
    return F.cross_entropy(_wide(logits), y), logits


# --------------------------------------------------------------------------------------------
# Clean AMO
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keep_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics on exit.

    Clean AMO's δ-ascent forwards run in train mode (batch statistics, the same function as the
    weight-update forward); restoring the running statistics keeps them updated once per batch,
    as in standard training.
    """
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        and m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def amo_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 1,
    eta_p: float = 0.01,
    lam: float = 0.0,
    delta_grad: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean AMO (Wei & Ma 2020, Algorithm 1 PERTURBEDUPDATE) training loss.

    δ ← 0; ``steps`` times δ ← (1 − η_p·λ)·δ + η_p·∇_δ L with L the cross-entropy of the perturbed
    forward (batch mean for ``delta_grad="mean"``, the authors' code; batch sum for ``"sum"``,
    the per-example rule of the paper's text); then the mean cross-entropy at the final δ
    (detached). The δ steps run in the model's current mode and leave BatchNorm running
    statistics as they were.

    Args:
        model: a registered model; x: inputs (B, C, H, W) in [0, 1]; y: labels (B,).
        steps: t (default 1). eta_p: η_perturb (default 0.01). lam: λ (default 0).
        delta_grad: ``"mean"`` (default) or ``"sum"``.

    Returns:
        (scalar loss, logits (B, C) of the perturbed forward at the final δ).
    """
    if delta_grad not in DELTA_GRADS:
        raise ValueError(f"unknown delta_grad {delta_grad!r}; choose one of {DELTA_GRADS}")
    x = x.detach()
    shrink = 1.0 - eta_p * lam
    reduction = "mean" if delta_grad == "mean" else "sum"
    with perturb(model, requires_grad=steps > 0) as p:
        if steps > 0:
            with _keep_bn_statistics(model), torch.enable_grad():
                for _ in range(steps):
                    logits = model(x)
                    loss = F.cross_entropy(_wide(logits), y, reduction="sum")
                    if reduction == "mean":  # mean over the global batch (see global_batch)
                        loss = loss / global_batch(len(y))
                    grads = torch.autograd.grad(loss, p.deltas)
                    with torch.no_grad():
                        p.deltas = [shrink * d.detach() + eta_p * g
                                    for d, g in zip(p.deltas, grads, strict=True)]
                    for d in p.deltas:
                        d.requires_grad_(True)
            p.deltas = p.detached()
        logits = model(x)
    return F.cross_entropy(_wide(logits), y), logits


# --------------------------------------------------------------------------------------------
# Jacobian large-margin regularizer (Sokolić et al. 2017)
# --------------------------------------------------------------------------------------------


def _class_gradient_norms(
    logits: torch.Tensor, x: torch.Tensor, create_graph: bool, vjp: str
) -> torch.Tensor:
    """‖∇_x F(x_i)_c‖₂ for every example i and class c: (B, C).

    ``batched``: one vmapped backward over the C one-hot cotangents (``is_grads_batched``);
    ``loop``: C backward passes. Both assume examples do not interact in the forward (no
    train-mode BatchNorm), so that the gradient of Σ_i F(x_i)_c w.r.t. x_i is ∇ F(x_i)_c.
    """
    b, c = logits.shape
    if vjp == "batched":
        eye = torch.eye(c, device=logits.device, dtype=logits.dtype)
        cot = eye[:, None, :].expand(c, b, c)
        (g,) = torch.autograd.grad(logits, x, cot, is_grads_batched=True,
                                   create_graph=create_graph)
        return torch.linalg.vector_norm(g.flatten(2), dim=2).t()
    norms = []
    for k in range(c):
        (g,) = torch.autograd.grad(logits[:, k].sum(), x, create_graph=create_graph,
                                   retain_graph=True)
        norms.append(torch.linalg.vector_norm(g.flatten(1), dim=1))
    return torch.stack(norms, 1)


def _penalty_from_logits(
    logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    variant: str,
    generator: torch.Generator | None,
    create_graph: bool,
    vjp: str,
) -> torch.Tensor:
    """The eq. (26) term per example (B,) from logits computed from ``x`` (requires grad)."""
    _choice("variant", variant, JACOBIAN_VARIANTS)
    _choice("vjp", vjp, VJP_MODES)
    v_norm = torch.linalg.vector_norm(_wide(weight), dim=1)  # ‖v_c‖₂ (C,)
    logits = _wide(logits)
    if variant == "all":
        return (_class_gradient_norms(logits, x, create_graph, vjp) / v_norm).sum(1)
    gdev = generator.device if generator is not None else torch.device("cpu")
    cls = torch.randint(logits.shape[1], (logits.shape[0],), generator=generator, device=gdev)
    cls = to_device(cls, logits.device)  # no host wait per training step on CUDA
    picked = logits.gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return torch.linalg.vector_norm(_wide(g.flatten(1)), dim=1) / v_norm[cls]


def jacobian_penalty(
    model: nn.Module,
    x: torch.Tensor,
    *,
    variant: str = "all",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    vjp: str = "loop",
) -> torch.Tensor:
    """Sokolić et al. 2017 eq. (26) per example: ‖v_cᵀ J(x)‖₂ / ‖v_c‖₂ = ‖∇_x F(x)_c‖₂ / ‖v_c‖₂.

    v_c are the rows of ``model.classifier.weight``; the gradient is w.r.t. the model's input in
    [0, 1] (normalisation is part of the network).

    Args:
        model: a registered model in a mode where examples do not interact (no train-mode
            BatchNorm: the paper's CNNs and MLPs have none).
        x: inputs (B, ...).
        variant: ``"all"`` (default): sum over every class c (the paper's CNNs); ``"random"``:
            one class per example drawn from ``generator`` (the paper's DNNs).
        generator: source of the random classes (default: torch's global CPU generator).
        create_graph: keep the graph so that the penalty can be differentiated (double
            backpropagation; default True).
        vjp: ``"loop"`` (default: C backward passes, measured faster on CPU for CNNs, see
            docs/benchmarks.md) or ``"batched"`` (one vmapped backward for all C classes).

    Returns:
        the penalty per example, (B,), float32 (or float64 for a float64 model).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        return _penalty_from_logits(logits, x, unwrap(model).classifier.weight, variant,
                                    generator, create_graph, vjp)


def multiclass_hinge(logits: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean multi-class hinge loss max(0, margin − (F_y − max_{j≠y} F_j)) (Crammer-Singer)."""
    return F.relu(margin + margin_loss(_wide(logits), y)).mean()


def jacobian_lm_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam_lm: float,
    variant: str = "all",
    task_loss: str = "hinge",
    frobenius: float = 0.0,
    generator: torch.Generator | None = None,
    vjp: str = "loop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian-LM training loss (Sokolić et al. 2017, eq. 26 and Section V).

    task loss + λ_LM · mean_i penalty(x_i) + frobenius · ‖V‖²_F, with V the classifier matrix.
    One forward serves the task loss and the penalty; the backward of the returned loss goes
    through the input gradients (double backpropagation). Weight decay is the optimiser's.

    Args:
        model: a registered model; x: inputs in [0, 1]; y: labels (B,).
        lam_lm: λ_LM (the paper's grid {0, 1e-3, ..., 10} divided by the batch size applied to a
            batch sum is this weight on the batch mean).
        variant: ``"all"`` or ``"random"`` (see :func:`jacobian_penalty`).
        task_loss: ``"hinge"`` (multi-class hinge, the paper's default) or ``"ce"``.
        frobenius: weight of the squared Frobenius norm of the classifier matrix (default 0).
        generator: random classes of the ``random`` variant.
        vjp: ``"loop"`` (default) or ``"batched"`` (see :func:`jacobian_penalty`).

    Returns:
        (scalar loss, logits (B, C) of the clean batch).
    """
    _choice("task_loss", task_loss, TASK_LOSSES)
    x = x.detach().requires_grad_(lam_lm > 0)
    logits = model(x)
    task = multiclass_hinge(logits, y) if task_loss == "hinge" else F.cross_entropy(
        _wide(logits), y)
    loss = task
    weight = unwrap(model).classifier.weight
    if lam_lm > 0:
        pen = _penalty_from_logits(logits, x, weight, variant, generator, True, vjp)
        loss = loss + lam_lm * pen.mean()
    if frobenius > 0:
        loss = loss + frobenius * _wide(weight).pow(2).sum()
    return loss, logits


# --------------------------------------------------------------------------------------------
# Options and registration
# --------------------------------------------------------------------------------------------


@dataclass
class RobustAMOOptions:
    """``method_args`` of ``robust-amo`` (ALGORITHMS.md "Robust AMO"; the PGD is ``attack:``)."""

    rho: float = 0.92
    eta_delta: float = 6.4e-3
    delta_grad: str = "mean"

    def __post_init__(self) -> None:
        _nonneg("method_args.rho", self.rho)
        _nonneg("method_args.eta_delta", self.eta_delta)
        _choice("method_args.delta_grad", self.delta_grad, DELTA_GRADS)


@dataclass
class AMOOptions:
    """``method_args`` of ``amo`` (ALGORITHMS.md "Clean AMO", Algorithm 1)."""

    steps: int = 1
    eta_p: float = 0.01
    lam: float = 0.0
    delta_grad: str = "mean"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"method_args.steps must be >= 0, got {self.steps}")
        _nonneg("method_args.eta_p", self.eta_p)
        _nonneg("method_args.lam", self.lam)
        _choice("method_args.delta_grad", self.delta_grad, DELTA_GRADS)


@dataclass
class JacobianLMOptions:
    """``method_args`` of ``jacobian-lm`` (ALGORITHMS.md "Jacobian large-margin regularizer")."""

    lam_lm: float = 0.1
    variant: str = "all"
    task_loss: str = "hinge"
    frobenius: float = 0.0
    vjp: str = "loop"

    def __post_init__(self) -> None:
        _nonneg("method_args.lam_lm", self.lam_lm)
        _nonneg("method_args.frobenius", self.frobenius)
        _choice("method_args.variant", self.variant, JACOBIAN_VARIANTS)
        _choice("method_args.task_loss", self.task_loss, TASK_LOSSES)
        _choice("method_args.vjp", self.vjp, VJP_MODES)


@register_objective("robust-amo", options=RobustAMOOptions)
def _build_robust_amo(cfg: TrainConfig, attack: PGD, options: RobustAMOOptions) -> Objective:
    joint = RobustAMOAttack.from_pgd(attack, options.rho, options.eta_delta, options.delta_grad)
    return functools.partial(robust_amo_loss, attack=joint)


@register_objective("amo", options=AMOOptions)
def _build_amo(cfg: TrainConfig, attack, options: AMOOptions) -> Objective:
    return functools.partial(amo_loss, steps=options.steps, eta_p=options.eta_p,
                             lam=options.lam, delta_grad=options.delta_grad)


@register_objective("jacobian-lm", options=JacobianLMOptions)
def _build_jacobian_lm(cfg: TrainConfig, attack, options: JacobianLMOptions) -> Objective:
    # the trainer reseeds the training attack's generator every epoch: reusing it for the random
    # classes makes a resumed run draw the same classes
    gen = attack.generator if attack is not None else None
    return functools.partial(jacobian_lm_loss, lam_lm=options.lam_lm, variant=options.variant,
                             task_loss=options.task_loss, frobenius=options.frobenius,
                             generator=gen, vjp=options.vjp)
