"""A training config, resolved and checked: the schema, then the names the registries hold.

:func:`robust_amo.config.load_config` checks what the YAML schema can (keys, types, ranges);
:func:`resolve` also checks the names only the registries know (architecture, dataset, method
options), so the CLI, the studies and Python callers all get the same one-line errors before
any work. It sits above the registries and below the trainer, which re-checks a config built by
hand with :func:`check_names`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig, load_config
from .data import normalize_dataset_name
from .errors import ConfigError, DataError, UnknownModelError
from .methods import method_options
from .models import is_registered, list_models


def resolve(
    config_file: str | Path | None = None, overrides: list[dict[str, Any]] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then each override mapping in order; fully checked.

    Args:
        config_file: a YAML file (``configs/*.yaml``) or None for the defaults.
        overrides: mappings merged on top in order (the CLI's flags and ``--set``).

    Raises:
        ConfigError, UnknownModelError: naming the key and the allowed values.
    """
    cfg = load_config(config_file, overrides)
    check_names(cfg)
    return cfg


def check_names(cfg: TrainConfig) -> None:
    """The config's architecture, dataset and method (with its options) exist.

    Raises:
        UnknownModelError: an unknown ``arch`` (the message lists the known ones).
        ConfigError: an unknown ``dataset`` or ``method``, or bad ``method_args``.
    """
    if not is_registered(cfg.arch):
        raise UnknownModelError(
            f"arch: unknown architecture {cfg.arch!r}; known architectures: "
            f"{', '.join(list_models())} (see `robust-amo archs`)"
        )
    try:
        normalize_dataset_name(cfg.dataset)
    except DataError as e:
        raise ConfigError(f"dataset: {e}") from None
    method_options(cfg)
