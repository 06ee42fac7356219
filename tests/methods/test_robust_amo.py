"""Robust AMO training against its invariants (docs/algorithms.md, "Robust AMO")."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from robust_amo.attacks import PGD, RobustAMOAttack
from robust_amo.methods import (
    pgd_loss,
    robust_amo_loss,
)
from robust_amo.perturb import fused_hook
from tests.helpers import batch, same_state, sgd_step, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-hook", "reference-hook"])
@pytest.mark.parametrize("arch,shape", [("tiny-cnn", (1, 8, 8)), ("tiny-wrn", (3, 8, 8))])
def test_robust_amo_with_zero_eta_is_pgd_training(arch, shape, fused):
    with fused_hook(fused):
        _zero_eta_is_pgd_training(arch, shape)


def _assert_zero_eta_step_is_pgd_step(m_pgd, x, y, *, steps, device, fused):
    """One bf16-autocast SGD step of PGD training and of robust AMO with η_δ = 0 from the same
    weights and attack starts: equal losses and equal weights afterwards."""
    m_amo = copy.deepcopy(m_pgd)
    pgd = PGD(m_pgd, eps=0.1, step_size=0.03, steps=steps,
              generator=torch.Generator().manual_seed(7))
    joint = RobustAMOAttack.from_pgd(
        PGD(m_amo, eps=0.1, step_size=0.03, steps=steps,
            generator=torch.Generator().manual_seed(7)),
        eta_delta=0.0)
    with torch.autocast(device, dtype=torch.bfloat16), fused_hook(fused):
        loss_pgd = sgd_step(m_pgd, functools.partial(pgd_loss, attack=pgd), x, y)
        loss_amo = sgd_step(m_amo, functools.partial(robust_amo_loss, attack=joint), x, y)
    assert torch.equal(loss_pgd, loss_amo)
    assert same_state(m_pgd, m_amo)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-hook", "reference-hook"])
def test_robust_amo_with_zero_eta_is_pgd_training_under_cpu_bf16(fused):
    """bf16 activations, float32 δ's: the point's casts keep the identity exact."""
    x, y = batch(n=8, shape=(3, 8, 8))
    m_pgd = tiny_model("tiny-wrn", (3, 8, 8))
    _assert_zero_eta_step_is_pgd_step(m_pgd, x, y, steps=2, device="cpu", fused=fused)


def _zero_eta_is_pgd_training(arch, shape):
    x, y = batch(shape=shape)
    m_pgd = tiny_model(arch, shape)
    m_amo = copy.deepcopy(m_pgd)
    pgd = PGD(m_pgd, eps=0.1, step_size=0.03, steps=3, generator=torch.Generator().manual_seed(7))
    joint = RobustAMOAttack.from_pgd(
        PGD(m_amo, eps=0.1, step_size=0.03, steps=3, generator=torch.Generator().manual_seed(7)),
        rho=0.92, eta_delta=0.0)

    # the x' sequences agree (same generator state)
    pgd.generator.manual_seed(11)
    joint.generator.manual_seed(11)
    x_pgd = pgd(x, y)
    x_amo, deltas = joint(x, y)
    assert torch.equal(x_pgd, x_amo)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas)
    assert not x_amo.requires_grad and not any(d.requires_grad for d in deltas)

    # and so do the loss and the weight update of a full training step
    pgd.generator.manual_seed(12)
    joint.generator.manual_seed(12)
    loss_pgd = sgd_step(m_pgd, lambda m, a, b: pgd_loss(m, a, b, attack=pgd), x, y)
    loss_amo = sgd_step(m_amo, lambda m, a, b: robust_amo_loss(m, a, b, attack=joint), x, y)
    assert torch.equal(loss_pgd, loss_amo)
    assert same_state(m_pgd, m_amo)
    assert m_amo.training  # mode restored after the eval-mode attack

def _passes_of_one_step(method: str, x, y) -> dict[str, int]:
    model = tiny_model()
    seen = {"fwd": 0, "bwd": 0}

    def fwd(*_):
        seen["fwd"] += 1

    def bwd(*_):
        seen["bwd"] += 1

    model.register_forward_pre_hook(fwd)
    model.classifier.register_full_backward_pre_hook(bwd)
    pgd = PGD(model, eps=0.1, step_size=0.03, steps=4)
    if method == "pgd":
        sgd_step(model, functools.partial(pgd_loss, attack=pgd), x, y)
    else:
        sgd_step(model, functools.partial(robust_amo_loss,
                                           attack=RobustAMOAttack.from_pgd(pgd)), x, y)
    return seen

def test_robust_amo_costs_the_passes_of_pgd_training():
    """Per training step: K attack forwards/backwards + one training forward/backward, as PGD."""
    x, y = batch(n=8)
    expected = {"fwd": 5, "bwd": 5}
    assert _passes_of_one_step("pgd", x, y) == _passes_of_one_step("robust-amo", x, y) == expected

@pytest.mark.parametrize("delta_grad,eta", [("mean", 6.4e-3), ("sum", 6.4e-3), ("mean", 1.0)])
def test_robust_amo_loss_is_higher_than_pgd_loss(delta_grad, eta):
    x, y = batch(n=32)
    model = tiny_model()
    pgd = PGD(model, eps=0.1, step_size=0.03, steps=3, generator=torch.Generator().manual_seed(3))
    joint = RobustAMOAttack.from_pgd(pgd, eta_delta=eta, delta_grad=delta_grad)
    pgd.generator.manual_seed(5)
    loss_pgd, _ = pgd_loss(model, x, y, attack=pgd)
    pgd.generator.manual_seed(5)
    loss_amo, _ = robust_amo_loss(model, x, y, attack=joint)
    assert loss_amo > loss_pgd

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False], ids=["fused-hook", "reference-hook"])
def test_robust_amo_with_zero_eta_is_pgd_training_on_cuda_bf16(monkeypatch, fused):
    # bit equality needs the same convolution algorithms in both runs
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, y = (t.cuda() for t in batch(shape=(3, 8, 8)))
    x = x.contiguous(memory_format=torch.channels_last)
    m_pgd = tiny_model("tiny-wrn", (3, 8, 8)).cuda().to(memory_format=torch.channels_last)
    _assert_zero_eta_step_is_pgd_step(m_pgd, x, y, steps=3, device="cuda", fused=fused)
