"""robust-amo's own checkpoint format: built, written atomically, read, checked.

docs/checkpoints.md. A checkpoint is a ``torch.save``'d dict with
``format == "robust-amo-checkpoint"``, built in one place (:func:`build_checkpoint`) for the
trainer and for converted robustness checkpoints alike. It is written to a temporary file in the
same folder, flushed to disk, then renamed over the old one, so a run killed while saving leaves
the previous checkpoint intact. Every file the project reads back (checkpoints of either library,
evaluation state files) goes through :func:`read_file`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from robust_amo.errors import CheckpointError, ConfigError
from robust_amo.models import create_model, is_registered, is_user_model
from robust_amo.outputs import write_error
from robust_amo.runs import BEST, LAST
from robust_amo.runtime import interrupts_deferred
from robust_amo.version import __version__

FORMAT = "robust-amo-checkpoint"
VERSION = 2
# Version 2 stores the weights in the layout of MadryLab's robustness (the state dict of
# DataParallel(AttackerModel)), so that robustness's make_and_restore_model(resume_path=...)
# reads a robust-amo checkpoint as it is. Version 1 stored the bare state dict.
MODEL_PREFIX = "module.model."
ATTACKER_PREFIX = "module.attacker.model."
log = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and ``os.replace``.

    A kill or a failed write (a full disk) leaves the previous file at ``path`` intact; the
    temporary file is removed here on an error and by
    :func:`robust_amo.outputs.remove_temp_files` at the next start after a kill. A Ctrl-C or
    SIGTERM during the write waits for it to finish (:func:`robust_amo.runtime.interrupts_deferred`)
    and then interrupts as usual, with the new file in place.

    Raises:
        OutputError: the file could not be written (a full disk, naming the OS error:
            :func:`robust_amo.outputs.write_error`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        # a Ctrl-C or SIGTERM waits for the write: raised inside torch.save it would become a
        # RuntimeError or abort the process instead of stopping the run cleanly
        with interrupts_deferred():
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e, kept=path.name if path.exists() else None) from None
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


# Types a checkpoint may hold besides plain containers, tensors, numbers and strings, each needed
# by files this project reads: robust-amo 0.2.0 wrote torch.__version__ (a TorchVersion, a str
# subclass) and numpy's RNG state (an ndarray) into training checkpoints. Rebuilding these runs
# no code from the file. Nothing else is allowed unless the user asks for --unsafe-load.
SAFE_GLOBALS: tuple[Any, ...] = (
    torch.torch_version.TorchVersion,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
)
UNSAFE_FLAG = "--unsafe-load"
"""The CLI's flag for ``unsafe_load`` (library messages name the parameter)."""


def _safe_globals() -> list[Any]:
    """:data:`SAFE_GLOBALS` and numpy's array rebuilder under the names pickles give it."""
    core = getattr(np, "_core", None)  # numpy >= 2; numpy 1 has it as numpy.core
    multiarray = core.multiarray if core is not None else np.core.multiarray
    rebuild = multiarray._reconstruct
    return [*SAFE_GLOBALS, rebuild, (rebuild, "numpy.core.multiarray._reconstruct")]


def read_file(path: str | Path, map_location: str | torch.device = "cpu", *,
              unsafe_load: bool = False, advice: str | None = None,
              advice_params: tuple[str, ...] = ()) -> Any:
    """The one reader of checkpoint, weights and state files (ours and robustness's).

    docs/checkpoints.md, "Loading policy": every file is read with
    ``torch.load(weights_only=True)``, which rebuilds plain containers, tensors, numbers and
    strings and the few types in :data:`SAFE_GLOBALS`, and runs no code from the file. A file
    that pickles anything else is refused with a one-line error; only ``unsafe_load=True`` (the
    CLI's ``--unsafe-load``) unpickles it in full, which runs code from the file, with a warning.

    Args:
        path: the file.
        map_location: where tensors are loaded (default CPU).
        unsafe_load: unpickle arbitrary objects (runs code from the file; trusted files only).
        advice: what to do about a truncated or corrupt file, for the command at hand
            (default: read the run's best checkpoint, ``which="best"``).
        advice_params: the parameters ``advice`` names
            (:class:`robust_amo.errors.RobustAmoError`).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or needs full unpickling
            and ``unsafe_load`` is false.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no file at {p}; check the path")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not unsafe_load:
            raise CheckpointError(
                f"{p} holds pickled objects other than tensors and plain containers "
                f"({_refused_global(e)}); loading it would run code from the file. If you trust "
                "its source, allow it with unsafe_load", params=("unsafe_load",)
            ) from None
    except Exception as e:  # a damaged file can raise almost anything while being read
        raise _corrupt(p, e, advice, advice_params) from None
    log.warning("unsafe_load: unpickling %s in full (%s): this runs code from the file", p,
                "trusted source assumed")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except (AttributeError, ModuleNotFoundError) as e:
        raise CheckpointError(
            f"cannot read {p} ({type(e).__name__}: {e}); if it pickles robustness objects, "
            "install robustness"
        ) from None
    except Exception as e:  # as above
        raise _corrupt(p, e, advice, advice_params) from None


def _refused_global(e: Exception) -> str:
    """The name of the global torch's weights-only unpickler refused, from its long message."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|global) ([\w.]+)", str(e))
    if m:
        return f"it needs {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", str(e))
    return f"unsupported pickle operand {m.group(1)}" if m else "not a weights-only file"


DEFAULT_ADVICE = "use another checkpoint of the run (which best reads best.pt)"
"""What to do about a truncated or corrupt file, unless the command knows better."""


def _corrupt(p: Path, e: Exception, advice: str | None = None,
             advice_params: tuple[str, ...] = ()) -> CheckpointError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = first if len(first) <= 120 else first[:117] + "..."
    if advice is None:
        advice, advice_params = DEFAULT_ADVICE, ("which",)
    # the advice before the reader's own text, which may hold a parameter's name as a word
    return CheckpointError(f"{p} is truncated or corrupt; {advice} ({type(e).__name__}: {first})",
                           params=advice_params)


def check_native(ckpt: Any, source: str | Path) -> dict[str, Any]:
    """``ckpt`` if it is a robust-amo checkpoint this version reads and its fields pass
    :func:`check_fields`; CheckpointError otherwise."""
    if not is_native(ckpt):
        raise CheckpointError(f"{source} is not a robust-amo checkpoint (no format={FORMAT!r} "
                              "entry)")
    version = ckpt.get("version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format version {ckpt['version']}, newer than this "
            f"robust-amo reads ({VERSION}); upgrade robust-amo"
        )
    check_fields(ckpt, source)
    return ckpt


MODEL_FIELDS = ("arch", "num_classes", "input_shape", "model")
"""The fields that rebuild the model: :func:`model_from_checkpoint` needs every one."""

FIX = "use a checkpoint written by robust-amo train or convert-checkpoint"
"""What to do about a checkpoint whose fields are malformed (altered, or written elsewhere)."""


def _shown(value: Any) -> str:
    """A value as a message shows it: its type and a short repr."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)


def _strs(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _state(v: Any) -> bool:
    return (isinstance(v, Mapping) and len(v) > 0
            and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items()))


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


# field -> (what it must be, check); a field that is absent is checked where it is needed
_SCHEMA: dict[str, tuple[str, Any]] = {
    "version": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "arch": ("the name of a registered architecture (see robust-amo archs), or the FILE.py:FN "
             "of a model of your own",
             lambda v: isinstance(v, str) and bool(v.strip())
             and (is_registered(v) or is_user_model(v))),
    "num_classes": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "input_shape": ("three positive integers C, H, W",
                    lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                    and all(_is_int(x) and x >= 1 for x in v)),
    "mean": ("a list of finite numbers, one per channel", _optional(_numbers)),
    "std": ("a list of positive finite numbers, one per channel",
            _optional(lambda v: _numbers(v) and all(x > 0 for x in v))),
    "model_kwargs": ("a mapping of option names (strings) to values",
                     lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v)),
    "dataset": ("a dataset name (a string) or None", _optional(lambda v: isinstance(v, str))),
    "method": ("a method name (a string) or None", _optional(lambda v: isinstance(v, str))),
    "model": ("a state dict (a non-empty mapping of names to tensors)", _state),
    "epoch": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "config": ("a mapping (the training config) or None",
               _optional(lambda v: isinstance(v, Mapping))),
    "class_names": ("a list of class names (strings) or None", _optional(_strs)),
    "optimizer": ("a mapping (an optimizer state dict) or None",
                  _optional(lambda v: isinstance(v, Mapping))),
    "scheduler": ("a mapping (a scheduler state dict) or None",
                  _optional(lambda v: isinstance(v, Mapping))),
    "metrics": ("a mapping or None", _optional(lambda v: isinstance(v, Mapping))),
    "rng": ("a mapping of RNG states or None", _optional(lambda v: isinstance(v, Mapping))),
    "best_robust_acc": ("a number or None", _optional(_is_number)),
}


def _field_error(source: str | Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{source}: checkpoint field {key!r} {problem}; {FIX}")


def check_fields(ckpt: Mapping[str, Any], source: str | Path, *,
                 require: Sequence[str] = ()) -> None:
    """Check a robust-amo checkpoint's fields against the schema, before anything uses them.

    docs/checkpoints.md, "Fields": each field present has its type and values (``arch`` a
    registered name, ``input_shape`` three positive integers, ``mean``/``std`` one value per
    channel, ``class_names`` one per class, ``model`` a state dict of tensors, ...); fields
    absent are refused only when listed in ``require``. Fields this version does not know are
    left alone (a newer robust-amo may add some).

    Args:
        ckpt: the checkpoint dict.
        source: its file, named in the messages.
        require: fields that must be present (:data:`MODEL_FIELDS` to rebuild the model).

    Raises:
        CheckpointError: one line naming the file and the first bad or missing field.
    """
    for key in require:
        if key not in ckpt:
            raise _field_error(source, key, "is missing")
    for key, (wanted, ok) in _SCHEMA.items():
        if key in ckpt and not ok(ckpt[key]):
            raise _field_error(source, key, f"must be {wanted}, got {_shown(ckpt[key])}")
    config = ckpt.get("config") or {}
    for part in ("data", "attack", "eval", "optim"):  # the sections analyses read
        if not isinstance(config.get(part) or {}, Mapping):
            raise _field_error(source, f"config.{part}", f"must be a mapping, got "
                                                         f"{_shown(config[part])}")
    shape, names = ckpt.get("input_shape"), ckpt.get("class_names")
    for key in ("mean", "std"):
        values = ckpt.get(key)
        if values is not None and shape is not None and len(values) != shape[0]:
            raise _field_error(source, key, f"has {len(values)} values but input_shape "
                                            f"{list(shape)} has {shape[0]} channels")
    classes = ckpt.get("num_classes")
    if names is not None and classes is not None and len(names) != classes:
        raise _field_error(source, "class_names", f"names {len(names)} classes but "
                                                  f"num_classes is {classes}")
    model = ckpt.get("model")
    if (model is not None and ckpt.get("version", 1) >= 2
            and not any(k.startswith(MODEL_PREFIX) for k in model)):
        raise _field_error(source, "model", f"holds no {MODEL_PREFIX}* entries (format "
                                            f"version {ckpt['version']} stores the weights "
                                            "in robustness's layout)")


def is_native(obj: Any) -> bool:
    """Whether ``obj`` is a robust-amo checkpoint dict (any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_native(path: str | Path, map_location: str | torch.device = "cpu",
                which: Which | str = "last", *, unsafe_load: bool = False,
                advice: str | None = None, advice_params: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """Load and check a robust-amo checkpoint (a ``.pt`` file or a run folder), weights-only
    unless ``unsafe_load`` (:func:`read_file`, which says what ``advice`` is).

    Raises:
        CheckpointError: missing, truncated/corrupt, not ours, or from a newer robust-amo.
    """
    p = resolve_path(path, which)
    return check_native(read_file(p, map_location, unsafe_load=unsafe_load, advice=advice,
                                  advice_params=advice_params), p)


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
        "torch_version": str(torch.__version__),
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


def model_from_checkpoint(ckpt: dict[str, Any], source: str | Path = "checkpoint"
                          ) -> torch.nn.Module:
    """Rebuild the registered architecture of a checkpoint and load its weights (eval mode).

    The fields are checked first (:func:`check_fields`, requiring :data:`MODEL_FIELDS`).

    Args:
        ckpt: a robust-amo checkpoint dict.
        source: its file, named in the messages.

    Raises:
        CheckpointError: a missing or malformed field, ``model_kwargs`` the architecture does
            not take, an input shape it cannot be built for, or weights that do not fit it.
    """
    check_fields(ckpt, source, require=MODEL_FIELDS)
    arch, kwargs = ckpt["arch"], dict(ckpt.get("model_kwargs") or {})
    try:
        model = create_model(arch, ckpt["num_classes"], input_shape=ckpt["input_shape"],
                             mean=ckpt.get("mean"), std=ckpt.get("std"), **kwargs)
    except ConfigError:  # the FILE.py:FN of a model of the user's: how to load it instead
        raise
    except TypeError as e:  # a builder's complaint about a keyword it does not take
        raise _field_error(source, "model_kwargs", f"{kwargs} is not accepted by arch "
                                                   f"{arch!r} ({e})") from None
    except ValueError as e:  # a builder's complaint about the shape (too small to pool, ...)
        raise _field_error(source, "input_shape", f"{list(ckpt['input_shape'])} does not "
                                                  f"build arch {arch!r} ({e})") from None
    try:
        model.load_state_dict(model_state(ckpt))
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{source}: checkpoint does not match its architecture {arch!r}: "
            f"{load_error_summary(e)}"
        ) from None
    return model.eval()


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, this process's current CUDA device, numpy, random), as
    tensors, numbers and tuples only, so that a checkpoint holding them loads weights-only."""
    # only the current GPU's generator: under torchrun a rank drives one GPU, and
    # get_rng_state_all would create a CUDA context on every GPU of the node
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (also the numpy tuple robust-amo 0.2.0 wrote)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # files written before: one state per GPU of the node
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this process's GPU only (see rng_state)
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)
    random.setstate(state["python"])
