"""The result of one evaluation attack over the whole evaluation set, and its reduction.

Per-example boolean masks (gathered across ranks under torchrun by
:mod:`robust_amo.evaluation.sharding`), reduced to accuracies by :func:`summarize` only at the
end, so chunks and shards add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .attacks import EvalAttack


@dataclass
class AttackOutcome:
    """Masks and figures of one attack over the whole evaluation set (n examples)."""

    spec: EvalAttack
    clean: torch.Tensor  # (n,) bool
    robust: torch.Tensor  # (n,) bool
    steps: dict[str, torch.Tensor] = field(default_factory=dict)  # curve points -> (n,) masks
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    resumed_chunks: int = 0
    backend: str | None = None
    # the model's passes in example units (a batch of 128 is 128), work before a resume included
    forward_passes: int = 0
    backward_passes: int = 0
    # per sub-step (AutoAttack's attacks): (forward, backward)
    sub_passes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # with individual (AutoAttack): robust under each sub-attack alone, (n,) masks
    individual: dict[str, torch.Tensor] = field(default_factory=dict)
    # the adversarial points of the broken examples (clean & ~robust), in example order, when
    # kept (save_adv); None otherwise
    adv: torch.Tensor | None = None


def summarize(outcome: AttackOutcome) -> dict[str, Any]:
    """Accuracies of one attack from its masks (the reduction step)."""
    n = max(len(outcome.robust), 1)
    return {
        "clean_accuracy": outcome.clean.float().sum().item() / n,
        "robust_accuracy": outcome.robust.float().sum().item() / n,
        "n_robust": int(outcome.robust.sum()),
        "curve": {k: m.float().sum().item() / n for k, m in outcome.steps.items()},
        "individual": {k: m.float().sum().item() / n for k, m in outcome.individual.items()},
    }
