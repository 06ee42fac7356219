"""Loading what an analysis of a checkpoint needs: the model, the examples, the threat model.

:func:`load_for_analysis` is the one path from a checkpoint (robust-amo's own, or a
robustness-library checkpoint of our architectures) to model + examples + threat model, shared by
``robust-amo eval`` and ``robust-amo margins`` with the same option names (``which``:
last|best, ``split``: test|val|train, ``eps``/``norm``/``step_size`` defaulting to the training
attack's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.checkpoint import (
    Which,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    resolve_path,
)
from robust_amo.config import Norm, SplitName, ThreatModel, check_choice, parse_float
from robust_amo.data import check_split_version, dataset_info, load_dataset, training_splits
from robust_amo.errors import CheckpointError, ConfigError, DataError
from robust_amo.models import build_external, normalize_name
from robust_amo.runtime import eval_mode

log = logging.getLogger(__name__)

NO_WEIGHTS = "none"
"""``weights`` that asks for the module as FN returns it, with no weights file (item 3 of
issue 20: never by default)."""

AS_RETURNED = "none (asked for): as FN returns the module, random unless FN loads weights"
"""What the report records as ``model.weights`` when ``weights`` is :data:`NO_WEIGHTS`."""


def load_model(
    path_or_run_dir: str | Path,
    device: torch.device | str = "cpu",
    which: Which | str = "last",
    *,
    arch: str | None = None,
    dataset: str | None = None,
    unsafe_load: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a robust-amo checkpoint, in eval mode on ``device``, and its metadata.

    A checkpoint written by MadryLab's robustness for one of our architectures (a file, or its
    ``out_dir`` with ``checkpoint.pt.latest``/``.best``) is converted on the fly; it needs
    ``arch`` and ``dataset`` unless it records them (docs/robustness_plugin.md).

    Args:
        path_or_run_dir: a ``.pt`` file or a run folder written by ``robust-amo train``.
        device: where the model goes.
        which: checkpoint of a run folder: ``"last"`` (checkpoint.pt) or ``"best"`` (best.pt).
        arch: architecture of a robustness checkpoint (registry name).
        dataset: dataset of a robustness checkpoint.
        unsafe_load: unpickle a file that needs it, running code from it (``--unsafe-load``).

    Returns:
        ``(model, meta)``; meta holds ``path``, ``arch``, ``dataset``, ``method``, ``epoch``,
        ``num_classes``, ``input_shape`` and the training ``config`` dict.

    Raises:
        CheckpointError: missing, corrupt, or not matching its architecture.
        ConfigError: ``arch`` names another architecture than the checkpoint records.
    """
    p = Path(path_or_run_dir).expanduser()
    ckpt = load_checkpoint(p, map_location="cpu", which=which, arch=arch, dataset=dataset,
                           unsafe_load=unsafe_load)
    if arch is not None and normalize_name(arch) != normalize_name(str(ckpt.get("arch"))):
        raise ConfigError(
            f"arch {arch} disagrees with the checkpoint, which records arch "
            f"{ckpt.get('arch')}; drop arch (it is only needed for robustness checkpoints "
            "that record none)", params=("arch",)
        )
    file = resolve_path(p, which)
    model = model_from_checkpoint(ckpt, file).to(device).eval()
    meta = {
        "path": str(file),
        "format": ckpt.get("format"),
        "arch": ckpt.get("arch"),
        "dataset": ckpt.get("dataset"),
        "method": ckpt.get("method"),
        "epoch": ckpt.get("epoch"),
        "num_classes": ckpt.get("num_classes"),
        "input_shape": ckpt.get("input_shape"),
        "class_names": ckpt.get("class_names"),
        "config": ckpt.get("config") or {},
        "robust_amo_version": ckpt.get("robust_amo_version"),
    }
    return model, meta


def load_external(
    model: str,
    *,
    dataset: str | None,
    data_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    input_shape: list[int] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    points: list[str] | None = None,
    unsafe_load: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A user's model (``FILE.py:FN`` or ``package.module:FN``, which RUNS that code) with
    optional ``weights``, in eval mode on ``device``, and metadata shaped like
    :func:`load_model`'s (docs/evaluation.md, "Your own model").

    Args:
        model: where FN is; FN returns an ``nn.Module`` taking (B, C, H, W) and returning
            (B, num_classes), called with ``num_classes`` when it accepts it.
        dataset: the dataset to evaluate on (gives num_classes and the input shape).
        data_dir: where it lies (``imagefolder`` reads its classes there).
        weights: a state dict or a checkpoint (read with ``weights_only=True``), or
            :data:`NO_WEIGHTS` (``"none"``) for the module as FN returns it: its initial random
            weights unless FN loads its own. Required: a model without trained weights is
            never evaluated by default.
        input_shape: (C, H, W) when it differs from the dataset's.
        mean, std: per-channel normalisation the model expects (applied inside the wrapper, so
            inputs and attacks stay in [0, 1]).
        points: module names of the perturbation points (``margins``).

    Raises:
        ConfigError: no dataset, no weights, a bad FN, or a model whose output is not
            (B, num_classes).
        CheckpointError: weights that are unreadable or do not fit.
    """
    if not dataset:
        raise ConfigError("model needs dataset (the data it was trained for)",
                          params=("model", "dataset"))
    side = int(input_shape[-1]) if input_shape is not None else None
    info = dataset_info(dataset, data_dir, side)
    shape = list(input_shape) if input_shape is not None else list(info.input_shape)
    net = build_external(model, info.num_classes, shape, mean=mean, std=std, points=points)
    own = weights is not None and str(weights).lower() != NO_WEIGHTS
    if weights is None:
        # after FN ran, so that a broken model file is reported first
        raise ConfigError(
            f"model needs weights: a file of trained weights, or {NO_WEIGHTS!r} to use the module "
            "as FN returns it (random initial weights unless FN loads its own)",
            params=("model", "weights"))
    if own:
        load_weights(net.net, weights, unsafe_load=unsafe_load)
    else:
        log.warning("weights %s: using %s as FN returns it (random initial weights unless "
                    "FN loads its own)", NO_WEIGHTS, model)
    where = Path(weights).expanduser() if own else Path(model.rpartition(":")[0])
    meta = {"path": str(where), "format": "external", "arch": model, "dataset": dataset,
            "method": None, "epoch": None, "num_classes": info.num_classes,
            "input_shape": shape, "config": {}, "class_names":
                list(info.classes) if info.classes else None,
            "weights": str(weights) if own else AS_RETURNED,
            "normalization": {"mean": mean, "std": std}, "robust_amo_version": None}
    return net.to(device).eval(), meta


@dataclass
class EvalData:
    """The first ``n`` examples of a split: x (n, C, H, W) float in [0, 1], y (n,) int64."""

    dataset: str
    split: str
    data_dir: str | None
    x: torch.Tensor
    y: torch.Tensor


def load_eval_data(
    meta: dict[str, Any],
    *,
    split: SplitName = "test",
    n_examples: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
) -> EvalData:
    """Examples to evaluate on, from the checkpoint's dataset unless overridden.

    ``split="val"`` rebuilds the held-out examples of training (same ``train_subset``,
    ``val_size`` and seed as the saved config), so it exists only for runs with
    ``data.val_size > 0``; ``split="train"`` is the whole training split.

    Raises:
        DataError: the dataset cannot be found, or the split is empty.
        CheckpointError: the images do not fit the model (other dataset).
    """
    check_choice("split", split, SplitName)
    cfg = meta.get("config") or {}
    data_cfg = cfg.get("data") or {}
    name = dataset or meta.get("dataset") or cfg.get("dataset")
    if not name:
        raise DataError("the checkpoint does not say which dataset it was trained on; pass "
                        "dataset (and data_dir)", params=("dataset", "data_dir"))
    root = data_dir if data_dir is not None else data_cfg.get("data_dir")
    size = data_cfg.get("image_size") or _side(meta)
    _check_fits(meta, name, root, size)  # before reading any file: the dataset's facts suffice
    train, test = load_dataset(name, root, image_size=size)
    if split == "test":
        part = test
    elif split == "train":
        part = train
    else:
        if dataset is not None or int(data_cfg.get("val_size", 0)) <= 0:
            raise DataError("split val needs the checkpoint's own dataset with a held-out "
                            "part (data.val_size > 0 in training); use the test split",
                            params=("split",))
        check_split_version(meta.get("robust_amo_version"), needed=True, refuse=lambda v: DataError(
            f"split val cannot rebuild the held-out part of a run written by robust-amo {v} "
            "(before 0.2.0 it was drawn differently); use the test split", params=("split",)))
        _, part = training_splits(
            train, train_subset=data_cfg.get("train_subset"),
            subset_seed=int(data_cfg.get("subset_seed", 0)), val_size=int(data_cfg["val_size"]),
            seed=int(cfg.get("seed", 0)))
    n = len(part) if n_examples is None else min(n_examples, len(part))
    if n <= 0:
        raise DataError(f"no examples to evaluate (split {split} has {len(part)}, asked for "
                        f"{n_examples})")
    return EvalData(name, split, None if root is None else str(root),
                    part.x[:n].float().div_(255), part.y[:n].clone())


def _side(meta: dict[str, Any]) -> int | None:
    """The image side of a model's recorded (C, H, W) input shape (for image folders)."""
    shape = meta.get("input_shape")
    return int(shape[-1]) if shape else None


def _check_fits(meta: dict[str, Any], name: str, root: str | Path | None = None,
                image_size: int | None = None) -> None:
    """CheckpointError unless dataset ``name``'s images and classes fit the model."""
    info = dataset_info(name, root, image_size)
    shape = meta.get("input_shape")
    if shape is not None and tuple(info.input_shape) != tuple(shape):
        raise CheckpointError(
            f"the model expects inputs of shape {tuple(shape)} but {name} images have shape "
            f"{tuple(info.input_shape)}; pass the dataset it was trained on",
            params=("dataset",))
    if meta.get("num_classes") not in (None, info.num_classes):
        raise CheckpointError(f"the model has {meta['num_classes']} classes but {name} has "
                              f"{info.num_classes}; pass the dataset it was trained on",
                              params=("dataset",))
    trained, found = meta.get("class_names"), info.classes
    if trained and found and list(trained) != list(found):
        # labels are positions in the class list: other names would score other classes
        i = next(i for i, (a, b) in enumerate(zip(trained, found, strict=False)) if a != b)
        where = f"{name} in {root}" if root is not None else name
        raise CheckpointError(
            f"the model was trained on other classes than {where} holds: label {i} is "
            f"{trained[i]!r} for the model but {found[i]!r} in the data; pass the dataset it was "
            "trained on (for an image folder, class folders named as in training)",
            params=("dataset",))


def threat_model(
    meta: dict[str, Any],
    *,
    eps: str | float | None = None,
    norm: Norm | None = None,
    step_size: str | float | None = None,
) -> ThreatModel:
    """The threat model of an analysis: each value given wins, else the checkpoint's training
    attack (its norm, eps, step size, steps and loss; random start on).

    The step size defaults to the training attack's, else eps / 4: the PGD neighbourhood of
    ``margins``. An evaluation takes its own default instead
    (:func:`robust_amo.evaluation.attacks.eval_step_size`).

    Raises:
        ConfigError: a bad number, a step size given as 0, or a norm other than the training
            norm without an eps.
    """
    train_attack = (meta.get("config") or {}).get("attack") or {}
    train_norm = train_attack.get("norm", "linf")
    e = parse_float(eps if eps is not None else train_attack.get("eps", 8 / 255), "eps")
    n = norm or train_norm
    if eps is None and n != train_norm:
        raise ConfigError(f"norm {n} differs from the training norm {train_norm}: give eps "
                          "for it too", params=("norm", "eps"))
    if step_size is not None:
        step = parse_float(step_size, "step_size")
        if not step > 0:
            raise ConfigError(f"step_size must be > 0, got {step}", params=("step_size",))
    else:
        step = float(train_attack.get("step_size", e / 4))
    return ThreatModel(n, e, step, int(train_attack.get("steps", 10)), True,
                       train_attack.get("loss", "ce"))


def input_gradient_problem(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the attacks cannot run on ``model``, found by one forward and backward pass of (at
    most) two examples of ``x``: it raises, its logits carry no gradient, or none reaches the
    input; None when a gradient does.

    Every attack (PGD, AutoAttack, the margin searches) steps along the input gradient, so a
    model whose output does not depend on its input differentiably fails inside the first
    attack with a torch error; this finds it first.
    """
    x = x[:2].detach().clone().requires_grad_(True)
    with torch.enable_grad(), eval_mode(model):
        try:
            out = model(x)
        except Exception as e:  # a model of your own may fail on real images only
            text = " ".join(str(e).split())[:160]
            return f"it fails on two examples of the data ({type(e).__name__}: {text})"
        if not torch.is_tensor(out) or not out.requires_grad:
            return ("its logits carry no gradient (detached, or computed under torch.no_grad "
                    "or from argmax/integer values)")
        (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
    if grad is None:
        return "its logits do not depend on its input (no gradient reaches the input)"
    return None


def check_differentiable(model: nn.Module, meta: dict[str, Any], x: torch.Tensor) -> None:
    """One-line error unless a gradient of ``model``'s logits reaches its input
    (:func:`input_gradient_problem` on the first two examples of ``x``, moved to the model's
    device): a ConfigError naming ``model`` for a module given in Python or a model file, a
    CheckpointError naming the file for a checkpoint."""
    device = next(iter(model.parameters()), x).device
    problem = input_gradient_problem(model, x[:2].to(device))
    if problem is None:
        return
    fix = "attacks need logits differentiable in the input"
    if meta.get("format") == "module":
        raise ConfigError(f"model: {problem}; {fix}", params=("model",))
    if meta.get("format") == "external":
        raise ConfigError(f"model {meta['arch']!r}: {problem}; {fix} (no detach(), "
                          "torch.no_grad() or argmax in its forward)", params=("model",))
    raise CheckpointError(f"{meta['path']}: the model of this checkpoint: {problem}; {fix}")


@dataclass
class Analysis:
    """A checkpoint ready to analyse: the model (eval mode), its metadata, the examples, the
    threat model."""

    model: nn.Module
    meta: dict[str, Any]
    data: EvalData
    threat: ThreatModel


def load_for_analysis(
    checkpoint: str | Path,
    *,
    device: torch.device | str = "cpu",
    which: Which = "last",
    arch: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: SplitName = "test",
    n_examples: int | None = None,
    eps: str | float | None = None,
    norm: Norm | None = None,
    step_size: str | float | None = None,
    unsafe_load: bool = False,
    external: dict[str, Any] | None = None,
) -> Analysis:
    """Model, examples and threat model of a checkpoint: what ``eval`` and ``margins`` start
    from (:func:`load_model`, :func:`load_eval_data`, :func:`threat_model`).

    With ``external`` (the keyword arguments of :func:`load_external`: ``model``, ``weights``,
    ``input_shape``, ``mean``, ``std``, ``points``) the user's model is loaded instead of
    ``checkpoint``; it records no training attack, so ``eps`` is required.

    Before anything is attacked, one forward and backward pass on two examples checks that a
    gradient of the logits reaches the input (:func:`check_differentiable`).

    Raises:
        CheckpointError, DataError, ConfigError: with the fix in the message.
    """
    if external is not None:
        if eps is None:
            raise ConfigError("model needs eps (the radius to evaluate, e.g. 8/255): a "
                              "model of your own records no training attack",
                              params=("model", "eps"))
        model, meta = load_external(dataset=dataset, data_dir=data_dir, device=device,
                                    unsafe_load=unsafe_load, **external)
    else:
        model, meta = load_model(checkpoint, device, which=which, arch=arch, dataset=dataset,
                                 unsafe_load=unsafe_load)
    threat = threat_model(meta, eps=eps, norm=norm, step_size=step_size)
    data = load_eval_data(meta, split=split, n_examples=n_examples, dataset=dataset,
                          data_dir=data_dir)
    recorded = meta.get("input_shape")
    if recorded is not None and list(recorded) != list(data.x.shape[1:]):
        raise CheckpointError(
            f"the checkpoint's model takes inputs of shape {tuple(recorded)}, but "
            f"{data.dataset} examples have shape {tuple(data.x.shape[1:])}; pass the dataset "
            "it was trained on", params=("dataset",)
        )
    check_differentiable(model, meta, data.x)
    return Analysis(model, meta, data, threat)
