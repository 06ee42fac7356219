"""Weights from a file into a module: a bare state dict, a checkpoint of ours or of robustness,
or the common ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers; read safely.

The file goes through :func:`~robust_amo.checkpoint.format.read_file` (``weights_only=True``;
``unsafe_load`` for files that need full unpickling). Keys are matched as given, else without a
``module.`` (DataParallel) or ``model.`` prefix; a mismatch names the first missing or unexpected
key, or the first key whose shapes differ, and both shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.errors import CheckpointError
from robust_amo.models import is_user_model

from .format import (
    BEST,
    LAST,
    MODEL_PREFIX,
    ROBUSTNESS_NAMES,
    is_native,
    model_state,
    read_file,
)

WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights")
"""Keys under which checkpoints commonly keep the state dict, tried in this order."""


def state_dict_of(obj: Any, source: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file (see the module docstring)."""
    if isinstance(obj, dict) and is_native(obj):
        state = model_state(obj)
        if is_user_model(str(obj.get("arch", ""))):
            # a run of `train --model FILE.py:FN`: the user's network is under net. (beside
            # the wrapper's identity normalisation), and its weights are what --weights means
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        return state
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state = obj
    else:
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj, dict) and
                      isinstance(obj.get(k), dict)), None)
        if inner is None or not all(torch.is_tensor(v) for v in inner.values()):
            kind = f"keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else \
                type(obj).__name__
            raise CheckpointError(f"{source} holds no state dict of tensors ({kind}); save "
                                  "model.state_dict() with torch.save")
        state = inner
    if any(k.startswith(MODEL_PREFIX) for k in state):  # robustness's AttackerModel layout
        state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    return dict(state)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def match_state(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path
                ) -> dict[str, torch.Tensor]:
    """``state`` with its keys fitted to ``module``'s; CheckpointError naming the mismatch."""
    want = module.state_dict()
    best = state
    for cand in (state, _strip(state, "module."), _strip(state, "model."),
                 _strip(_strip(state, "module."), "model.")):
        if set(cand) == set(want):
            best = cand
            break
        if len(set(cand) & set(want)) > len(set(best) & set(want)):
            best = cand
    missing = [k for k in want if k not in best]
    unexpected = [k for k in best if k not in want]
    if missing or unexpected:
        first = (f"the model's {missing[0]} is not in the file" if missing else
                 f"the file's {unexpected[0]} is not in the model")
        raise CheckpointError(f"weights {source} do not fit the model: {first} ({len(missing)} "
                              f"missing, {len(unexpected)} unexpected keys); are they for this "
                              "model?")
    for k, v in want.items():
        if tuple(best[k].shape) != tuple(v.shape):
            raise CheckpointError(f"weights {source} do not fit the model: {k} has shape "
                                  f"{tuple(best[k].shape)} in the file and {tuple(v.shape)} in "
                                  "the model")
    return best


def load_weights(module: nn.Module, path: str | Path, *, unsafe_load: bool = False) -> None:
    """Load the weights in ``path`` into ``module`` (strict, after :func:`match_state`).

    Raises:
        CheckpointError: the file is missing or a folder (a run folder: naming its checkpoint
            files), unreadable, unsafe without ``unsafe_load``, holds
            no state dict, or does not fit ``module``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in (BEST, LAST, *ROBUSTNESS_NAMES.values()) if (p / n).is_file()]
        if found:
            raise CheckpointError(
                f"weights {p} is a run folder, not a weights file: give its file {found[0]}, "
                f"or pass checkpoint {p} instead of model to use the run's own model",
                params=("weights", "checkpoint", "model"))
        raise CheckpointError(f"weights {p} is a folder, not a weights file; pass one of the "
                              "files inside it", params=("weights",))
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist")
    state = match_state(module, state_dict_of(read_file(p, unsafe_load=unsafe_load), p), p)
    module.load_state_dict(state)
