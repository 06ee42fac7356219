"""Robust AMO, clean AMO and Jacobian-LM against their ALGORITHMS.md invariants."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from attacks import PGD
from attacks.pgd import attack_loss, random_start
from robust_amo.methods import (
    RobustAMOAttack,
    amo_loss,
    jacobian_lm_loss,
    jacobian_penalty,
    multiclass_hinge,
    robust_amo_loss,
)
from robust_amo.models import create_model
from robust_amo.objectives import pgd_loss, standard_loss
from robust_amo.perturb import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=16, shape=(1, 8, 8), seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)


def _model(arch="tiny-cnn", shape=(1, 8, 8), seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(arch, 10, input_shape=shape, **kw)


def _sgd_step(model, objective, x, y):
    """One trainer step (train mode, SGD with momentum and weight decay); returns the loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, _ = objective(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _same_state(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


# ------------------------------------------------------------------ robust AMO


@pytest.mark.parametrize("arch,shape", [("tiny-cnn", (1, 8, 8)), ("tiny-wrn", (3, 8, 8))])
def test_robust_amo_with_zero_eta_is_pgd_training(arch, shape):
    x, y = _batch(shape=shape)
    m_pgd = _model(arch, shape)
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
    loss_pgd = _sgd_step(m_pgd, lambda m, a, b: pgd_loss(m, a, b, attack=pgd), x, y)
    loss_amo = _sgd_step(m_amo, lambda m, a, b: robust_amo_loss(m, a, b, attack=joint), x, y)
    assert torch.equal(loss_pgd, loss_amo)
    assert _same_state(m_pgd, m_amo)
    assert m_amo.training  # mode restored after the eval-mode attack


def _passes_of_one_step(method: str, x, y) -> dict[str, int]:
    model = _model()
    seen = {"fwd": 0, "bwd": 0}

    def fwd(*_):
        seen["fwd"] += 1

    def bwd(*_):
        seen["bwd"] += 1

    model.register_forward_pre_hook(fwd)
    model.classifier.register_full_backward_pre_hook(bwd)
    pgd = PGD(model, eps=0.1, step_size=0.03, steps=4)
    if method == "pgd":
        _sgd_step(model, functools.partial(pgd_loss, attack=pgd), x, y)
    else:
        _sgd_step(model, functools.partial(robust_amo_loss,
                                           attack=RobustAMOAttack.from_pgd(pgd)), x, y)
    return seen


def test_robust_amo_costs_the_passes_of_pgd_training():
    """Per training step: K attack forwards/backwards + one training forward/backward, as PGD."""
    x, y = _batch(n=8)
    expected = {"fwd": 5, "bwd": 5}
    assert _passes_of_one_step("pgd", x, y) == _passes_of_one_step("robust-amo", x, y) == expected


@pytest.mark.parametrize("delta_grad,eta", [("mean", 6.4e-3), ("sum", 6.4e-3), ("mean", 1.0)])
def test_robust_amo_loss_is_higher_than_pgd_loss(delta_grad, eta):
    x, y = _batch(n=32)
    model = _model()
    pgd = PGD(model, eps=0.1, step_size=0.03, steps=3, generator=torch.Generator().manual_seed(3))
    joint = RobustAMOAttack.from_pgd(pgd, eta_delta=eta, delta_grad=delta_grad)
    pgd.generator.manual_seed(5)
    loss_pgd, _ = pgd_loss(model, x, y, attack=pgd)
    pgd.generator.manual_seed(5)
    loss_amo, _ = robust_amo_loss(model, x, y, attack=joint)
    assert loss_amo > loss_pgd


def test_robust_amo_delta_step_uses_the_joint_gradient():
    """One step: δ₁ = η_δ/B · ∇_δ Σ ℓ(F(x'₀, 0)) computed independently."""
    x, y = _batch(n=8)
    model = _model().eval()
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


def test_robust_amo_under_bf16_autocast_keeps_float32_deltas():
    x, y = _batch(n=8, shape=(3, 8, 8))
    model = _model("tiny-wrn", (3, 8, 8)).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    joint = RobustAMOAttack(model, eps=0.1, step_size=0.03, steps=2, eta_delta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = robust_amo_loss(model, x, y, attack=joint)
        x_adv, deltas = joint(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert x_adv.dtype == torch.float32
    assert all(d.dtype == torch.float32 and d.abs().sum() > 0 for d in deltas)
    assert deltas[0].is_contiguous(memory_format=torch.channels_last)


def test_robust_amo_attack_restores_mode_on_error_and_validates():
    model = _model()
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


# ------------------------------------------------------------------ clean AMO


@pytest.mark.parametrize("arch,shape", [("tiny-cnn", (1, 8, 8)), ("tiny-wrn", (3, 8, 8))])
def test_clean_amo_with_zero_step_is_standard_training(arch, shape):
    x, y = _batch(shape=shape)
    m_std = _model(arch, shape)
    m_amo = copy.deepcopy(m_std)
    for _ in range(2):
        loss_std = _sgd_step(m_std, standard_loss, x, y)
        loss_amo = _sgd_step(m_amo, lambda m, a, b: amo_loss(m, a, b, steps=2, eta_p=0.0), x, y)
        assert torch.equal(loss_std, loss_amo)
    assert _same_state(m_std, m_amo)  # BatchNorm running statistics included


def test_clean_amo_ascends_and_matches_algorithm_1():
    x, y = _batch(n=8)
    model = _model().eval()
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


# ------------------------------------------------------------------ Jacobian-LM


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
    x, _ = _batch(n=5)
    model = _model(arch).double().eval()
    x = x.double()
    got = jacobian_penalty(model, x, variant="all", vjp=vjp)
    torch.testing.assert_close(got, _penalty_reference(model, x))


def test_jacobian_penalty_random_matches_full_jacobian():
    x, _ = _batch(n=6)
    model = _model("tiny-cnn").double().eval()
    x = x.double()
    got = jacobian_penalty(model, x, variant="random", generator=torch.Generator().manual_seed(9))
    classes = torch.randint(10, (6,), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, _penalty_reference(model, x, classes))


@pytest.mark.parametrize("variant,task", [("all", "hinge"), ("random", "ce")])
def test_jacobian_lm_gradient_matches_finite_differences(variant, task):
    x, y = _batch(n=4)
    model = _model("tiny-mlp").double().eval()
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
