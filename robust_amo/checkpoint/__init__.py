"""Checkpoints: robust-amo's format (:mod:`.format`) and robustness's layout
(:mod:`.robustness_layout`), and :func:`load_checkpoint`, which reads either.

docs/checkpoints.md. Nothing here imports MadryLab's ``robustness``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robust_amo.errors import CheckpointError

from .format import (
    BEST,
    FORMAT,
    LAST,
    SAFE_GLOBALS,
    UNSAFE_FLAG,
    VERSION,
    Which,
    atomic_save,
    build_checkpoint,
    check_fields,
    check_native,
    is_native,
    load_native,
    model_from_checkpoint,
    model_state,
    pack_state,
    read_file,
    resolve_path,
    rng_state,
    set_rng_state,
)
from .robustness_layout import (
    convert_checkpoint,
    from_robustness,
    is_robustness_checkpoint,
    read_checkpoint,
    to_robustness,
)
from .weights import load_weights, match_state, state_dict_of


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    which: Which | str = "last",
    *,
    arch: str | None = None,
    dataset: str | None = None,
    unsafe_load: bool = False,
) -> dict[str, Any]:
    """Load and check a robust-amo checkpoint, or convert a robustness one on the fly.

    A checkpoint of MadryLab's robustness holding one of our architectures is converted
    (:func:`from_robustness`, which does not import robustness); it needs ``arch`` and
    ``dataset`` unless it records them.

    Args:
        path: a ``.pt`` file or a run folder (ours, or robustness's ``out_dir``).
        map_location: where tensors are loaded (default CPU).
        which: checkpoint of a run folder: ``"last"`` (checkpoint.pt) or ``"best"`` (best.pt).
        arch: architecture of a robustness checkpoint (registry name).
        dataset: dataset of a robustness checkpoint (gives the input shape).
        unsafe_load: unpickle objects other than tensors and plain containers, which runs code
            from the file (:func:`read_file`; the CLI's ``--unsafe-load``).

    Raises:
        CheckpointError: missing, truncated/corrupt, neither library's checkpoint, or a field
            that fails :func:`check_fields` (one line naming the file and the field).
    """
    p = resolve_path(path, which)
    ckpt = read_file(p, map_location, unsafe_load=unsafe_load)
    if is_native(ckpt):
        return check_native(ckpt, p)
    if is_robustness_checkpoint(ckpt):
        converted = from_robustness(ckpt, arch=arch, dataset=dataset, source=p)
        check_fields(converted, p)
        return converted
    raise CheckpointError(
        f"{p} is not a robust-amo checkpoint (no format={FORMAT!r} entry), nor a checkpoint "
        "of the robustness library"
    )


__all__ = [
    "BEST",
    "FORMAT",
    "LAST",
    "SAFE_GLOBALS",
    "UNSAFE_FLAG",
    "VERSION",
    "Which",
    "atomic_save",
    "build_checkpoint",
    "check_fields",
    "check_native",
    "convert_checkpoint",
    "from_robustness",
    "is_native",
    "is_robustness_checkpoint",
    "load_checkpoint",
    "load_native",
    "load_weights",
    "match_state",
    "model_from_checkpoint",
    "model_state",
    "pack_state",
    "read_checkpoint",
    "read_file",
    "resolve_path",
    "rng_state",
    "set_rng_state",
    "state_dict_of",
    "to_robustness",
]
