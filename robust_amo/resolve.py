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
from .data import fixed_info, normalize_dataset_name
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
    """The config's architecture (unless ``model`` names your own), dataset and method (with
    its options) exist, and ``data.image_size`` is one the dataset takes.

    Raises:
        UnknownModelError: an unknown ``arch`` (the message lists the known ones).
        ConfigError: an unknown ``dataset`` or ``method``, bad ``method_args``, or an
            ``image_size`` other than the size of a dataset that is not resized.
    """
    if cfg.model is None and not is_registered(cfg.arch):
        raise UnknownModelError(
            f"arch: unknown architecture {cfg.arch!r}; known architectures: "
            f"{', '.join(list_models())} (see `robust-amo archs`), or train your own with "
            "model FILE.py:FN", params=("model",)
        )
    try:
        info = fixed_info(cfg.dataset)
    except DataError as e:
        raise ConfigError(f"dataset: {e}") from None
    size = cfg.data.image_size
    if info is not None and size is not None and size != info.input_shape[-1]:
        # a fixed-size dataset is never resized: a recorded image_size would be a false fact
        c, h, w = info.input_shape
        raise ConfigError(
            f"data.image_size {size}: {normalize_dataset_name(cfg.dataset)} images are "
            f"{h}x{w} and are not resized; drop image_size (it resizes imagefolder only)",
            params=("image_size",))
    method_options(cfg)
