"""L2 PGD at a per-example radius: the attack inside the input-margin search.

The L2 input margin of Sokolić et al. 2017 (docs/algorithms.md, "All-layer margin" and the
input-margin paragraph) is estimated by a bisection on the radius r of each example; at every
radius this attack looks for a misclassified x' with ‖x' − x‖₂ ≤ r in [0, 1]^d, ascending the CW
margin from x itself (deterministic), and stops an example at its first misclassified iterate.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import model_loss, per_example, pgd_iteration, projected_step


def l2_attack_at_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radius: torch.Tensor,
    steps: int = 20,
    step_scale: float = 2.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 PGD from x with radius r_i and step step_scale·r_i/steps per example.

    The caller sets the model's mode (the margin search runs it in eval mode).

    Args:
        model: classifier; x: inputs (B, ...) in [0, 1]; y: labels (B,).
        radius: (B,) L2 radius per example.
        steps: PGD iterations (default 20).
        step_scale: the step is step_scale·r/steps (Madry et al.'s 2.5, default).

    Returns:
        ``(success (B,), ‖x' − x‖₂ (B,), x' (B, ...))``: x' is the first misclassified iterate
        where one was found, else the final iterate.
    """
    alpha = per_example(step_scale * radius / steps, x)
    step = projected_step(x, per_example(radius, x), alpha, "l2")
    loss_fn = model_loss(model, y, "cw")
    x_adv = x.clone()
    done = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        it = pgd_iteration(loss_fn, x_adv, step)
        done |= it.logits.argmax(1) != y
        x_adv = torch.where(per_example(done, x), x_adv, it.x)
    with torch.no_grad():
        done |= model(x_adv).argmax(1) != y
    return done, (x_adv - x).flatten(1).norm(dim=1), x_adv
