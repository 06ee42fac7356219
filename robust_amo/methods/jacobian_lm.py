"""Jacobian large-margin training (Sokolić et al. 2017, eq. 26 and Section V).

docs/algorithms.md, "Jacobian large-margin regularizer": task loss (multi-class hinge or
cross-entropy) + λ_LM · mean_i Σ_c ‖∇_x F(x_i)_c‖₂ / ‖v_c‖₂, differentiated through by double
backpropagation. The penalty is also what the robustness integration's regularizer adds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import margin_loss
from robust_amo.config import check_choice
from robust_amo.perturb import unwrap
from robust_amo.runtime import to_device, wide

from .registry import MethodContext, Objective, register_method
from .validation import non_negative

Variant = Literal["all", "random"]
"""Sum the penalty over every class (the paper's CNNs) or take one random class (its DNNs)."""
TaskLoss = Literal["hinge", "ce"]
VJPMode = Literal["loop", "batched"]
"""C backward passes, or one vmapped backward over the C one-hot cotangents."""


@dataclass
class JacobianLMOptions:
    """``method_args`` of ``jacobian-lm`` (docs/algorithms.md "Jacobian large-margin regularizer").

    Attributes:
        lam_lm: λ_LM, the weight of the batch-mean penalty (default 0.1).
        variant: ``"all"`` (default) or ``"random"``.
        task_loss: ``"hinge"`` (default, the paper's) or ``"ce"``.
        frobenius: weight of ‖V‖²_F of the classifier matrix (default 0).
        vjp: ``"loop"`` (default) or ``"batched"``.
    """

    lam_lm: float = 0.1
    variant: Variant = "all"
    task_loss: TaskLoss = "hinge"
    frobenius: float = 0.0
    vjp: VJPMode = "loop"

    def __post_init__(self) -> None:
        non_negative("method_args.lam_lm", self.lam_lm)
        non_negative("method_args.frobenius", self.frobenius)


def _class_gradient_norms(
    logits: torch.Tensor, x: torch.Tensor, create_graph: bool, vjp: VJPMode
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
    variant: Variant,
    generator: torch.Generator | None,
    create_graph: bool,
    vjp: VJPMode,
) -> torch.Tensor:
    """The eq. (26) term per example (B,) from logits computed from ``x`` (requires grad)."""
    check_choice("variant", variant, Variant)
    check_choice("vjp", vjp, VJPMode)
    v_norm = torch.linalg.vector_norm(wide(weight), dim=1)  # ‖v_c‖₂ (C,)
    logits = wide(logits)
    if variant == "all":
        return (_class_gradient_norms(logits, x, create_graph, vjp) / v_norm).sum(1)
    gdev = generator.device if generator is not None else torch.device("cpu")
    cls = torch.randint(logits.shape[1], (logits.shape[0],), generator=generator, device=gdev)
    cls = to_device(cls, logits.device)  # no host wait per training step on CUDA
    picked = logits.gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return torch.linalg.vector_norm(wide(g.flatten(1)), dim=1) / v_norm[cls]


def jacobian_penalty(
    model: nn.Module,
    x: torch.Tensor,
    *,
    variant: Variant = "all",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    vjp: VJPMode = "loop",
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
    return F.relu(margin + margin_loss(wide(logits), y)).mean()


def jacobian_lm_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam_lm: float,
    variant: Variant = "all",
    task_loss: TaskLoss = "hinge",
    frobenius: float = 0.0,
    generator: torch.Generator | None = None,
    vjp: VJPMode = "loop",
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
    check_choice("task_loss", task_loss, TaskLoss)
    x = x.detach().requires_grad_(lam_lm > 0)
    logits = model(x)
    task = multiclass_hinge(logits, y) if task_loss == "hinge" else F.cross_entropy(
        wide(logits), y)
    loss = task
    weight = unwrap(model).classifier.weight
    if lam_lm > 0:
        pen = _penalty_from_logits(logits, x, weight, variant, generator, True, vjp)
        loss = loss + lam_lm * pen.mean()
    if frobenius > 0:
        loss = loss + frobenius * wide(weight).pow(2).sum()
    return loss, logits


@register_method("jacobian-lm", options=JacobianLMOptions)
def build(options: JacobianLMOptions, ctx: MethodContext) -> Objective:
    """``jacobian-lm``: no input attack; the random classes come from the method's generator,
    which the trainer reseeds every epoch, so a resumed run draws the same classes."""
    return functools.partial(jacobian_lm_loss, lam_lm=options.lam_lm, variant=options.variant,
                             task_loss=options.task_loss, frobenius=options.frobenius,
                             generator=ctx.generator, vjp=options.vjp)
