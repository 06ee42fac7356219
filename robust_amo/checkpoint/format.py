"""robust-amo's own checkpoint format: built, written atomically, read, checked.

docs/checkpoints.md. A checkpoint is a ``torch.save``'d dict with
``format == "robust-amo-checkpoint"``, built in one place (:func:`build_checkpoint`) for the
trainer and for converted robustness checkpoints alike. It is written to a temporary file in the
same folder, flushed to disk, then renamed over the old one, so a run killed while saving leaves
the previous checkpoint intact. Every file the project reads back (checkpoints of either library,
evaluation state files) goes through :func:`read_file`.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from robust_amo.errors import CheckpointError
from robust_amo.models import create_model
from robust_amo.version import __version__

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


Which = Literal["last", "best"]
"""Which checkpoint of a run folder: the last epoch's (checkpoint.pt) or the best (best.pt)."""
FILES: dict[str, str] = {"last": LAST, "best": BEST}


def resolve_path(path: str | Path, which: Which | str = "last") -> Path:
    """A checkpoint file from a file path or a run folder.

    Args:
        path: a ``.pt`` file, or a run folder of ``robust-amo train`` or of robustness's
            ``train_model`` (``checkpoint.pt.latest``/``.best``).
        which: ``"last"`` (default) or ``"best"`` (a file name inside the folder also works).
    """
    p = Path(path).expanduser()
    which = FILES.get(which, which)
    if p.is_dir():
        alt = p / ROBUSTNESS_NAMES.get(which, which)
        p = p / which if (p / which).is_file() or not alt.is_file() else alt
    if not p.is_file():
        raise CheckpointError(
            f"no checkpoint at {p}; pass a run folder written by `robust-amo train` or a .pt file"
        )
    return p


def read_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The one reader of checkpoint and state files (ours and robustness's).

    Tries ``torch.load(weights_only=True)`` first (plain containers and tensors: what
    robustness's training loop writes); a file that pickles other objects is unpickled in full.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    p = Path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as e:  # a damaged file can raise almost anything while being read
        raise _corrupt(p, e) from None
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except (AttributeError, ModuleNotFoundError) as e:
        raise CheckpointError(
            f"cannot read {p} ({type(e).__name__}: {e}); if it pickles robustness objects, "
            "load it after `import robust_amo.integrations.robustness`"
        ) from None
    except Exception as e:  # as above
        raise _corrupt(p, e) from None


def _corrupt(p: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {p} is truncated or corrupt ({type(e).__name__}: {e}); "
        "use the previous one (best.pt) or restart the run without --resume"
    )


def check_native(ckpt: Any, source: str | Path) -> dict[str, Any]:
    """``ckpt`` if it is a robust-amo checkpoint this version reads; CheckpointError otherwise."""
    if not is_native(ckpt):
        raise CheckpointError(f"{source} is not a robust-amo checkpoint (no format={FORMAT!r} "
                              "entry)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format version {ckpt['version']}, newer than this "
            f"robust-amo reads ({VERSION}); upgrade robust-amo"
        )
    return ckpt


def is_native(obj: Any) -> bool:
    """Whether ``obj`` is a robust-amo checkpoint dict (any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_native(path: str | Path, map_location: str | torch.device = "cpu",
                which: Which | str = "last") -> dict[str, Any]:
    """Load and check a robust-amo checkpoint (a ``.pt`` file or a run folder).

    Raises:
        CheckpointError: missing, truncated/corrupt, not ours, or from a newer robust-amo.
    """
    p = resolve_path(path, which)
    return check_native(read_file(p, map_location), p)


def build_checkpoint(
    *,
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    model_kwargs: Mapping[str, Any],
    dataset: str | None,
    method: str,
    model: nn.Module,
    epoch: int,
    **extra: Any,
) -> dict[str, Any]:
    """A robust-amo checkpoint dict (docs/checkpoints.md): the facts that rebuild the model,
    its weights in robustness's layout (:func:`pack_state`), and ``extra`` entries (optimizer,
    scheduler, metrics, config, RNG states of a training run; ``source`` of a conversion)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": list(input_shape),
        "mean": list(mean),
        "std": list(std),
        "model_kwargs": dict(model_kwargs),
        "dataset": dataset,
        "method": method,
        "model": pack_state({k: v.detach().cpu() for k, v in model.state_dict().items()}),
        "epoch": int(epoch),
        **extra,
        "robust_amo_version": __version__,
        "torch_version": torch.__version__,
    }


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


def load_error_summary(e: Exception) -> str:
    """One line of a ``load_state_dict`` error (it lists every mismatched key over many lines):
    the first specific one, shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
    return text if len(text) <= 160 else text[:157] + "..."


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the registered architecture of a checkpoint and load its weights (eval mode)."""
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
        raise CheckpointError(
            f"checkpoint does not match its architecture {ckpt.get('arch')!r}: "
            f"{load_error_summary(e)}"
        ) from None
    return model.eval()


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, this process's current CUDA device, numpy, random)."""
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
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # files written before: one state per GPU of the node
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this process's GPU only (see rng_state)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
