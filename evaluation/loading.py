"""Loading what an evaluation needs: the model of a checkpoint and the examples to attack.

:func:`load_model` is the one place that turns a checkpoint path into a model; formats other than
robust-amo's own (e.g. robustness-library checkpoints) are to be added here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.checkpoint import load_checkpoint, model_from_checkpoint
from robust_amo.errors import CheckpointError, ConfigError, DataError


def load_model(
    path_or_run_dir: str | Path, device: torch.device | str = "cpu", which: str = "checkpoint.pt"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a robust-amo checkpoint, in eval mode on ``device``, and its metadata.

    Args:
        path_or_run_dir: a ``.pt`` file or a run folder written by ``robust-amo train``.
        device: where the model goes.
        which: file inside a run folder: ``checkpoint.pt`` (last epoch) or ``best.pt``.

    Returns:
        ``(model, meta)``; meta holds ``path``, ``arch``, ``dataset``, ``method``, ``epoch``,
        ``num_classes``, ``input_shape`` and the training ``config`` dict.

    Raises:
        CheckpointError: missing, corrupt, or not matching its architecture.
    """
    p = Path(path_or_run_dir).expanduser()
    ckpt = load_checkpoint(p, map_location="cpu", which=which)
    model = model_from_checkpoint(ckpt).to(device).eval()
    file = p / which if p.is_dir() else p
    meta = {
        "path": str(file),
        "format": ckpt.get("format"),
        "arch": ckpt.get("arch"),
        "dataset": ckpt.get("dataset"),
        "method": ckpt.get("method"),
        "epoch": ckpt.get("epoch"),
        "num_classes": ckpt.get("num_classes"),
        "input_shape": ckpt.get("input_shape"),
        "config": ckpt.get("config") or {},
    }
    return model, meta


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
    split: str = "test",
    n_examples: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
) -> EvalData:
    """Examples to evaluate on, from the checkpoint's dataset unless overridden.

    ``split="val"`` rebuilds the held-out examples of training (same ``train_subset``,
    ``val_size`` and seed as the saved config), so it exists only for runs with
    ``data.val_size > 0``.

    Raises:
        DataError: the dataset cannot be found, or the split is empty.
        CheckpointError: the images do not fit the model (other dataset).
    """
    from robust_amo.data import dataset_info, hold_out, load_dataset, take_subset

    cfg = meta.get("config") or {}
    data_cfg = cfg.get("data") or {}
    name = dataset or meta.get("dataset") or cfg.get("dataset")
    if not name:
        raise DataError("the checkpoint does not say which dataset it was trained on; pass "
                        "--dataset (and --data-dir)")
    root = data_dir if data_dir is not None else data_cfg.get("data_dir")
    train, test = load_dataset(name, root)
    if split == "test":
        part = test
    elif split == "val":
        if dataset is not None or int(data_cfg.get("val_size", 0)) <= 0:
            raise DataError("--split val needs the checkpoint's own dataset with a held-out "
                            "part (data.val_size > 0 in training); use --split test")
        train = take_subset(train, data_cfg.get("train_subset"), int(data_cfg.get("subset_seed",
                                                                                  0)))
        _, part = hold_out(train, int(data_cfg["val_size"]), int(cfg.get("seed", 0)))
    else:
        raise ConfigError(f"--split {split!r} is not one of test, val")
    n = len(part) if n_examples is None else min(n_examples, len(part))
    if n <= 0:
        raise DataError(f"no examples to evaluate (split {split} has {len(part)}, asked for "
                        f"{n_examples})")
    shape = meta.get("input_shape")
    if shape is not None and tuple(part.x.shape[1:]) != tuple(shape):
        raise CheckpointError(
            f"the model expects inputs of shape {tuple(shape)} but {name} images have shape "
            f"{tuple(part.x.shape[1:])}; evaluate on the dataset the model was trained on")
    info = dataset_info(name)
    if meta.get("num_classes") not in (None, info.num_classes):
        raise CheckpointError(f"the model has {meta['num_classes']} classes but {name} has "
                              f"{info.num_classes}; evaluate on the dataset it was trained on")
    return EvalData(name, split, None if root is None else str(root),
                    part.x[:n].float().div_(255), part.y[:n].clone())
