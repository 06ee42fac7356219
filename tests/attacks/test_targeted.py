"""Targeted PGD (issue 23): target order, the losses recomputed by hand, the worst case over
targets, and its place in the evaluation registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_amo.attacks import PGD, TargetedPGD, malt_targets, targeted_loss, top_targets
from robust_amo.errors import ConfigError
from robust_amo.evaluation import parse_attack, pgd_robust
from robust_amo.evaluation.pgd_eval import PGDSettings


def _linear(seed: int = 0, classes: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, classes)).eval()


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 4, generator=g), torch.randint(6, (n,), generator=g)


def test_targets_are_the_other_classes_by_clean_logit_ties_to_the_lower_class():
    logits = torch.tensor([[0.0, 5.0, 3.0, 5.0, -1.0],
                           [9.0, 1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([1, 0])
    assert top_targets(logits, y, 4).tolist() == [[3, 2, 0, 4], [4, 3, 2, 1]]
    assert top_targets(logits, y, 2).tolist() == [[3, 2], [4, 3]]
    with pytest.raises(ConfigError, match="at least 6 classes"):
        top_targets(logits, y, 5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_malt_ranks_by_the_exact_boundary_distance_of_a_linear_model(norm):
    """For z = Wx + b the boundary between y and t is the hyperplane (w_y − w_t)·x' = b_t − b_y,
    whose distance from x in the threat model's norm is (z_y − z_t) / ‖w_y − w_t‖_* (dual norm):
    stepping that far along the dual direction ties z_t with z_y, a little further makes t win,
    and no other class can win within the nearest target's distance."""
    model = _linear(seed=3)
    x, _ = _data(30, seed=4)
    y = model(x).argmax(1).detach()
    w = model[1].weight.detach().double()
    ranked = malt_targets(model, x, y, norm=norm)
    assert ranked.shape == (30, 5)
    for i in range(30):
        xi = x[i].flatten().double()
        z = model[1](xi[None].float()).detach().double()[0]
        dist = {}
        for t in range(6):
            if t == int(y[i]):
                continue
            u = w[t] - w[y[i]]
            dual = u.abs().sum() if norm == "linf" else u.norm()
            dist[t] = float((z[y[i]] - z[t]) / dual)
            step = u.sign() if norm == "linf" else u / u.norm()
            tie = z[t] - z[y[i]] + dist[t] * (u @ step)
            assert abs(float(tie)) < 1e-9
        want = sorted(dist, key=lambda t: (dist[t], t))
        assert ranked[i].tolist() == want, (i, dist)
    assert torch.equal(malt_targets(model, x, y, 2, norm=norm), ranked[:, :2])


def test_malt_costs_one_forward_and_a_backward_per_class():
    from robust_amo.evaluation.runner import PassCounter

    model = _linear()
    x, y = _data(7)
    with PassCounter(model) as count:
        malt_targets(model, x, y, 2)
    assert count.counts() == (7, 7 * 6)
    with pytest.raises(ConfigError, match="at least 7 classes"):
        malt_targets(model, x, y, 6)


def test_the_losses_recomputed_by_hand():
    z = torch.tensor([[1.0, 4.0, 2.0, 0.5, -3.0],
                      [2.0, -1.0, 0.0, 7.0, 1.0]])
    y, t = torch.tensor([0, 3]), torch.tensor([2, 4])
    assert torch.allclose(targeted_loss(z, y, t, "cw"), torch.tensor([2 - 1.0, 1 - 7.0]))
    # DLR-targeted: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2), pi sorting z downwards
    want = torch.tensor([(2 - 1.0) / (4 - (1.0 + 0.5) / 2), (1 - 7.0) / (7 - (1.0 + 0.0) / 2)])
    assert torch.allclose(targeted_loss(z, y, t, "dlr"), want)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        targeted_loss(z[:, :3], torch.tensor([0, 1]), torch.tensor([1, 2]), "dlr")


@pytest.mark.parametrize("loss", ["cw", "dlr"])
def test_loss_fn_pulls_towards_the_ranked_target(loss):
    model = _linear()
    x, y = _data(8)
    attack = TargetedPGD(model, eps=0.1, step_size=0.02, steps=3, targets=3, target_loss=loss)
    clean = model(x).detach()
    for rank in range(3):
        attack.target_rank = rank
        fn = attack.loss_fn(x, y)
        x_adv = x + 0.01
        got, logits = fn(x_adv)
        z = model(x_adv).detach()
        # by hand: the rank-th largest clean logit other than the label's
        t = torch.tensor([sorted((c for c in range(6) if c != int(y[i])),
                                 key=lambda c, i=i: (-float(clean[i, c]), c))[rank]
                          for i in range(8)])
        margin = z[torch.arange(8), t] - z[torch.arange(8), y]
        if loss == "dlr":
            s = z.sort(1, descending=True).values
            margin = margin / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12)
        assert torch.allclose(got, margin, atol=1e-6) and torch.equal(logits.detach(), z)


def _correct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Labels the model gets right on x: every example is attacked."""
    return model(x).argmax(1).detach()


def test_the_attack_raises_the_target_margin():
    model = _linear()
    x = _data(16)[0]
    y = _correct(model, x)
    attack = TargetedPGD(model, eps=0.05, step_size=0.01, steps=5, targets=1,
                         random_start=False)
    t = top_targets(model(x), y, 1)[:, 0]
    x_adv = attack(x, y)
    before = targeted_loss(model(x), y, t, "cw")
    after = targeted_loss(model(x_adv), y, t, "cw")
    # examples misclassified at x are frozen there (the first misclassified iterate is kept)
    ok = model(x).argmax(1) == y
    assert ok.all() and (after > before).all()
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6


def test_worst_case_over_targets_is_the_union_of_each_target_alone():
    model = _linear(4)
    x = _data(60)[0]
    y = _correct(model, x)
    kw = dict(eps=0.08, step_size=0.02, steps=4, random_start=False, early_stop=True)
    wc = TargetedPGD(model, targets=4, **kw).worst_case(x, y)
    alone = []
    for rank in range(4):
        one = TargetedPGD(model, targets=4, **kw)
        one.target_rank = rank
        alone.append(PGD.worst_case(one, x, y).fooled)
    union = torch.stack(alone).any(0)
    assert torch.equal(wc.fooled, union)
    # the curve is cumulative in target order: row t is the union of targets 1..t
    for t in range(4):
        assert torch.equal(wc.after_restart[t], torch.stack(alone[: t + 1]).any(0))
    assert 0 < int(alone[0].sum()) < int(union.sum()) < 60, "later targets should matter here"
    # no early exit: the same masks
    full = TargetedPGD(model, targets=4, **kw).worst_case(x, y, early_exit=False)
    assert torch.equal(full.fooled, wc.fooled)
    # a broken example's kept point is misclassified and inside the ball
    pred = model(wc.x_adv).argmax(1)
    assert (pred[wc.fooled] != y[wc.fooled]).all()
    assert (wc.x_adv - x).abs().max() <= 0.08 + 1e-6


def test_registry_names_and_the_evaluation_worst_case():
    spec = parse_attack("pgd4-t3", eps=0.08)
    s = spec.settings()
    assert (s["steps"], s["targets"], s["target_loss"], s["restarts"], s["loss"]) == (
        4, 3, "cw", 1, "cw-targeted")
    assert parse_attack("pgd4-t3-dlr", eps=0.08).settings()["target_loss"] == "dlr"
    assert "targets" not in parse_attack("pgd4", eps=0.08).settings()
    with pytest.raises(ConfigError, match="at least one step and one target"):
        parse_attack("pgd4-t0", eps=0.08)
    model = _linear(3)
    x = _data(60)[0]
    y = _correct(model, x)
    settings = PGDSettings(spec.pgd.threat.replace(random_start=False), 2, targets=3)
    r = pgd_robust(model, x, y, torch.arange(60), settings)
    assert r.after_restart.shape == (6, 60)
    assert settings.step_names()[:3] == ["target 1 restart 1", "target 1 restart 2",
                                         "target 2 restart 1"]
    # the evaluation's targeted PGD is the attack's worst case over targets and restarts
    attack = TargetedPGD.from_threat(model, settings.threat, restarts=2, targets=3,
                                     early_stop=True)
    assert torch.equal(r.robust, r.clean & ~attack.worst_case(x, y).fooled)
    assert r.clean.all() and 0 < int(r.robust.sum()) < 60
