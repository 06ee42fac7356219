"""Adversarial weight perturbation (Wu, Xia & Wang 2020) on any adversarial method (issue 22).

Every figure is recomputed by hand on a copy of the model: v_l = γ‖w_l‖ g_l/‖g_l‖ on the conv
and linear weights only, the training gradient is the base loss's gradient at w + v, the
optimiser's step is the only thing that moves the weights, and the BatchNorm statistics move
once per step (the training forward), never in the ascent.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from robust_amo.attacks import PGD
from robust_amo.config import from_dict
from robust_amo.errors import ConfigError
from robust_amo.methods import (
    METHODS,
    AdversarialPoint,
    AWPObjective,
    AWPOptions,
    adversarial_ce,
    at_weights,
    build_objective,
    method_options,
    weight_perturbation,
)
from robust_amo.runs import RunDir
from robust_amo.train import train
from tests.helpers import batch, sgd_step, tiny_model, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

AMO = {"rho": 0.9, "eta_delta": 0.05, "delta_grad": "mean"}

BASES = [("pgd", {}), ("pgd", {"all_layer": AMO}), ("trades", {})]
"""Every base AWP runs on; ``trades`` joins when its method is registered."""


def _bases():
    return [pytest.param(b, a, id=f"{b}{'+all_layer' if a else ''}",
                         marks=pytest.mark.skipif(b not in METHODS, reason=f"no {b} method"))
            for b, a in BASES]


def _awp_cfg(tmp_path, base="pgd", base_args=None, arch="tiny-cnn", **awp):
    return tiny_run(tmp_path, method="awp", arch=arch,
                    method_args={"base": base, "base_args": base_args or {}, **awp})


def _objective(cfg, model):
    gen = torch.Generator().manual_seed(0)
    return build_objective(cfg, PGD.from_threat(model, cfg.attack, generator=gen), gen)


def _reference_weights(model):
    """The reference's rule (csdongxian/AWP utils_awp.diff_in_weights): entries named
    ``weight`` with more than one dimension."""
    return [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]


def _v_by_hand(model, loss_fn, x, point, y, gamma):
    """v_l = γ‖w_l‖ g_l/‖g_l‖ from a train-mode forward on a copy (the reference's proxy)."""
    proxy = copy.deepcopy(model).train()
    loss, _ = loss_fn(proxy, x, point, y)
    loss.backward()
    params = dict(proxy.named_parameters())
    return {n: gamma * params[n].detach().norm() / params[n].grad.norm() * params[n].grad
            for n in _reference_weights(proxy)}


def test_options_defaults_and_errors_name_the_key():
    opts = AWPOptions()
    assert (opts.base, opts.gamma, opts.base_args, opts.warmup_epochs) == ("pgd", 5e-3, {}, 0)
    assert AWPOptions(warmup=3).warmup_epochs == 3
    cases = [({"gamma": -1.0}, "method_args.gamma"), ({"gamma": "nan"}, "method_args.gamma"),
             ({"warmup": -1}, "method_args.warmup"), ({"base": "sgd"}, "method_args.base"),
             ({"base_args": {"beta": 6}}, "method_args.base_args.beta"),
             ({"base_args": {"all_layer": {"rho": -1}}}, "method_args.base_args.all_layer.rho"),
             ({"base_args": {"all_layer": {"x": 1}}}, "method_args.base_args.all_layer.x")]
    for args, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(AWPOptions, args, prefix="method_args.")
    parsed = from_dict(AWPOptions, {"base_args": {"all_layer": AMO}}, prefix="method_args.")
    assert parsed.base_options().all_layer.eta_delta == AMO["eta_delta"]


@pytest.mark.parametrize("arch", ["tiny-cnn", "tiny-wrn"])
def test_weight_perturbation_recomputed_by_hand(arch):
    """Only the conv/linear weights, per-layer norms, γ; the model is not touched: weights,
    BatchNorm statistics and .grad all as before."""
    model = tiny_model(arch).train()
    x, y = batch(n=12)
    point = AdversarialPoint((x + 0.05 * torch.randn_like(x)).clamp(0, 1))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    wp = weight_perturbation(model, adversarial_ce, x, point, y, gamma=0.01)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    names = _reference_weights(model)
    assert wp.names == names
    assert not any("bn" in n or n.endswith("bias") for n in wp.names)
    hand = _v_by_hand(model, adversarial_ce, x, point, y, 0.01)
    params = dict(model.named_parameters())
    assert set(wp.v) == {id(params[n]) for n in names}
    for n in names:
        v = wp.v[id(params[n])]
        assert v.dtype == params[n].dtype and not v.requires_grad
        torch.testing.assert_close(v, hand[n], rtol=1e-5, atol=1e-9)
        assert math.isclose(v.norm().item(), 0.01 * params[n].norm().item(), rel_tol=1e-4)
    # the ascent: the loss at w + v is above the loss at w
    with torch.no_grad():
        up, _ = adversarial_ce(at_weights(model, wp.v), x, point, y)
    assert up.item() > wp.loss.item()


@pytest.mark.parametrize("base,base_args", _bases())
def test_awp_step_is_the_base_gradient_at_w_plus_v(tmp_path, base, base_args):
    """One training step: the gradient equals the base loss's gradient at weights set to w + v
    by hand on a copy, the new weights are exactly w − lr·g (SGD), and the BatchNorm statistics
    are those of the base loss's training forwards at w + v (none from the ascent)."""
    cfg = _awp_cfg(tmp_path, base, base_args, gamma=0.02, warmup=0)
    model = tiny_model("tiny-wrn").train()
    x, y = batch(n=12)
    objective = _objective(cfg, model)
    assert isinstance(objective, AWPObjective)
    points = []
    attack = objective.base.adversary
    objective.base.adversary = lambda xs, ys: points.append(attack(xs, ys)) or points[-1]
    start = copy.deepcopy(model)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _ = objective(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()

    (point,) = points
    base_loss = objective.base_loss
    v = _v_by_hand(start, base_loss, x, point, y, 0.02)
    moved = copy.deepcopy(start).train()
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in v:
                p.add_(v[n])
    hand_loss, _ = base_loss(moved, x, point, y)
    hand_loss.backward()
    torch.testing.assert_close(loss.detach(), hand_loss.detach(), rtol=1e-6, atol=1e-7)
    for n, p in moved.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    for (n, p), (_, p0) in zip(model.named_parameters(), start.named_parameters(), strict=True):
        assert torch.equal(p.detach(), p0.detach().add(grads[n], alpha=-0.1)), n
    for (n, b), (_, b1) in zip(model.named_buffers(), moved.named_buffers(), strict=True):
        torch.testing.assert_close(b, b1, rtol=1e-6, atol=1e-7, msg=n)
    # as many BatchNorm updates as the base loss's own training forwards (pgd 1, trades 2):
    # the ascent's forward updated none
    forwards = 2 if base == "trades" else 1
    tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == forwards for b in tracked)


def test_all_layer_hooks_run_at_w_plus_v():
    """With δ the loss at w + v is the perturbed network's: not the loss at x' alone."""
    from robust_amo.config import AllLayerOptions
    from robust_amo.methods import Adversary

    model = tiny_model("tiny-cnn").train()
    x, y = batch(n=8)
    pgd = PGD(model, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(1))
    point = Adversary(pgd, AllLayerOptions(0.9, 0.5, "sum"))(x, y)
    assert point.deltas is not None
    wp = weight_perturbation(model, adversarial_ce, x, point, y, gamma=0.01)
    moved = at_weights(model, wp.v)
    with torch.no_grad():
        with_delta, _ = adversarial_ce(moved, x, point, y)
        without, _ = adversarial_ce(moved, x, AdversarialPoint(point.x), y)
    assert with_delta.item() > without.item()


def test_warmup_epochs_are_the_base_step_bit_for_bit(tmp_path):
    model = tiny_model("tiny-wrn")
    plain = copy.deepcopy(model)
    x, y = batch(n=12)
    awp = _objective(_awp_cfg(tmp_path / "a", warmup=2), model)
    pgd = _objective(tiny_run(tmp_path / "p"), plain)
    for epoch in range(2):
        awp.begin_epoch(epoch)
        pgd.begin_epoch(epoch)
        sgd_step(model, awp, x, y)
        sgd_step(plain, pgd, x, y)
        assert awp.epoch_metrics() == {}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  plain.state_dict().values(), strict=True))
    awp.begin_epoch(2)
    pgd.begin_epoch(2)
    sgd_step(model, awp, x, y)
    sgd_step(plain, pgd, x, y)
    assert awp.epoch_metrics()["awp_loss_gain"] > 0
    assert not torch.equal(model.classifier.weight, plain.classifier.weight)


def test_bf16_autocast_step_matches_by_hand():
    """Under bf16 autocast the weights and v stay float32 and the gradient is the one at w + v
    computed by hand under the same autocast."""
    model = tiny_model("tiny-cnn").train()
    x, y = batch(n=8)
    point = AdversarialPoint((x + 0.05).clamp(0, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wp = weight_perturbation(model, adversarial_ce, x, point, y, gamma=0.01)
        loss, _ = adversarial_ce(at_weights(model, wp.v), x, point, y)
    loss.backward()
    assert all(v.dtype == torch.float32 for v in wp.v.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.grad = None
            if id(params[n]) in wp.v:
                p.add_(wp.v[id(params[n])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hand = F.cross_entropy(moved(point.x).float(), y)
    hand.backward()
    assert loss.item() == hand.item()
    for (n, p), (_, q) in zip(model.named_parameters(), moved.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def _metrics(folder):
    return [json.loads(s) for s in RunDir(folder).metrics.read_text().splitlines()]


def _weights(folder):
    return torch.load(RunDir(folder).last, weights_only=True)["model"]


@pytest.mark.parametrize("arch,base_args", [("tiny-cnn", {"all_layer": AMO}), ("tiny-wrn", {})])
def test_awp_trains_on_digits(tmp_path, arch, base_args):
    """Two epochs: finite losses, AWP raises the loss every epoch, δ still logged with
    all_layer, and the options reach the run (method_options reads them back)."""
    cfg = _awp_cfg(tmp_path, base_args=base_args, arch=arch, gamma=0.01)
    assert method_options(cfg).gamma == 0.01
    train(cfg, progress=False)
    lines = _metrics(tmp_path)
    assert len(lines) == 2
    for line in lines:
        assert math.isfinite(line["train_loss"]) and line["awp_loss_gain"] > 0
        assert ("delta_rel_size" in line) == bool(base_args)


def test_gamma_zero_trains_pgd_bit_for_bit(tmp_path):
    """γ = 0 puts w + 0 = w in place: with BatchNorm (tiny-wrn) the run is pgd's exactly, so
    the ascent forward changed nothing (statistics, random streams, weights)."""
    train(_awp_cfg(tmp_path / "awp", gamma=0.0, arch="tiny-wrn"), progress=False)
    train(tiny_run(tmp_path / "pgd", arch="tiny-wrn"), progress=False)
    a, b = _weights(tmp_path / "awp"), _weights(tmp_path / "pgd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _metrics(tmp_path / "awp"), _metrics(tmp_path / "pgd")
    assert [m["train_loss"] for m in la] == [m["train_loss"] for m in lb]
    assert all(m["awp_loss_gain"] == 0 for m in la)
