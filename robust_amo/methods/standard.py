"""Standard training: cross-entropy on the clean batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import MethodContext, Objective, register_method


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the clean batch. Returns (loss, logits)."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


@register_method("standard")
def build(options: None, ctx: MethodContext) -> Objective:
    """``standard``: no options, no attack."""
    return standard_loss
