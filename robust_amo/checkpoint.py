"""Checkpoints: written atomically, loaded with clear errors. Format: docs/checkpoints.md.

A checkpoint is a ``torch.save``'d dict with ``format == "robust-amo-checkpoint"``. It is written
to a temporary file in the same folder, flushed to disk, then renamed over the old one, so a run
killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT = "robust-amo-checkpoint"
VERSION = 2
# Version 2 stores the weights in the layout of MadryLab's robustness (the state dict of
# DataParallel(AttackerModel)), so that robustness's make_and_restore_model(resume_path=...)
# reads a robust-amo checkpoint as it is. Version 1 stored the bare state dict.
MODEL_PREFIX = "module.model."
ATTACKER_PREFIX = "module.attacker.model."
LAST = "checkpoint.pt"
BEST = "best.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# what robustness.train.train_model writes into its out_dir, for LAST and BEST
ROBUSTNESS_NAMES = {LAST: "checkpoint.pt.latest", BEST: "checkpoint.pt.best"}


def resolve_path(path: str | Path, which: str = LAST) -> Path:
    """A checkpoint file from a file path or a run folder (``which``: checkpoint.pt or best.pt).

    A folder written by robustness's ``train_model`` (``checkpoint.pt.latest``/``.best``) is a run
    folder too.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        alt = p / ROBUSTNESS_NAMES.get(which, which)
        p = p / which if (p / which).is_file() or not alt.is_file() else alt
    if not p.is_file():
        raise CheckpointError(
            f"no checkpoint at {p}; pass a run folder written by `robust-amo train` or a .pt file"
        )
    return p


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    which: str = LAST,
    *,
    arch: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Load and check a robust-amo checkpoint (or convert a robustness one).

    A checkpoint of MadryLab's robustness holding one of our architectures is converted on the
    fly (:func:`robust_amo.robustness_checkpoint.from_robustness`, which does not import
    robustness); it needs ``arch`` and ``dataset`` unless it records them.

    Args:
        path: a ``.pt`` file or a run folder.
        map_location: where tensors are loaded (default CPU).
        which: file inside a run folder: ``checkpoint.pt`` (last) or ``best.pt``.
        arch: architecture of a robustness checkpoint (registry name).
        dataset: dataset of a robustness checkpoint (gives the input shape).

    Raises:
        CheckpointError: missing, truncated/corrupt, or not a robust-amo checkpoint.
    """
    p = resolve_path(path, which)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt ({type(e).__name__}: {e}); "
            "use the previous one (best.pt) or restart the run without --resume"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        from .robustness_checkpoint import from_robustness, is_robustness_checkpoint

        if is_robustness_checkpoint(ckpt):
            return from_robustness(ckpt, arch=arch, dataset=dataset)
        raise CheckpointError(
            f"{p} is not a robust-amo checkpoint (no format={FORMAT!r} entry), nor a checkpoint "
            "of the robustness library"
        )
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format version {ckpt['version']}, newer than this robust-amo "
            f"reads ({VERSION}); upgrade robust-amo"
        )
    return ckpt


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare model state dict in robustness's ``DataParallel(AttackerModel)`` layout.

    The model keeps its own normalisation (``module.model.normalize.*``); robustness's two
    normalisers get identity buffers so inputs are not normalised twice. ``module.model.*`` and
    ``module.attacker.model.*`` hold the same tensor objects, which ``torch.save`` stores once.
    """
    channels = state["normalize.mean"].numel()
    identity = {"new_mean": torch.zeros(channels, 1, 1), "new_std": torch.ones(channels, 1, 1)}
    out: dict[str, torch.Tensor] = {}
    for owner in ("module.normalizer.", "module.attacker.normalize."):
        for k, v in identity.items():
            out[owner + k] = v
    for k, v in state.items():
        out[MODEL_PREFIX + k] = v
        out[ATTACKER_PREFIX + k] = v
    return out


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bare model state dict of a robust-amo checkpoint (any format version)."""
    sd = ckpt["model"]
    if ckpt.get("version", 1) < 2:
        return dict(sd)
    return {k[len(MODEL_PREFIX):]: v for k, v in sd.items() if k.startswith(MODEL_PREFIX)}


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the registered architecture of a checkpoint and load its weights (eval mode)."""
    from .models import create_model

    try:
        model = create_model(
            ckpt["arch"],
            ckpt["num_classes"],
            input_shape=ckpt["input_shape"],
            mean=ckpt["mean"],
            std=ckpt["std"],
            **ckpt.get("model_kwargs", {}),
        )
        model.load_state_dict(model_state(ckpt))
    except (KeyError, RuntimeError) as e:
        # load_state_dict lists every mismatched key over many lines: keep one line
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointError(
            f"checkpoint does not match its architecture {ckpt.get('arch')!r}: {detail}"
        ) from None
    return model.eval()


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, this process's current CUDA device, numpy, random)."""
    import random

    import numpy as np

    # only the current GPU's generator: under torchrun a rank drives one GPU, and
    # get_rng_state_all would create a CUDA context on every GPU of the node
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # files written before: one state per GPU of the node
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this process's GPU only (see rng_state)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
