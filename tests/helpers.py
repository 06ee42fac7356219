"""Helpers shared by the tests (and the margin benchmark): the repository root and references."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robust_amo.config import TrainConfig, merge
from robust_amo.models import create_model
from robust_amo.resolve import resolve
from robust_amo.runtime import eval_mode

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (configs/, bench/, docs/)."""

TINY_RUN = {"arch": "tiny-cnn", "dataset": "digits", "method": "pgd", "epochs": 2,
            "batch_size": 64, "data": {"augment": False, "train_subset": 200},
            "optim": {"lr": 0.05, "schedule": "cosine"},
            "attack": {"eps": 0.1, "step_size": 0.05, "steps": 2},
            "eval": {"n_examples": 32, "steps": 2}}
"""A training run of seconds on the bundled digits: Madry PGD-2 on a tiny CNN."""


def tiny_run(out: Path | str, **overrides) -> TrainConfig:
    """:data:`TINY_RUN` into ``out`` with ``overrides`` merged in (nested mappings key by key)."""
    return resolve(None, [merge(TINY_RUN, {"out": str(out), **overrides})])


def dense_jacobian(
    model: nn.Module, x: torch.Tensor, point: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`kappa`: ∂F/∂h_i of ONE example as a dense (C, D_i) matrix.

    The activation at point ``point`` is replaced through a forward hook by the variable of
    :func:`torch.autograd.functional.jacobian`; slow (D_i backward passes), for tests and
    benchmarks only.

    Args:
        model: a registered model; x: one input (1, C, H, W); point: index into
            ``model.perturbation_points()``.

    Returns:
        ``(h_i, J)``: the activation (1, ...) and the Jacobian (num_classes, h_i.numel()).
    """
    module = model.perturbation_points()[point][1]
    acts: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: acts.append(out.detach()))
    with eval_mode(model), torch.no_grad():
        model(x)
    handle.remove()

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        replace = module.register_forward_hook(lambda m, a, out: h)
        try:
            return model(x)[0]
        finally:
            replace.remove()

    with eval_mode(model):
        jac = torch.autograd.functional.jacobian(logits_of, acts[0])
    return acts[0], jac.reshape(jac.shape[0], -1)


def batch(n=16, shape=(1, 8, 8), seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)


def tiny_model(arch="tiny-cnn", shape=(1, 8, 8), seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(arch, 10, input_shape=shape, **kw)


def sgd_step(model, objective, x, y):
    """One trainer step (train mode, SGD with momentum and weight decay); returns the loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, _ = objective(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def same_state(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
