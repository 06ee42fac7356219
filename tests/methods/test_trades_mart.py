"""TRADES (Zhang et al. 2019) and MART (Wang et al. 2020): losses recomputed by hand from the
same logits, the KL's direction, the attacks' start and steps, all-layer on the adversarial
branch only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from robust_amo.attacks import NoisyStartPGD, TRADESAttack, kl_to_clean, pgd_step
from robust_amo.config import AllLayerOptions, ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.methods import AdversarialPoint, Adversary, mart_loss, trades_loss
from robust_amo.perturb import perturb
from robust_amo.runs import RunDir
from robust_amo.train import train
from tests.helpers import batch, tiny_model, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

THREAT = ThreatModel("linf", 0.1, 0.03, 3, True, "ce")


def test_kl_is_kl_of_clean_to_adversarial():
    p_logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    want = (p * (p / q).log()).sum(1)
    got = kl_to_clean(p_logits, q_logits)
    assert torch.allclose(got, want, atol=1e-6)
    # not the other direction
    assert not torch.allclose(got, (q * (q / p).log()).sum(1), atol=1e-3)


def test_trades_loss_by_hand():
    x, y = batch(n=8)
    model = tiny_model().train()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    torch.manual_seed(0)
    loss, logits = trades_loss(model, x, AdversarialPoint(x_adv), y, beta=3.0)
    clean, adv = model(x), model(x_adv)
    p, log_p, log_q = clean.softmax(1), clean.log_softmax(1), adv.log_softmax(1)
    want = F.cross_entropy(clean, y) + 3.0 * (p * (log_p - log_q)).sum(1).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.equal(logits, adv)
    # the gradient reaches the weights through both branches: beta changes it
    g3 = torch.autograd.grad(loss, list(model.parameters()))
    g0 = torch.autograd.grad(trades_loss(model, x, AdversarialPoint(x_adv), y, beta=0.0)[0],
                             list(model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(g3, g0, strict=True))


def test_mart_loss_by_hand():
    x, y = batch(n=8)
    model = tiny_model().train()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    loss, _ = mart_loss(model, x, AdversarialPoint(x_adv), y, beta=5.0)
    adv_p, nat_p = model(x_adv).softmax(1), model(x).softmax(1)
    total = 0.0
    for i in range(len(y)):
        others = [k for k in range(adv_p.shape[1]) if k != int(y[i])]
        k_wrong = max(others, key=lambda k: adv_p[i, k].item())
        bce = -torch.log(adv_p[i, y[i]]) - torch.log(1.0001 - adv_p[i, k_wrong] + 1e-12)
        kl = sum(nat_p[i, k] * (torch.log(nat_p[i, k]) - torch.log(adv_p[i, k] + 1e-12))
                 for k in range(adv_p.shape[1]))
        total = total + bce / len(y) + 5.0 * kl * (1.0000001 - nat_p[i, y[i]]) / len(y)
    assert torch.allclose(loss, total, atol=1e-5)


def test_noisy_start_and_steps_by_hand():
    """x_0 = x + 0.001·N(0, I) from the generator (not clipped), then PGD steps on the loss."""
    x, y = batch(n=4)
    model = tiny_model()
    attack = TRADESAttack(model, THREAT, torch.Generator().manual_seed(3))
    x0 = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(attack.start(x), x0)
    got = TRADESAttack(model, THREAT, torch.Generator().manual_seed(3))(x, y)
    model.eval()
    clean = model(x).detach()
    want = x0
    for _ in range(THREAT.steps):
        want = want.detach().requires_grad_(True)
        kl = kl_to_clean(clean, model(want)).sum()
        g, = torch.autograd.grad(kl, want)
        want = pgd_step(want.detach(), g, x, THREAT.eps, THREAT.step_size, "linf")
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - x).abs().max() <= THREAT.eps + 1e-6
    # MART's attack: same start, cross-entropy instead of the KL
    mart = NoisyStartPGD(model, THREAT, torch.Generator().manual_seed(3))(x, y)
    assert not torch.allclose(mart, got)


def test_trades_all_layer_perturbs_only_the_adversarial_branch():
    x, y = batch(n=8)
    model = tiny_model()
    attack = TRADESAttack(model, THREAT, torch.Generator().manual_seed(0))
    point = Adversary(attack, AllLayerOptions(0.9, 0.5, "sum"))(x, y)
    assert point.deltas is not None and all(d is not None and d.abs().sum() > 0
                                            for d in point.deltas)
    model.train()
    loss, adv = trades_loss(model, x, point, y)
    with perturb(model, point.deltas, requires_grad=False):
        want_adv = model(point.x)
    clean = model(x)
    assert torch.allclose(adv, want_adv, atol=1e-6)
    want = F.cross_entropy(clean, y) + 6.0 * kl_to_clean(clean, want_adv).mean()
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_trains_and_checks_options(tmp_path, method):
    cfg = tiny_run(tmp_path / method, method=method, method_args={"beta": 2}, epochs=3)
    train(cfg, progress=False)
    lines = [json.loads(s) for s in RunDir(tmp_path / method).metrics.read_text().splitlines()]
    losses = [line["train_loss"] for line in lines]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    with pytest.raises(ConfigError, match="method_args.beta"):
        tiny_run(tmp_path / "x", method=method, method_args={"beta": -1})
    with pytest.raises(ConfigError, match="method_args.all_layer.rho"):
        tiny_run(tmp_path / "x", method=method, method_args={"all_layer": {"rho": -1}})
