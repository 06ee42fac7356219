"""Projected gradient descent (Madry et al. 2018), L∞ and L2, with restarts.

As specified in ALGORITHMS.md: random start x_0 = clip(x + U(-eps, eps)) (L∞) or a uniform point
of the L2 ball, then x_{t+1} = Π(x_t + α·step(∇ℓ)) with Π the projection onto the eps-ball
intersected with [0, 1]^d. The model runs in eval mode during the attack and its mode is restored
afterwards; gradients are taken with respect to the input only, so nothing accumulates in the
weights' ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin max_{j≠y} z_j − z_y (B,); positive iff misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - z_y


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example loss the attack ascends, in float32 even under bf16 autocast (B,)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES}")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm broadcastable to t's shape."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None
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
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        r = torch.rand(shape[0], generator=generator, device=gdev) ** (1.0 / d)
        noise = direction * (eps * r).view(-1, *([1] * (x.dim() - 1)))
    noise = noise.to(x.dtype)
    # a pinned, non-blocking copy: a pageable one would make the host wait for the GPU (a
    # CUDA generator's noise is on the GPU already and cannot be pinned)
    if x.is_cuda and not noise.is_cuda:
        noise = noise.pin_memory().to(x.device, non_blocking=True)
    return (x + noise.to(x.device)).clamp_(0, 1)


def pgd_step(
    x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, alpha: float, norm: str
) -> torch.Tensor:
    """One ascent step followed by the projection Π onto the eps-ball ∩ [0, 1]^d."""
    if norm == "linf":
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        g = grad / _flat_norm(grad).clamp_min(1e-12)
        delta = x_adv + alpha * g - x
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0, 1)


class PGD:
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
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        generator: torch.Generator | None = None,
        early_stop: bool = False,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if loss not in LOSSES:
            raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES}")
        if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
            raise ValueError("PGD needs eps >= 0, step_size >= 0, steps >= 0, restarts >= 1")
        self.model = model
        self.eps, self.step_size, self.steps = float(eps), float(step_size), int(steps)
        self.norm, self.random_start, self.restarts, self.loss = norm, random_start, restarts, loss
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.early_stop = early_stop

    def __repr__(self) -> str:
        return (
            f"PGD(norm={self.norm}, eps={self.eps:.5g}, step_size={self.step_size:.5g}, "
            f"steps={self.steps}, restarts={self.restarts}, loss={self.loss})"
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for (x, y): x (B, C, H, W) in [0, 1], y (B,) -> (B, C, H, W)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._attack(x.detach(), y)
        finally:
            self.model.train(was_training)

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.restarts == 1:
            return self.run_once(x, y)[0]
        best = x.clone()
        best_loss = torch.full((len(y),), float("-inf"), device=x.device)
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            active = (~fooled).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, fa, la = self.run_once(x[active], y[active], final_eval=True)
            # a fooling point beats any loss; among non-fooling finals the highest loss wins
            better = fa | (la > best_loss[active])
            idx = active[better]
            best[idx] = xa[better]
            best_loss[idx] = la[better]
            fooled[active] = fa
        return best

    def run_once(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        final_eval: bool = False,
        x_init: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart.

        Args:
            x: clean inputs (B, ...); y: labels (B,).
            final_eval: evaluate the final iterate (one more forward) to report its loss and
                whether it is misclassified.
            x_init: the starting point x_0 (B, ...), a point of the eps-ball around x in
                [0, 1]; replaces the attack's own start (evaluation draws it per example so
                that it does not depend on the batch, see evaluation/pgd_eval.py).

        Returns:
            ``(x_adv, fooled, loss)``: the point kept per example, whether a misclassified
            iterate was found (``early_stop`` or ``final_eval`` only, else all False), and its
            loss (−inf where not evaluated).
        """
        if x_init is not None:
            x_adv = x_init.detach().clone()
        elif self.random_start:
            x_adv = random_start(x, self.eps, self.norm, self.generator)
        else:
            x_adv = x.clone()
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        loss_out = torch.full((len(y),), float("-inf"), device=x.device)
        track = self.early_stop or final_eval
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x_adv)
                loss = attack_loss(logits, y, self.loss)
                (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            x_adv = x_adv.detach()
            if track:
                # no `if hit.any()`: it would make the host wait for the device at every step
                hit = (logits.detach().argmax(1) != y) & ~fooled
                fooled = fooled | hit
                loss_out = torch.where(hit, loss.detach().float(), loss_out)
                # frozen examples keep the misclassified iterate
                grad = grad.masked_fill(fooled.view(-1, *([1] * (x.dim() - 1))), 0)
                stepped = pgd_step(x_adv, grad, x, self.eps, self.step_size, self.norm)
                x_adv = torch.where(fooled.view(-1, *([1] * (x.dim() - 1))), x_adv, stepped)
            else:
                x_adv = pgd_step(x_adv, grad, x, self.eps, self.step_size, self.norm)
        if final_eval:
            with torch.no_grad():
                logits = self.model(x_adv)
                loss = attack_loss(logits, y, self.loss)
            hit = (logits.argmax(1) != y) & ~fooled
            fooled |= hit
            loss_out = torch.where(fooled & ~hit, loss_out, loss.float())
        return x_adv, fooled, loss_out


AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
