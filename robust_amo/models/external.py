"""Models the user brings: ``FILE.py:FN`` or ``package.module:FN``, wrapped so that every
project tool (attacks, evaluation, margins, training) sees a model taking inputs in [0, 1].

Loading a module file **runs the user's code** (that is the point: FN builds the network); the
CLI's help says so. FN returns an ``nn.Module`` mapping (B, C, H, W) to logits (B, num_classes)
and is called with ``num_classes=`` when it accepts it. :class:`ExternalModel` normalises inside
(``mean``/``std``, for a model trained on normalised inputs) so attacks still work in pixel space,
and declares perturbation points for the all-layer margins: the model's own
``perturbation_points()`` if it has one, else the modules named by ``points``, else every
``Conv2d`` and ``Linear`` output in registration order except the last ``Linear`` (the
classifier, which Jacobian-LM's penalty reads). docs/evaluation.md, "Your own model";
``robust-amo train --model`` trains such a model (docs/config.md, "Your own architecture").
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.errors import ConfigError

from .base import Normalize


def _short(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        # sys.exit(code) in the user's code: say so, since the code alone reads like a number
        return f"it called sys.exit({e.code!r})"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


USER_CODE_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit)
"""What running the user's code may raise that is the user's to fix: any exception, and
``SystemExit`` (``sys.exit`` at import or in FN would otherwise end the command with its code
and no message). ``KeyboardInterrupt`` is the person at the keyboard, never caught here."""


def load_factory(spec: str) -> Callable[..., Any]:
    """The function ``FN`` of ``FILE.py:FN`` or ``package.module:FN`` (runs the module's code).

    Raises:
        ConfigError: no ``:FN``, a file that does not exist, a module that fails to import, or
            no callable FN in it.
    """
    where, sep, fn = spec.rpartition(":")
    if not sep or not where or not fn.isidentifier():
        raise ConfigError(f"model {spec!r}: expected FILE.py:FN or package.module:FN, e.g. "
                          "my_models.py:build", params=("model",))
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"model {spec!r}: the file {path} does not exist",
                              params=("model",))
        name = f"robust_amo_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"model {spec!r}: {path} is not a Python file",
                              params=("model",))
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except USER_CODE_ERRORS as e:  # the user's code: any error is theirs to fix
            sys.modules.pop(name, None)
            raise ConfigError(f"model {spec!r}: running {path} failed ({_short(e)})",
                              params=("model",)) from None
    else:
        try:
            module = importlib.import_module(where)
        except USER_CODE_ERRORS as e:
            raise ConfigError(f"model {spec!r}: cannot import {where} ({_short(e)}); is it "
                              "installed or on PYTHONPATH?", params=("model",)) from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and not inspect.isclass(v)
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"model {spec!r}: {where} has no function {fn} (functions: "
                          f"{', '.join(found) or 'none'})", params=("model",))
    return factory


def _accepts_num_classes(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


class ExternalModel(nn.Module):
    """A user's network behind the project's input convention (see the module docstring).

    Args:
        net: the user's module (logits from normalised inputs).
        channels: C of the (C, H, W) inputs.
        mean, std: per-channel normalisation applied before ``net`` (identity when None).
        points: qualified names inside ``net`` of the perturbation points (None: the model's own
            ``perturbation_points()``, else the default rule).
        arch: the ``FILE.py:FN`` text, kept as the model's name in reports.
    """

    def __init__(self, net: nn.Module, channels: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, points: Sequence[str] | None = None,
                 arch: str = "") -> None:
        super().__init__()
        try:
            self.normalize = Normalize(mean, std, channels)
        except ValueError as e:  # a wrong length, std 0, a NaN: the caller's numbers
            raise ConfigError(f"mean and std: {e}", params=("mean", "std")) from None
        self.net = net
        self.arch = arch
        modules = dict(net.named_modules())
        if points:
            unknown = [p for p in points if p not in modules or p == ""]
            if unknown:
                names = [n for n in modules if n]
                shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)"
                                                 if len(names) > 20 else "")
                raise ConfigError(f"points: the model has no module {unknown[0]!r}; its "
                                  f"modules are {shown}", params=("points",))
            self._names = [f"net.{p}" for p in points]
        elif hasattr(net, "perturbation_points"):
            self._names = [f"net.{n}" for n, _ in net.perturbation_points()]
        else:
            self._names = [f"net.{n}" for n in default_points(net)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(self.normalize(x))

    def perturbation_points(self) -> list[tuple[str, nn.Module]]:
        """``(qualified_name, module)`` of each perturbation point, in forward order."""
        modules = dict(self.named_modules())
        return [(n, modules[n]) for n in self._names]

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (logits = classifier(features)), which Jacobian-LM's penalty
        divides by: the network's own ``classifier`` if it is an ``nn.Linear``, else its last
        ``nn.Linear`` in registration order (the one :func:`default_points` leaves out).

        Raises:
            ConfigError: the network has no ``nn.Linear``.
        """
        own = getattr(self.net, "classifier", None)
        if isinstance(own, nn.Linear):
            return own
        linear = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linear:
            # not an AttributeError: nn.Module.__getattr__ would hide this message
            raise ConfigError(f"model {self.arch!r} has no nn.Linear layer, so there is no "
                              "classifier matrix for this method; end the network with an "
                              "nn.Linear (or name it classifier)", params=("model",))
        return linear[-1]


def default_points(net: nn.Module) -> list[str]:
    """Every ``Conv2d`` and ``Linear`` of ``net`` in registration order, but the last Linear.

    Registration order stands for forward order, as in most models written as a sequence of
    layers; pass ``points`` when it does not.
    """
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        layers.remove(linear[-1])
    return layers


def build_external(spec: str, num_classes: int, input_shape: Sequence[int], *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   points: Sequence[str] | None = None) -> ExternalModel:
    """Call the user's ``FN`` and wrap its module; checks it maps inputs to (B, num_classes).

    Raises:
        ConfigError: FN cannot be loaded, raises, returns no ``nn.Module``, or returns a model
            whose output on two zero images of ``input_shape`` is not (2, num_classes).
    """
    factory = load_factory(spec)
    try:
        net = factory(num_classes=num_classes) if _accepts_num_classes(factory) else factory()
    except USER_CODE_ERRORS as e:
        raise ConfigError(f"model {spec!r}: calling it raised {_short(e)}",
                          params=("model",)) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model {spec!r} returned a {type(net).__name__}, not a "
                          "torch.nn.Module", params=("model",))
    model = ExternalModel(net, int(input_shape[0]), mean, std, points, arch=spec)
    check_output(model, input_shape, num_classes, spec)
    return model


def check_output(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                 name: str) -> None:
    """ConfigError unless ``model`` maps two zero images of ``input_shape`` to (2, C)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except USER_CODE_ERRORS as e:
        # the fix before the user's error text, which may hold the word input_shape itself
        raise ConfigError(f"model {name!r} fails on inputs of shape (2, "
                          f"{', '.join(map(str, input_shape))}) (check input_shape): "
                          f"{_short(e)}", params=("model", "input_shape")) from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model {name!r} returns {shape} for 2 inputs; expected logits of "
                          f"shape (B, num_classes) = (2, {num_classes})", params=("model",))
