"""Clean AMO against Algorithm 1 (docs/algorithms.md, "Clean AMO")."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robust_amo.methods import (
    amo_loss,
    standard_loss,
)
from robust_amo.perturb import perturb
from tests.helpers import batch, same_state, sgd_step, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,shape", [("tiny-cnn", (1, 8, 8)), ("tiny-wrn", (3, 8, 8))])
def test_clean_amo_with_zero_step_is_standard_training(arch, shape):
    x, y = batch(shape=shape)
    m_std = tiny_model(arch, shape)
    m_amo = copy.deepcopy(m_std)
    for _ in range(2):
        loss_std = sgd_step(m_std, standard_loss, x, y)
        loss_amo = sgd_step(m_amo, lambda m, a, b: amo_loss(m, a, b, steps=2, eta_p=0.0), x, y)
        assert torch.equal(loss_std, loss_amo)
    assert same_state(m_std, m_amo)  # BatchNorm running statistics included


def test_clean_amo_ascends_and_matches_algorithm_1():
    x, y = batch(n=8)
    model = tiny_model().eval()
    plain, _ = standard_loss(model, x, y)
    loss, _ = amo_loss(model, x, y, steps=1, eta_p=0.5)
    assert loss > plain
    # t = 1, λ = 0.3, sum: δ₁ = η_p·∇_δ Σ_i ℓ_i at δ = 0 (the (1 − η_p λ) factor acts on δ₀ = 0);
    # t = 2 then shrinks δ₁ by (1 − η_p λ) before the second ascent step
    with perturb(model) as p:
        g1 = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), p.deltas)
    d1 = [0.5 * g for g in g1]
    with perturb(model, [d.clone().requires_grad_(True) for d in d1]) as p:
        g2 = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), p.deltas)
    d2 = [(1 - 0.5 * 0.3) * a + 0.5 * b for a, b in zip(d1, g2, strict=True)]
    with perturb(model, d2):
        expected = F.cross_entropy(model(x), y)
    got, _ = amo_loss(model, x, y, steps=2, eta_p=0.5, lam=0.3, delta_grad="sum")
    torch.testing.assert_close(got, expected)
