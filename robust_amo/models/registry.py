"""Model registry in the style of timm: ``@register_model`` and ``create_model(name)``.

Names are normalised (lower case, ``_`` and spaces read as ``-``), so ``WRN_28_10`` and
``wrn28-10`` are the same model. Patterned families (``wrnD-K``, ``mlpL``) are registered with a
regular expression whose groups are passed to the builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError, UnknownModelError
from .base import RobustModel

Builder = Callable[..., RobustModel]

_EXACT: dict[str, Builder] = {}
_PATTERNS: list[tuple[re.Pattern[str], str, Builder]] = []


def normalize_name(name: str) -> str:
    """Canonical spelling of an architecture name (``WRN_28_10`` -> ``wrn28-10``)."""
    n = name.strip().lower().replace("_", "-").replace(" ", "-")
    m = re.fullmatch(r"(wrn|wide-?resnet)-?(\d+)-(\d+)", n)
    if m:
        return f"wrn{m.group(2)}-{m.group(3)}"
    return n


def register_model(
    name: str | None = None, *, pattern: str | None = None, example: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator that registers a builder under ``name`` (default: the function name).

    Args:
        name: registry name; underscores in a function name become dashes.
        pattern: a regular expression instead of a fixed name; its groups are passed to the
            builder as positional arguments before the keyword arguments.
        example: how a patterned family is shown in ``list_models``.
    """

    def deco(fn: Builder) -> Builder:
        if pattern is not None:
            _PATTERNS.append((re.compile(pattern), example or pattern, fn))
        else:
            key = normalize_name(name or fn.__name__)
            if key in _EXACT:
                raise ValueError(f"model {key!r} registered twice")
            _EXACT[key] = fn
        return fn

    return deco


def is_registered(name: str) -> bool:
    """Whether ``name`` (after normalisation) resolves to a registered builder."""
    key = normalize_name(name)
    return key in _EXACT or any(rx.fullmatch(key) for rx, _, _ in _PATTERNS)


def is_user_model(name: str) -> bool:
    """Whether ``name`` is a ``FILE.py:FN`` (or ``package.module:FN``) of the user's rather than
    a registered name: what a run of ``train`` with ``model`` records as its ``arch``."""
    return ":" in name and not is_registered(name)


def list_models() -> list[str]:
    """Registered names, then the patterned families as examples (e.g. ``wrnD-K``)."""
    return sorted(_EXACT) + [ex for _, ex, _ in _PATTERNS]


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> RobustModel:
    """Build a registered architecture.

    Args:
        name: registry name, e.g. ``"wrn28-10"``, ``"preact-resnet18"``, ``"mnist-cnn2"``.
        num_classes: number of logits C (default 10).
        input_shape: (C, H, W) of the inputs, in [0, 1] (default CIFAR's (3, 32, 32)).
        mean: per-channel normalisation mean applied inside the model (default: none).
        std: per-channel normalisation std (default: none).
        **kwargs: architecture-specific options (e.g. ``dropout`` for WRNs).

    Returns:
        the model, with ``model.arch`` set to the canonical name.

    Raises:
        UnknownModelError: naming the known architectures.
        ConfigError: ``name`` is a ``FILE.py:FN`` of the user's (the ``arch`` a run of
            ``train`` with ``model`` records): saying to load it as a model with weights.
    """
    key = normalize_name(name)
    if is_user_model(name):
        # a run of `train` with a model of the user's own records its FILE.py:FN as arch; a
        # checkpoint never imports code by itself, so the caller has to name it
        raise ConfigError(
            f"architecture {name!r} is code of your own, which a checkpoint never runs by "
            f"itself; load it with model {name} and weights RUN/best.pt",
            params=("model", "weights"))
    if not is_registered(key):
        raise UnknownModelError(
            f"unknown architecture {name!r}; known architectures: {', '.join(list_models())} "
            "(see `robust-amo archs`)"
        )
    common = dict(num_classes=num_classes, input_shape=tuple(input_shape), mean=mean, std=std)
    if key in _EXACT:
        model = _EXACT[key](**common, **kwargs)
    else:
        for rx, _, fn in _PATTERNS:  # pragma: no branch (is_registered found one)
            m = rx.fullmatch(key)
            if m:
                model = fn(*m.groups(), **common, **kwargs)
                break
    model.arch = key
    return model
