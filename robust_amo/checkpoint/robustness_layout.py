"""Checkpoints shared with MadryLab's ``robustness``, converted both ways without importing it.

A ``robustness`` checkpoint is a ``torch.save``'d dict (pickled with ``dill``) whose ``"model"``
entry is the state dict of a ``DataParallel(AttackerModel)``::

    module.normalizer.new_mean          (C, 1, 1)  the dataset mean, applied before the model
    module.normalizer.new_std           (C, 1, 1)
    module.model.<key>                  the classifier's own state dict
    module.attacker.normalize.new_mean  (C, 1, 1)  the same normalisation, held by the attacker
    module.attacker.normalize.new_std   (C, 1, 1)
    module.attacker.model.<key>         the same classifier again (shared parameters)

plus ``"epoch"``, ``"optimizer"``, ``"schedule"`` and ``"amp"``. A robust-amo checkpoint
(docs/checkpoints.md) holds our model's state dict, normalisation included, and the facts needed
to rebuild it (``arch``, ``num_classes``, ``input_shape``, ``model_kwargs``).

Normalisation: robustness's ``AttackerModel`` normalises inputs itself, so a registered model
inside it is built with identity normalisation (mean 0, std 1). Converting folds the two
normalisations into one, exactly: (x − m₁)/s₁ followed by (· − m₂)/s₂ is (x − (m₁ + m₂·s₁))/(s₁·s₂).
A robust-amo checkpoint therefore carries the whole normalisation inside the model and a
robustness checkpoint carries it in ``normalizer``, whatever the other side's dataset says.

Loading never needs ``robustness``: a checkpoint written by ``robustness.train.train_model`` only
pickles tensors, numbers and dicts, which ``torch.load(weights_only=True)`` reads; nothing is
unpickled in full unless the user passes ``--unsafe-load`` (docs/checkpoints.md). This module
builds on :mod:`robust_amo.checkpoint.format` (never the other way round).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from robust_amo.data import dataset_info
from robust_amo.errors import CheckpointError
from robust_amo.models import create_model, normalize_name

from . import format as ckpt_io

log = logging.getLogger(__name__)

ROBUSTNESS = "robustness"
ROBUST_AMO = "robust-amo"
# where a converted robustness checkpoint keeps the facts needed to rebuild our model
META_KEY = "robust_amo"


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def is_robustness_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` looks like a checkpoint of ``robustness`` (an AttackerModel state dict)."""
    if not isinstance(obj, dict) or obj.get("format") == ckpt_io.FORMAT:
        return False
    sd = obj.get("model", obj.get("state_dict"))
    return isinstance(sd, Mapping) and any(
        k.startswith(("module.model.", "model.")) for k in sd
    )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    unsafe_load: bool = False) -> dict[str, Any]:
    """Load a checkpoint file of either library as a dict (no ``robustness`` import needed),
    weights-only unless ``unsafe_load`` (:func:`robust_amo.checkpoint.read_file`).

    Raises:
        CheckpointError: missing, corrupt, or not a dict.
    """
    p = ckpt_io.resolve_path(path)
    obj = ckpt_io.read_file(p, map_location, unsafe_load=unsafe_load)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} does not hold a checkpoint dict but a {type(obj).__name__}")
    return obj


def split_attacker_state(sd: Mapping[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The classifier's state dict and the (C,) mean/std of an AttackerModel state dict.

    Accepts keys with or without DataParallel's ``module.`` prefix.

    Raises:
        CheckpointError: when the normaliser or the classifier keys are missing.
    """
    if any(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    model_sd = _strip(sd, "model.")
    try:
        mean = sd["normalizer.new_mean"].flatten().float()
        std = sd["normalizer.new_std"].flatten().float()
    except KeyError:
        raise CheckpointError(
            "not a robustness AttackerModel state dict: no normalizer.new_mean/new_std entries"
        ) from None
    if not model_sd:
        raise CheckpointError("not a robustness AttackerModel state dict: no model.* entries")
    return model_sd, mean, std


def _fold_into_model(model_sd: dict, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Move the outer normalisation (mean, std) into the model's own ``normalize`` buffers."""
    out = dict(model_sd)
    m1 = out.get("normalize.mean")
    s1 = out.get("normalize.std")
    shape = (1, -1, 1, 1)
    if m1 is None or s1 is None:
        raise CheckpointError(
            "the classifier in this robustness checkpoint is not a robust-amo model (no "
            "normalize.mean/std buffers); only registered architectures can be converted"
        )
    # robustness's normaliser (mean, std) runs first, the model's own (m1, s1) second
    out["normalize.mean"] = (mean.view(shape) + m1.float().view(shape) * std.view(shape)
                             ).to(m1.dtype)
    out["normalize.std"] = (s1.float().view(shape) * std.view(shape)).to(s1.dtype)
    return out


def to_robustness(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A robustness checkpoint dict from a robust-amo checkpoint dict.

    The model's normalisation moves to ``normalizer`` (the model gets identity normalisation),
    so ``make_and_restore_model(arch=<model with mean=None, std=None>, dataset=...,
    resume_path=...)`` reproduces the robust-amo model's logits whatever the dataset's mean/std.
    The optimizer state is kept (parameters are in the same order on both sides); the schedule
    is not (robustness fast-forwards its own by ``epoch`` steps on resume).

    Returns:
        ``{"model", "optimizer", "schedule": None, "epoch", "amp": None, "robust_amo": {...}}``.
    """
    if ckpt.get("format") != ckpt_io.FORMAT:
        raise CheckpointError("expected a robust-amo checkpoint (format=robust-amo-checkpoint)")
    sd = ckpt_io.model_state(ckpt)
    try:
        m = sd["normalize.mean"].float()
        s = sd["normalize.std"].float()
    except KeyError:
        raise CheckpointError("robust-amo checkpoint without normalize.mean/std buffers") from None
    sd["normalize.mean"] = torch.zeros_like(sd["normalize.mean"])
    sd["normalize.std"] = torch.ones_like(sd["normalize.std"])
    c = m.numel()
    norm = {"new_mean": m.reshape(c, 1, 1).clone(), "new_std": s.reshape(c, 1, 1).clone()}
    state: dict[str, torch.Tensor] = {}
    for owner in ("normalizer", "attacker.normalize"):
        for k, v in norm.items():
            state[f"module.{owner}.{k}"] = v
    for k, v in sd.items():
        state[f"module.model.{k}"] = v
        state[f"module.attacker.model.{k}"] = v
    meta = {k: ckpt[k] for k in ("arch", "num_classes", "input_shape", "model_kwargs",
                                 "dataset", "method") if k in ckpt}
    return {"model": state, "optimizer": ckpt.get("optimizer"), "schedule": None,
            "epoch": int(ckpt.get("epoch", 0)), "amp": None, META_KEY: meta}


def from_robustness(
    rckpt: Mapping[str, Any],
    *,
    arch: str | None = None,
    dataset: str | None = None,
    input_shape: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    source: str | Path = "the robustness checkpoint",
) -> dict[str, Any]:
    """A robust-amo checkpoint dict from a robustness checkpoint of a registered architecture.

    Args:
        rckpt: the loaded robustness checkpoint (``"model"`` or legacy ``"state_dict"``).
        arch: registry name; needed unless the checkpoint was written by :func:`to_robustness`.
        dataset: robust-amo dataset name (gives the input shape and is recorded); optional when
            ``input_shape`` is given or recorded.
        input_shape: (C, H, W) of the inputs.
        model_kwargs: architecture options (e.g. ``{"dropout": 0.3}``).
        source: the file, named in the messages.

    Returns:
        a robust-amo checkpoint: ``load_checkpoint``/``model_from_checkpoint`` and
        ``robust-amo eval`` read it once saved.

    Raises:
        CheckpointError: naming the missing ``arch``/``dataset`` or the mismatch.
    """
    sd = rckpt.get("model", rckpt.get("state_dict"))
    if not isinstance(sd, Mapping):
        raise CheckpointError("not a robustness checkpoint: no 'model' state dict")
    meta = rckpt.get(META_KEY) or {}
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{source}: field {META_KEY!r} must be a mapping, got "
                              f"{type(meta).__name__}; {ckpt_io.FIX}")
    meta = dict(meta)
    ckpt_io.check_fields(meta, source)  # what to_robustness recorded, before it is used
    arch = arch or meta.get("arch")
    dataset = dataset or meta.get("dataset")
    if arch is None:
        raise CheckpointError(
            "this robustness checkpoint does not say which architecture it holds; pass arch "
            "(a registered name, see `robust-amo archs`) and dataset", params=("arch", "dataset")
        )
    model_sd, mean, std = split_attacker_state(sd)
    if input_shape is None:
        input_shape = meta.get("input_shape")
    if input_shape is None:
        if dataset is None:
            raise CheckpointError(
                "cannot tell the input shape of this robustness checkpoint; pass dataset "
                "(e.g. cifar10) or input_shape (C, H, W)", params=("dataset", "input_shape")
            )
        input_shape = dataset_info(dataset).input_shape
    channels = model_sd.get("normalize.mean", mean).numel()
    if channels != int(input_shape[0]):
        # the normalisers hold one value per input channel: the shape says which data fit
        where = f"{dataset} images have shape" if dataset else "the input shape is"
        raise CheckpointError(
            f"{source}: the checkpoint's model takes {channels}-channel inputs, but {where} "
            f"{tuple(input_shape)}; pass the dataset it was trained on", params=("dataset",))
    weight = model_sd.get("classifier.weight")
    if weight is None:
        raise CheckpointError(
            f"the classifier in this checkpoint has no classifier.weight: it is not a {arch!r} "
            "robust-amo model"
        )
    num_classes = int(weight.shape[0])
    kwargs = dict(model_kwargs if model_kwargs is not None else meta.get("model_kwargs", {}))
    folded = _fold_into_model(model_sd, mean, std)
    try:
        model = create_model(arch, num_classes, input_shape=input_shape, **kwargs)
    except TypeError as e:  # a builder's complaint about a keyword it does not take
        raise CheckpointError(f"{source}: model_kwargs {kwargs} are not accepted by arch "
                              f"{arch!r} ({e})") from None
    except ValueError as e:  # a builder's complaint about the shape
        raise CheckpointError(f"{source}: arch {arch!r} cannot be built for input shape "
                              f"{tuple(input_shape)} ({e}); check dataset",
                              params=("dataset",)) from None
    try:
        model.load_state_dict(folded)
    except RuntimeError as e:
        raise CheckpointError(
            f"the checkpoint's weights do not fit {arch!r} with input shape {tuple(input_shape)}; "
            f"check arch and dataset ({ckpt_io.load_error_summary(e)})",
            params=("arch", "dataset")
        ) from None
    n_mean = folded["normalize.mean"].flatten().tolist()
    n_std = folded["normalize.std"].flatten().tolist()
    return ckpt_io.build_checkpoint(
        arch=normalize_name(arch), num_classes=num_classes, input_shape=input_shape,
        mean=n_mean, std=n_std, model_kwargs=kwargs, dataset=dataset,
        method=meta.get("method", ROBUSTNESS), model=model, epoch=int(rckpt.get("epoch", 0)),
        source=ROBUSTNESS)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    to: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    input_shape: Sequence[int] | None = None,
    unsafe_load: bool = False,
) -> str:
    """Convert a checkpoint file to the other library's format and save it atomically.

    Args:
        src: a robust-amo checkpoint (file or run folder) or a robustness checkpoint file.
        dst: where to write the converted checkpoint.
        to: ``"robustness"`` or ``"robust-amo"``; default: the format ``src`` is not in.
        arch, dataset, input_shape: see :func:`from_robustness`.
        unsafe_load: read a ``src`` that needs full unpickling (runs code from the file).

    Returns:
        the format written (``"robustness"`` or ``"robust-amo"``).
    """
    obj = read_checkpoint(src, unsafe_load=unsafe_load)
    is_ours = obj.get("format") == ckpt_io.FORMAT
    if not is_ours and not is_robustness_checkpoint(obj):
        raise CheckpointError(f"{src} is neither a robust-amo nor a robustness checkpoint")
    target = to or (ROBUSTNESS if is_ours else ROBUST_AMO)
    if target not in (ROBUSTNESS, ROBUST_AMO):
        raise CheckpointError(f"to must be {ROBUSTNESS} or {ROBUST_AMO}, got {target!r}",
                              params=("to",))
    if (target == ROBUSTNESS) != is_ours:
        raise CheckpointError(f"{src} is already a {target} checkpoint")
    if is_ours:
        out = to_robustness(obj)
    else:
        out = from_robustness(obj, arch=arch, dataset=dataset, input_shape=input_shape)
    ckpt_io.atomic_save(out, dst)
    log.info("wrote %s checkpoint %s", target, dst)
    return target
