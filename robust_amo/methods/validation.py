"""Range checks shared by the methods' options dataclasses (closed sets are ``Literal`` types,
checked by :func:`robust_amo.config.from_dict`)."""

from __future__ import annotations

from robust_amo.errors import ConfigError


def non_negative(key: str, value: float) -> None:
    """ConfigError naming ``key`` unless ``value >= 0`` (NaN is rejected too)."""
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
