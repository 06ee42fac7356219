"""The registry of training methods: ``build_objective(cfg, attack) -> (model, x, y) -> (loss,
logits)``.

The trainer knows nothing of methods: it asks :func:`build_objective` for a callable and
back-propagates the loss it returns. A method file registers its builder with
:func:`register_method`, together with the dataclass of its options (filled from the config's
``method_args``, unknown keys rejected) and whether it trains on the input attack of
``cfg.attack``; a method that needs no attack is given none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robust_amo.attacks import PGD
from robust_amo.config import TrainConfig, from_dict
from robust_amo.errors import ConfigError

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(model, x, y) -> (scalar loss, logits (B, C))``: what the training step back-propagates."""


@dataclass(frozen=True)
class MethodContext:
    """What a builder gets besides its options.

    Attributes:
        attack: the training attack of ``cfg.attack`` (only for methods that declare
            ``needs_attack``; None otherwise).
        generator: the method's own randomness (e.g. Jacobian-LM's random classes); the trainer
            reseeds it every epoch, so a resumed run draws the same numbers.
    """

    attack: PGD | None
    generator: torch.Generator | None


Builder = Callable[[Any, MethodContext], Objective]


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method's objective, which options it takes, whether it needs an attack."""

    build: Builder
    options: type | None
    needs_attack: bool


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, options: type | None = None, *, needs_attack: bool = False
) -> Callable[[Builder], Builder]:
    """Register ``build(options, context) -> Objective`` as training method ``name``."""

    def deco(fn: Builder) -> Builder:
        METHODS[name] = MethodSpec(fn, options, needs_attack)
        return fn

    return deco


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; ConfigError with the known names otherwise."""
    if name not in METHODS:
        raise ConfigError(
            f"method: unknown training method {name!r}; known methods: "
            f"{', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def method_options(cfg: TrainConfig) -> Any:
    """The method's options dataclass from ``cfg.method_args`` (None for option-less methods)."""
    spec = method_spec(cfg.method)
    if spec.options is None:
        if cfg.method_args:
            raise ConfigError(
                f"method_args: method {cfg.method!r} takes no options, got "
                f"{', '.join(sorted(cfg.method_args))}"
            )
        return None
    return from_dict(spec.options, cfg.method_args, prefix="method_args.")


def build_objective(
    cfg: TrainConfig, attack: PGD | None = None, generator: torch.Generator | None = None
) -> Objective:
    """The objective of ``cfg.method`` bound to its options (and training attack).

    Args:
        cfg: the run's config (``method`` and ``method_args``).
        attack: the training attack; required by methods that need one, not passed to others.
        generator: the method's randomness (default: the attack's generator, else None).

    Raises:
        ConfigError: unknown method or options, or a method that needs an attack got none.
    """
    spec = method_spec(cfg.method)
    opts = method_options(cfg)
    if spec.needs_attack and attack is None:
        raise ConfigError(f"method {cfg.method!r} trains on adversarial examples: pass the "
                          "training attack")
    gen = generator if generator is not None else (attack.generator if attack else None)
    return spec.build(opts, MethodContext(attack if spec.needs_attack else None, gen))
