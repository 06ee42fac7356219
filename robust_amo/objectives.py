"""Training objectives: plain functions ``(model, x, y) -> (loss, logits)``.

The trainer knows nothing of methods: it asks :func:`build_objective` for a callable and
back-propagates the loss it returns. A method registers a builder with
:func:`register_objective`, together with a dataclass of its options (filled from the config's
``method_args``, unknown keys rejected).

- ``standard``: cross-entropy on clean inputs.
- ``pgd``: Madry et al. 2018, cross-entropy on PGD adversarial examples found in eval mode
  (ALGORITHMS.md, "PGD").
- ``amo``, ``robust-amo``, ``jacobian-lm``: the papers' methods, in :mod:`robust_amo.methods`
  (imported at the end of this module so that the registry is always complete).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, TrainConfig, from_dict

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ObjectiveSpec:
    """How to build a method's objective and which options it takes."""

    build: Callable[..., Objective]
    options: type | None


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, options: type | None = None):
    """Register ``build(cfg, attack, options) -> Objective`` under method ``name``."""

    def deco(fn: Callable[..., Objective]) -> Callable[..., Objective]:
        OBJECTIVES[name] = ObjectiveSpec(fn, options)
        return fn

    return deco


def method_options(cfg: TrainConfig) -> Any:
    """The method's options dataclass from ``cfg.method_args`` (None for option-less methods)."""
    if cfg.method not in OBJECTIVES:
        raise ConfigError(
            f"method: unknown training method {cfg.method!r}; known methods: "
            f"{', '.join(sorted(OBJECTIVES))}"
        )
    spec = OBJECTIVES[cfg.method]
    if spec.options is None:
        if cfg.method_args:
            raise ConfigError(
                f"method_args: method {cfg.method!r} takes no options, got "
                f"{', '.join(sorted(cfg.method_args))}"
            )
        return None
    return from_dict(spec.options, cfg.method_args, prefix="method_args.")


def build_objective(cfg: TrainConfig, attack: Callable | None) -> Objective:
    """The objective of ``cfg.method`` bound to the training attack and the method's options."""
    opts = method_options(cfg)
    return OBJECTIVES[cfg.method].build(cfg, attack, opts)


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Mean cross-entropy of the clean batch. Returns (loss, logits)."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


def pgd_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: Callable):
    """Madry PGD training loss: mean cross-entropy at ``attack(x, y)`` (train mode).

    Returns:
        (loss, logits of the adversarial batch).
    """
    x_adv = attack(x, y)
    logits = model(x_adv)
    return F.cross_entropy(logits.float(), y), logits


@register_objective("standard")
def _build_standard(cfg: TrainConfig, attack, options) -> Objective:
    return standard_loss


@register_objective("pgd")
def _build_pgd(cfg: TrainConfig, attack, options) -> Objective:
    return functools.partial(pgd_loss, attack=attack)


# registers amo, robust-amo and jacobian-lm; at the end because methods imports this module
from . import methods  # noqa: E402, F401
