"""The pieces every input-space attack is made of, and THE PGD iteration they all run.

docs/algorithms.md, "PGD": random start x_0 = clip(x + U(−eps, eps)) (L∞) or a uniform point of
the L2 ball, then x_{t+1} = Π(x_t + α·step(∇ℓ)) with Π the projection onto the eps-ball
intersected with [0, 1]^d.

:func:`pgd_iteration` is one such step: one forward of the per-example loss, one backward of its
sum (or mean) to the input and to any extra variables (the all-layer perturbations δ of robust
AMO), then the step rule. PGD with restarts, robust AMO's joint x'/δ attack, the PGD
neighbourhood of the margins, the L2 input-margin attack and the attacker of the robustness
integration are loops around it, so their x' iterates agree bit for bit where their settings
agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.config import AttackLoss, Norm, check_choice
from robust_amo.runtime import to_device

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""``x' -> (per-example loss (B,), logits (B, C) or None)``: what an iteration ascends."""
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x', ∇x') -> next x'``: the ascent step followed by the projection."""


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin max_{j≠y} z_j − z_y (B,); positive iff misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - z_y


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: AttackLoss) -> torch.Tensor:
    """Per-example loss the attack ascends, in float32 even under bf16 autocast (B,)."""
    logits = logits.float()
    if loss == "cw":
        return margin_loss(logits, y)
    check_choice("loss", loss, AttackLoss)  # raises unless "ce"
    return F.cross_entropy(logits, y, reduction="none")


def model_loss(model: nn.Module, y: torch.Tensor, loss: AttackLoss) -> LossFn:
    """The :data:`LossFn` of ``model``'s logits at labels ``y`` (float32 attack loss)."""

    def fn(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x_adv)
        return attack_loss(logits, y, loss), logits

    return fn


def flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm of t (B, ...), shaped to broadcast against t (B, 1, ..., 1)."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor viewed as (B, 1, ..., 1) to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def random_start(
    x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None
) -> torch.Tensor:
    """A uniform point of the eps-ball around x, clipped to [0, 1].

    The noise is drawn on the generator's device (CPU by default) and moved to x's device, so the
    same seed gives the same start on every device.
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=generator, device=gdev, dtype=torch.float32)
        noise = (2 * u - 1) * eps
    else:
        d = x[0].numel()
        direction = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
        direction = direction / flat_norm(direction).clamp_min(1e-12)
        r = torch.rand(shape[0], generator=generator, device=gdev) ** (1.0 / d)
        noise = direction * per_example(eps * r, x)
    # a pinned, non-blocking copy: a pageable one would make the host wait for the GPU
    noise = to_device(noise.to(x.dtype), x.device)
    return (x + noise).clamp_(0, 1)


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    alpha: float | torch.Tensor,
    norm: Norm,
) -> torch.Tensor:
    """One ascent step followed by the projection Π onto the eps-ball ∩ [0, 1]^d.

    ``eps`` and ``alpha`` are numbers, or per-example tensors shaped (B, 1, ..., 1) in the L2
    case (the input-margin search runs every example at its own radius).
    """
    if norm == "linf":
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        g = grad / flat_norm(grad).clamp_min(1e-12)
        delta = x_adv + alpha * g - x
        delta = delta * (eps / flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0, 1)


def projected_step(
    x: torch.Tensor, eps: float | torch.Tensor, alpha: float | torch.Tensor, norm: Norm
) -> StepFn:
    """The :data:`StepFn` of :func:`pgd_step` around the clean input ``x``."""
    return lambda x_adv, grad: pgd_step(x_adv, grad, x, eps, alpha, norm)


@dataclass
class Iterate:
    """What one :func:`pgd_iteration` saw and where it went.

    Attributes:
        x: the next iterate x_{t+1} (detached).
        loss: the per-example loss at x_t (B,), detached.
        logits: the logits at x_t (detached), or None when the loss function gives none.
        extra_grads: ∇ of the reduced loss w.r.t. each extra variable (e.g. every δ_j).
        grad: ∇ of the reduced loss w.r.t. x_t (what APGD's momentum step needs besides x).
    """

    x: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor | None
    extra_grads: tuple[torch.Tensor, ...]
    grad: torch.Tensor | None = None


def pgd_iteration(
    loss_fn: LossFn,
    x_adv: torch.Tensor,
    step: StepFn,
    extra: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]] = (),
    reduction: Literal["sum", "mean"] = "sum",
) -> Iterate:
    """One PGD iteration: forward, one backward to x' (and ``extra``), the step rule.

    Args:
        loss_fn: the per-example loss at x' (:func:`model_loss`, or a caller's own, e.g. the
            robustness integration's normalised forward).
        x_adv: the current iterate x_t (B, ...).
        step: the ascent step and projection (:func:`projected_step`, or robustness's
            ``AttackerStep``).
        extra: further leaf tensors requiring grad whose gradients the same backward gives
            (robust AMO's δ's), or a function returning them, called after the forward (the
            perturbation hooks create the δ's during the first forward).
        reduction: the loss is summed (default; each example's gradient does not depend on the
            batch) or averaged over the batch before the backward (robustness's convention).

    Returns:
        :class:`Iterate`; the gradients are taken with ``torch.autograd.grad``, so nothing
        accumulates in the weights' ``.grad``.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, logits = loss_fn(x_adv)
        total = loss.sum() if reduction == "sum" else loss.mean()
        grads = torch.autograd.grad(total, [x_adv, *(extra() if callable(extra) else extra)])
    x_next = step(x_adv.detach(), grads[0])
    return Iterate(x_next, loss.detach(), None if logits is None else logits.detach(),
                   tuple(grads[1:]), grads[0])
