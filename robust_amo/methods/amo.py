"""Clean AMO (Wei & Ma 2020, Algorithm 1 PERTURBEDUPDATE): train at an all-layer adversary.

docs/algorithms.md, "Clean AMO": t ascent steps on δ for the clean input, then the weight update
at the final δ. With η_p = 0 it is exactly standard training.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.config import DeltaGrad, check_choice
from robust_amo.distributed import global_batch
from robust_amo.errors import ConfigError
from robust_amo.perturb import delta_step, perturb
from robust_amo.runtime import wide

from .registry import MethodContext, Objective, register_method
from .validation import non_negative


@dataclass
class AMOOptions:
    """``method_args`` of ``amo`` (docs/algorithms.md "Clean AMO", Algorithm 1).

    Attributes:
        steps: t, δ ascent steps per batch (default 1).
        eta_p: η_perturb, the δ step size (default 0.01).
        lam: λ, δ's weight decay in the ascent (default 0).
        delta_grad: ∇δ of the batch-mean (default, the authors' code) or batch-sum loss.
    """

    steps: int = 1
    eta_p: float = 0.01
    lam: float = 0.0
    delta_grad: DeltaGrad = "mean"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"method_args.steps must be >= 0, got {self.steps}")
        non_negative("method_args.eta_p", self.eta_p)
        non_negative("method_args.lam", self.lam)


@contextlib.contextmanager
def keep_bn_statistics(model: nn.Module) -> Iterator[None]:
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
    delta_grad: DeltaGrad = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean AMO training loss.

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
    check_choice("delta_grad", delta_grad, DeltaGrad)
    x = x.detach()
    shrink = 1.0 - eta_p * lam
    with perturb(model, requires_grad=steps > 0) as p:
        if steps > 0:
            with keep_bn_statistics(model), torch.enable_grad():
                for _ in range(steps):
                    logits = model(x)
                    loss = F.cross_entropy(wide(logits), y, reduction="sum")
                    if delta_grad == "mean":  # mean over the global batch (see global_batch)
                        loss = loss / global_batch(len(y))
                    grads = torch.autograd.grad(loss, p.deltas)
                    p.deltas = delta_step(p.deltas, grads, eta_p, shrink)
            p.deltas = p.detached()
        logits = model(x)
    return F.cross_entropy(wide(logits), y), logits


@register_method("amo", options=AMOOptions)
def build(options: AMOOptions, ctx: MethodContext) -> Objective:
    """``amo``: no input attack; the δ ascent is the method itself."""
    return functools.partial(amo_loss, steps=options.steps, eta_p=options.eta_p,
                             lam=options.lam, delta_grad=options.delta_grad)
