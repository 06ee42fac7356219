"""``make_model``: robustness's ``make_and_restore_model`` for our architectures and robust AMO,
restoring from a checkpoint of either library (:mod:`robust_amo.checkpoint`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from robustness.attacker import AttackerModel
from robustness.datasets import DataSet
from torch import nn

from robust_amo.checkpoint import is_native, read_checkpoint, to_robustness
from robust_amo.checkpoint.format import load_error_summary
from robust_amo.config import DeltaGrad
from robust_amo.errors import CheckpointError
from robust_amo.models import RobustModel
from robust_amo.runtime import resolve_device

from .architectures import architecture, check_model, is_identity_normalization
from .attacker import RobustAMOAttackerModel


def make_model(
    *,
    arch: str | RobustModel,
    dataset: DataSet,
    resume_path: str | None = None,
    robust_amo: bool = True,
    rho: float = 0.92,
    eta_delta: float = 6.4e-3,
    delta_grad: DeltaGrad = "mean",
    device: torch.device | str | None = None,
    parallel: bool = False,
    input_shape: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> tuple[AttackerModel, dict[str, Any] | None]:
    """Like robustness's ``make_and_restore_model``, for our architectures and robust AMO.

    Args:
        arch: a registry name or a model built by :func:`architecture`.
        dataset: a robustness dataset.
        resume_path: a robustness checkpoint or a robust-amo checkpoint/run folder.
        robust_amo: wrap in :class:`RobustAMOAttackerModel` (default) or robustness's
            ``AttackerModel``.
        rho, eta_delta, delta_grad: robust AMO's options (see the class).
        device: where the model goes (default CUDA when available, else CPU).
        parallel: wrap in ``DataParallel``.
        input_shape, **model_kwargs: passed to :func:`architecture` for a name.

    Returns:
        ``(model, checkpoint)``; the checkpoint is in robustness's format (``None`` without
        ``resume_path``) and can be given to ``train_model(checkpoint=...)`` to resume.
    """
    net = architecture(arch, dataset, input_shape=input_shape, **model_kwargs) if isinstance(
        arch, str) else arch
    if isinstance(net, RobustModel) and not is_identity_normalization(net):
        check_model(net)  # raises: robustness would normalise twice
    if robust_amo:
        model: AttackerModel = RobustAMOAttackerModel(net, dataset, rho=rho, eta_delta=eta_delta,
                                                      delta_grad=delta_grad)
    else:
        model = AttackerModel(net, dataset)
    checkpoint = None
    if resume_path:
        checkpoint = read_checkpoint(resume_path)
        if is_native(checkpoint):
            checkpoint = to_robustness(checkpoint)
        sd = checkpoint.get("model", checkpoint.get("state_dict"))
        if sd is None:
            raise CheckpointError(f"{resume_path} holds no model state dict")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"{resume_path} does not fit this architecture "
                                  f"({load_error_summary(e)})") from None
    model = model.to(torch.device(device) if device is not None else resolve_device("auto"))
    if parallel:
        model = nn.DataParallel(model)
    return model, checkpoint
