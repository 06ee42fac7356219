"""Adversarial weight perturbation (Wu, Xia & Wang 2020, "Adversarial Weight Perturbation Helps
Robust Generalization", NeurIPS) on top of any adversarial method (``pgd``, ``trades``, ...).

AWP trains at the worst weights near w as well as at the worst inputs near x. Per step
(Wu et al. 2020, Algorithm 1 and Appendix D; docs/methods.md, "awp"):

1. the base method's adversarial point, found at the unperturbed weights w:
   ``point = base.adversary(x, y)`` (x', and the all-layer δ when the base has ``all_layer``);
2. one ascent step on the weights: g_l = ∇_{w_l} of the base method's own loss at the point
   (for PGD training the cross-entropy at x', for TRADES the TRADES loss), and per layer l
   v_l = γ · ‖w_l‖ · g_l / ‖g_l‖ (Frobenius norms of the whole kernel/matrix);
3. the base method's loss at w + v; its gradient, the gradient at w + v, reaches w.

What we follow from the authors' code (github.com/csdongxian/AWP, ``utils_awp.py`` and the
training scripts ``AT_AWP/train_cifar10.py`` and ``trades_AWP/train_trades_cifar.py``):

- only the weights with two or more dimensions are perturbed (conv kernels, linear matrices),
  never biases or BatchNorm's scale and shift (the reference skips every 1-D entry);
- the ascent forward runs in the model's training mode (the reference's proxy model is in
  ``train()``) and leaves the model's BatchNorm running statistics as they were (there, the
  proxy's statistics absorbed it; here the forward runs on cloned buffers);
- the step's direction is the normalised gradient: the reference takes one SGD step on a proxy
  copy and rescales the difference to γ‖w_l‖, which is g_l's direction; the same
  ``1e-20`` guards a zero gradient (then v_l = 0);
- warm-up: the reference starts AWP at epoch ``awp_warmup``: 0 for AT-AWP (PGD training, every
  epoch perturbed) and 10 for TRADES-AWP, whose epochs count from 1, so its first 9 epochs are
  plain TRADES. :data:`REFERENCE_WARMUP` holds these as the number of plain epochs.

Where we differ: the reference adds v to the weights in place, steps the optimiser at w + v and
subtracts v afterwards, which is not w again in floating point, and its weight decay acts on
w + v. Here w is never written: the forward runs through :func:`torch.func.functional_call`
with w + v (v detached) put in place of w, so the optimiser steps from w exactly with the
gradient at w + v, and weight decay acts on w.

Cost: one extra forward and backward per step (the ascent), on top of the base method's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from robust_amo.config import check_choice, finite_non_negative, from_dict
from robust_amo.distributed import all_reduce_sum, current
from robust_amo.errors import ConfigError

from .adversarial import AdversarialLoss, AdversarialObjective, AdversarialPoint, EpochAware
from .registry import METHODS, MethodContext, Objective, method_spec, register_method

log = logging.getLogger(__name__)

AWPBase = Literal["pgd", "trades"]
"""The adversarial methods AWP runs on (Wu et al. 2020: AT-AWP and TRADES-AWP)."""

REFERENCE_WARMUP: dict[str, int] = {"pgd": 0, "trades": 9}
"""Plain epochs before AWP starts, per base method, as in the authors' training scripts
(``--awp-warmup`` 0 for AT-AWP; 10 for TRADES-AWP with epochs counted from 1)."""

GRAD_EPS = 1e-20
"""Added to ‖g_l‖ before dividing, as in the reference: a zero gradient gives v_l = 0."""


@dataclass(frozen=True)
class AWPOptions:
    """``method_args`` of ``awp``.

    Attributes:
        base: the adversarial method AWP perturbs the weights of: ``pgd`` (default, AT-AWP)
            or ``trades`` (TRADES-AWP).
        base_args: the base method's own ``method_args`` (e.g. ``{"all_layer": {...}}`` for
            ``pgd``, ``{"beta": 6}`` for ``trades``), checked by the base's options class.
        gamma: γ, the size of the weight perturbation relative to each layer's norm
            (default 5e-3, Wu et al. 2020; the reference's AT-AWP script uses 1e-2 for
            PreAct-ResNet-18, its TRADES-AWP script 5e-3). 0 trains exactly as ``base``.
        warmup: epochs of plain ``base`` training before AWP starts; None (default) takes the
            reference's value for the base (:data:`REFERENCE_WARMUP`: 0 for ``pgd``, 9 for
            ``trades``).

    Raises:
        ConfigError: an unknown base, a negative or non-finite γ, a negative warm-up, or
            ``base_args`` the base method does not take.
    """

    base: AWPBase = "pgd"
    base_args: dict[str, Any] = field(default_factory=dict)
    gamma: float = 5e-3
    warmup: int | None = None

    def __post_init__(self) -> None:
        check_choice("base", self.base, AWPBase)
        object.__setattr__(self, "gamma", finite_non_negative("gamma", self.gamma))
        if self.warmup is not None and (isinstance(self.warmup, bool)
                                        or not isinstance(self.warmup, int) or self.warmup < 0):
            raise ConfigError(f"warmup must be an integer >= 0 (epochs), got {self.warmup!r}",
                              params=("warmup",))
        self.base_options()

    @property
    def warmup_epochs(self) -> int:
        """The plain epochs before AWP starts (``warmup``, or the reference's for the base)."""
        return REFERENCE_WARMUP[self.base] if self.warmup is None else self.warmup

    def base_options(self) -> Any:
        """The base method's options dataclass from ``base_args`` (None for option-less bases).

        Raises:
            ConfigError: the base method is not registered, or ``base_args`` does not fit it.
        """
        if self.base not in METHODS:
            known = ", ".join(b for b in REFERENCE_WARMUP if b in METHODS)
            raise ConfigError(f"base: method {self.base!r} is not available in this version; "
                              f"use one of {known}", params=("base",))
        spec = METHODS[self.base]
        if spec.options is None:
            if self.base_args:
                raise ConfigError(f"base_args: method {self.base!r} takes no options, got "
                                  f"{', '.join(sorted(self.base_args))}", params=("base_args",))
            return None
        try:
            # the full path, as amo's options do: an error without params is not re-prefixed
            # by the config loader, so the message already names where the key sits
            return from_dict(spec.options, self.base_args, prefix="method_args.base_args.")
        except ConfigError as e:
            raise ConfigError(str(e)) from None


def awp_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights AWP perturbs: every trainable parameter with two or more dimensions.

    These are the conv kernels and linear matrices; biases and BatchNorm's affine parameters
    (one dimension) are left alone, as in the reference (which also requires ``weight`` in the
    name: the same set for the package's architectures and for torchvision-style models).

    Args:
        model: the network (names are relative to it).

    Returns:
        ``(name, parameter)`` pairs in ``named_parameters`` order.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]


class _WithTensors(nn.Module):
    """``module`` run with some parameters or buffers replaced (:func:`torch.func.functional_call`).

    The loss functions take a model; this one is ``module`` at other tensors, which are never
    written into ``module``. It exposes ``module`` so that the all-layer hooks
    (:func:`robust_amo.perturb.perturb`) find the network inside; they run under the
    functional call as in a plain forward.
    """

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.tensors = tensors
        # the mode is the wrapped model's (set without recursing: the model keeps its own)
        self.training = module.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return torch.func.functional_call(self.module, self.tensors, args, kwargs, strict=False)


def _ddp_inner(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class WeightPerturbation:
    """The ascent step of one batch.

    Attributes:
        v: per perturbed parameter (keyed by the parameter object's ``id``, so that any
            wrapper's names reach it), v_l = γ‖w_l‖ g_l/(‖g_l‖ + 1e-20), detached.
        names: the perturbed parameters' names in the unwrapped model, in order.
        loss: the base loss at w (detached), from the ascent forward.
    """

    v: dict[int, torch.Tensor]
    names: list[str]
    loss: torch.Tensor


def weight_perturbation(model: nn.Module, loss: AdversarialLoss, x: torch.Tensor,
                        point: AdversarialPoint, y: torch.Tensor, gamma: float
                        ) -> WeightPerturbation:
    """One ascent step on the weights at the adversarial point (Wu et al. 2020, Algorithm 1).

    One forward and backward of ``loss`` in the model's current mode, on cloned buffers (the
    BatchNorm running statistics do not move), with :func:`torch.autograd.grad` (nothing is
    written into ``.grad``). Under DistributedDataParallel the forward runs on the wrapped
    module and the gradients are averaged over the ranks, so that v is the global batch's and
    the same on every rank.

    Args:
        model: the trainer's model (possibly DDP- or compile-wrapped).
        loss: the base method's outer loss ``(model, x, point, y) -> (loss, logits)``.
        x: the clean batch (B, ...); point: the adversarial point; y: labels (B,).
        gamma: γ, the perturbation's size relative to each layer's norm.

    Returns:
        the :class:`WeightPerturbation`.

    Raises:
        ConfigError: the model has no weight with two or more dimensions to perturb.
    """
    net = _ddp_inner(model)
    named = awp_parameters(net)
    if not named:
        raise ConfigError("awp: the model has no trainable weight with two or more dimensions "
                          "(conv kernel or linear matrix) to perturb; train its base method")
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with torch.enable_grad():
        value, _ = loss(_WithTensors(net, buffers), x, point, y)
        grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    with torch.no_grad():
        flat = [torch.zeros_like(p) if g is None else g.detach()
                for (_, p), g in zip(named, grads, strict=True)]
        ctx = current()
        if ctx.enabled and net is not model:
            sizes = [g.numel() for g in flat]
            total = all_reduce_sum(torch.cat([g.flatten() for g in flat])) / ctx.world_size
            flat = [t.view_as(g) for t, g in zip(total.split(sizes), flat, strict=True)]
        v = {}
        for (_, p), g in zip(named, flat, strict=True):
            w_norm = torch.linalg.vector_norm(p.detach())
            g_norm = torch.linalg.vector_norm(g)
            v[id(p)] = (gamma * w_norm / (g_norm + GRAD_EPS)) * g
    return WeightPerturbation(v, [n for n, _ in named], value.detach())


def at_weights(model: nn.Module, v: dict[int, torch.Tensor]) -> nn.Module:
    """``model`` with each perturbed weight w replaced by w + v for the forward.

    w itself is never written: the gradient of a loss through the returned module reaches w
    and is the gradient at w + v. Buffers are the model's own (a training-mode forward moves
    the BatchNorm statistics as a plain training step does).

    Args:
        model: the trainer's model (a DDP wrapper keeps its gradient all-reduce).
        v: the perturbation per parameter ``id`` (:attr:`WeightPerturbation.v`).
    """
    moved = {n: p + v[id(p)] for n, p in model.named_parameters() if id(p) in v}
    return _WithTensors(model, moved)


@dataclass
class _GainLog:
    """Sum over the epoch's AWP steps of loss(w + v) − loss(w), kept on the device."""

    total: torch.Tensor | None = None
    steps: int = 0


class AWPObjective:
    """A base method's objective with adversarial weight perturbation (Wu et al. 2020).

    The base objective keeps its adversary and its δ log: this object only replaces the base's
    loss by the loss at w + v (past the warm-up), and passes :meth:`begin_epoch`,
    :meth:`log_next` and :meth:`epoch_metrics` on. Its own metric is ``awp_loss_gain``, the
    epoch's mean of the base loss at w + v minus at w (both in training mode), which is > 0
    while AWP is active.

    Args:
        base: the base method's objective (its builder's result).
        gamma: γ (:class:`AWPOptions`).
        warmup: epochs (counted from 0) of plain base training before AWP starts.
    """

    def __init__(self, base: AdversarialObjective, gamma: float, warmup: int) -> None:
        self.base = base
        self.gamma = float(gamma)
        self.warmup = int(warmup)
        self.base_loss: AdversarialLoss = base.loss
        base.loss = self._loss
        # until the trainer says which epoch it is, AWP is on (a direct call asks for it)
        self.epoch = self.warmup
        self._gain = _GainLog()

    @property
    def active(self) -> bool:
        """True from epoch ``warmup`` on."""
        return self.epoch >= self.warmup

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)``: the base method's loss, at w + v once past the warm-up."""
        return self.base(model, x, y)

    def _loss(self, model: nn.Module, x: torch.Tensor, point: AdversarialPoint,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return self.base_loss(model, x, point, y)
        wp = weight_perturbation(model, self.base_loss, x, point, y, self.gamma)
        loss, logits = self.base_loss(at_weights(model, wp.v), x, point, y)
        gain = (loss.detach() - wp.loss).float()
        g = self._gain
        g.total = gain if g.total is None else g.total + gain
        g.steps += 1
        return loss, logits

    def begin_epoch(self, epoch: int) -> None:
        """Switch AWP on from epoch ``warmup``; start the epoch's logs (the base's too)."""
        self.epoch = epoch
        self._gain = _GainLog()
        if isinstance(self.base, EpochAware):
            self.base.begin_epoch(epoch)

    def log_next(self) -> None:
        """Pass the trainer's "measure the next step" on to the base (its δ log)."""
        if isinstance(self.base, EpochAware):
            self.base.log_next()

    def epoch_metrics(self) -> dict[str, float | list[float]]:
        """The base's per-epoch figures and ``awp_loss_gain`` (absent in warm-up epochs)."""
        out = dict(self.base.epoch_metrics()) if isinstance(self.base, EpochAware) else {}
        g = self._gain
        if g.steps and g.total is not None:
            out["awp_loss_gain"] = round(float(g.total) / g.steps, 6)  # one sync per epoch
        return out


@register_method("awp", options=AWPOptions, needs_attack=True)
def build(options: AWPOptions, ctx: MethodContext) -> Objective:
    """``awp``: the base method's objective (built by its own builder) with AWP."""
    spec = method_spec(options.base)
    base_ctx = dataclasses.replace(ctx, attack=ctx.attack if spec.needs_attack else None)
    base = spec.build(options.base_options(), base_ctx)
    if not isinstance(base, AdversarialObjective):
        raise ConfigError(f"method_args.base: {options.base!r} is not an adversarial method "
                          "(an inner maximisation and an outer loss); use pgd or trades")
    log.info("awp on %s: gamma %g, %d warm-up epochs", options.base, options.gamma,
             options.warmup_epochs)
    return AWPObjective(base, options.gamma, options.warmup_epochs)
