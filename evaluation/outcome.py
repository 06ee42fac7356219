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
    forward_passes: int = 0  # in example units, this run only (work before a resume not counted)


def summarize(outcome: AttackOutcome) -> dict[str, Any]:
    """Accuracies of one attack from its masks (the reduction step)."""
    n = max(len(outcome.robust), 1)
    return {
        "clean_accuracy": outcome.clean.float().sum().item() / n,
        "robust_accuracy": outcome.robust.float().sum().item() / n,
        "n_robust": int(outcome.robust.sum()),
        "curve": {k: m.float().sum().item() / n for k, m in outcome.steps.items()},
    }
