"""Jacobian-LM against the full Jacobian and finite differences (docs/algorithms.md)."""

from __future__ import annotations

import pytest
import torch

from robust_amo.methods import (
    jacobian_lm_loss,
    jacobian_penalty,
    multiclass_hinge,
)
from tests.helpers import batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _penalty_reference(model, x, variant_classes=None):
    """Per-example eq. (26) from the full Jacobian of torch.autograd.functional.jacobian."""
    jac = torch.autograd.functional.jacobian(model, x)  # (B, C, B, ...)
    b = x.shape[0]
    per = torch.stack([jac[i, :, i].flatten(1) for i in range(b)])  # (B, C, D)
    norms = per.norm(dim=2) / model.classifier.weight.norm(dim=1)  # (B, C)
    if variant_classes is None:
        return norms.sum(1)
    return norms[torch.arange(b), variant_classes]


@pytest.mark.parametrize("arch", ["tiny-mlp", "tiny-cnn"])
@pytest.mark.parametrize("vjp", ["batched", "loop"])
def test_jacobian_penalty_all_matches_full_jacobian(arch, vjp):
    x, _ = batch(n=5)
    model = tiny_model(arch).double().eval()
    x = x.double()
    got = jacobian_penalty(model, x, variant="all", vjp=vjp)
    torch.testing.assert_close(got, _penalty_reference(model, x))


def test_jacobian_penalty_random_matches_full_jacobian():
    x, _ = batch(n=6)
    model = tiny_model("tiny-cnn").double().eval()
    x = x.double()
    got = jacobian_penalty(model, x, variant="random", generator=torch.Generator().manual_seed(9))
    classes = torch.randint(10, (6,), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, _penalty_reference(model, x, classes))


@pytest.mark.parametrize("variant,task", [("all", "hinge"), ("random", "ce")])
def test_jacobian_lm_gradient_matches_finite_differences(variant, task):
    x, y = batch(n=4)
    model = tiny_model("tiny-mlp").double().eval()
    x = x.double()
    params = dict(model.named_parameters())

    def loss_at(delta: dict[str, torch.Tensor]) -> torch.Tensor:
        p = {k: v + delta.get(k, 0) for k, v in params.items()}
        with torch.nn.utils.stateless._reparametrize_module(model, p):
            return jacobian_lm_loss(model, x, y, lam_lm=0.7, variant=variant, task_loss=task,
                                    frobenius=0.05,
                                    generator=torch.Generator().manual_seed(1))[0]

    loss = loss_at({})
    grads = torch.autograd.grad(loss, list(params.values()))
    gen = torch.Generator().manual_seed(2)
    u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
    h = 1e-6
    fd = (loss_at({k: h * v for k, v in u.items()}) - loss_at({k: -h * v for k, v in u.items()}))
    fd = fd / (2 * h)
    analytic = sum((g * u[k]).sum() for g, k in zip(grads, params, strict=True))
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-8)
    # the penalty term itself carries weight gradient (double backprop), not only the task loss
    pen = jacobian_penalty(model, x, variant=variant).sum()
    assert torch.autograd.grad(pen, model.hidden[0].weight)[0].abs().sum() > 0


def test_multiclass_hinge_closed_form():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 0.2, -1.0]])
    y = torch.tensor([0, 0])
    # example 0: margin 2 -> 0; example 1: margin -0.2 -> 1.2
    torch.testing.assert_close(multiclass_hinge(logits, y), torch.tensor(0.6))
