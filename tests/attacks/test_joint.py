"""Robust AMO's joint x'/δ attack (docs/algorithms.md, "Robust AMO")."""

from __future__ import annotations

import pytest
import torch

from robust_amo.attacks import PGD, RobustAMOAttack, attack_loss, random_start
from robust_amo.methods import (
    robust_amo_loss,
)
from robust_amo.models import ExternalModel
from robust_amo.perturb import perturb
from tests.helpers import batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_robust_amo_delta_step_uses_the_joint_gradient():
    """One step: δ₁ = η_δ/B · ∇_δ Σ ℓ(F(x'₀, 0)) computed independently."""
    x, y = batch(n=8)
    model = tiny_model().eval()
    joint = RobustAMOAttack(model, eps=0.1, step_size=0.03, steps=1, eta_delta=0.5,
                            generator=torch.Generator().manual_seed(4))
    _, deltas = joint(x, y)
    x0 = random_start(x, 0.1, "linf", torch.Generator().manual_seed(4))
    with perturb(model) as p:
        loss = attack_loss(model(x0), y, "ce").mean()
        grads = torch.autograd.grad(loss, p.deltas)
    for d, g in zip(deltas, grads, strict=True):
        torch.testing.assert_close(d, 0.5 * g)
    # a second step shrinks the first δ by ρ before adding the new gradient
    two = RobustAMOAttack(model, eps=0.1, step_size=0.0, steps=2, eta_delta=0.5, rho=0.5,
                          random_start=False)
    _, d2 = two(x, y)
    with perturb(model) as p:
        g1 = torch.autograd.grad(attack_loss(model(x), y, "ce").mean(), p.deltas)
    d1 = [0.5 * g for g in g1]
    with perturb(model, [d.clone().requires_grad_(True) for d in d1]) as p:
        g2 = torch.autograd.grad(attack_loss(model(x), y, "ce").mean(), p.deltas)
    for got, a, b in zip(d2, d1, g2, strict=True):
        torch.testing.assert_close(got, 0.5 * a + 0.5 * b)

def test_robust_amo_under_bf16_autocast_keeps_bf16_deltas():
    """Under bf16 autocast δ is stored in bf16 (its activation's dtype), channels_last kept."""
    x, y = batch(n=8, shape=(3, 8, 8))
    model = tiny_model("tiny-wrn", (3, 8, 8)).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    joint = RobustAMOAttack(model, eps=0.1, step_size=0.03, steps=2, eta_delta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = robust_amo_loss(model, x, y, attack=joint)
        x_adv, deltas = joint(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert x_adv.dtype == torch.float32
    assert all(d.dtype == torch.bfloat16 and d.abs().sum() > 0 for d in deltas)
    assert deltas[0].is_contiguous(memory_format=torch.channels_last)
    # without autocast the same attack keeps float32 δ's
    _, deltas32 = joint(x, y)
    assert all(d.dtype == torch.float32 for d in deltas32)


def test_bf16_delta_step_equals_the_float32_step_rounded():
    """One joint step under bf16 autocast: δ₁ is η_δ/B·∇_δ of float32 δ's, up to bf16 rounding."""
    x, y = batch(n=8, shape=(3, 8, 8))
    model = tiny_model("tiny-wrn", (3, 8, 8)).eval()
    joint = RobustAMOAttack(model, eps=0.1, step_size=0.03, steps=1, eta_delta=0.5,
                            generator=torch.Generator().manual_seed(4))
    x0 = random_start(x, 0.1, "linf", torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, deltas = joint(x, y)
        with perturb(model) as p:
            loss = attack_loss(model(x0), y, "ce").mean()
            grads = torch.autograd.grad(loss, p.deltas)
    assert all(g.dtype == torch.float32 for g in grads)
    for d, g in zip(deltas, grads, strict=True):
        assert d.dtype == torch.bfloat16 and g.abs().sum() > 0
        # ∇δ and δ₁ are each rounded once to bf16 (8 bits): within 2 half-ulps
        torch.testing.assert_close(d.float(), 0.5 * g, rtol=2 ** -7, atol=1e-12)


def test_robust_amo_attack_restores_mode_on_error_and_validates():
    model = tiny_model()
    model.train()
    joint = RobustAMOAttack(model, steps=2)
    with pytest.raises((IndexError, RuntimeError)):
        joint(torch.rand(2, 1, 8, 8), torch.tensor([0, 99]))  # label out of range
    assert model.training
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(ValueError, match="restarts"):
        RobustAMOAttack.from_pgd(PGD(model, restarts=2))
    with pytest.raises(ValueError, match="delta_grad"):
        RobustAMOAttack(model, delta_grad="max")


def test_robust_amo_saves_point_outputs_only_for_the_packages_architectures():
    """Your own model may change a point's output in place (a VGG's ReLU(inplace=True) after a
    convolution): there the points keep saving h and training runs; the package's own
    architectures save the output instead (one activation fewer)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    external = ExternalModel(net, channels=1)
    x, y = batch(n=4)
    joint = RobustAMOAttack(external, eps=0.1, step_size=0.03, steps=2, eta_delta=0.5)
    assert not joint.saves_output()
    loss, _ = robust_amo_loss(external, x, y, attack=joint)
    loss.backward()
    assert net[0].weight.grad.abs().sum() > 0
    assert RobustAMOAttack(tiny_model(), steps=1).saves_output()
