"""Auto-PGD (Croce & Hein 2020, Algorithm 1): checkpoints, the step-size rule, a closed-form
optimum, early exit and the CE-then-targeted cascade."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_amo.attacks import APGD, apgd_targets, ce_then_targeted, checkpoints
from robust_amo.attacks.apgd import _State
from tests.helpers import batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_are_the_papers():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (steps 0.19, 0.16, ..., then 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000)[:3] == [220, 410, 570]


def test_step_size_halves_on_either_condition():
    x = torch.zeros(3, 1)
    s = _State(x, x, torch.zeros(3, dtype=torch.long), eta=1.0)
    s.observe(0, torch.tensor([0.0, 0.0, 0.0]))
    # example 0 rose at every step; 1 rose once; 2 rose every step but its f_max is unchanged
    for k, f in enumerate([[1.0, 0.5, 0.0], [2.0, 0.4, 0.0], [3.0, 0.3, 0.0]], start=1):
        s.observe(k, torch.tensor(f))
    s.rises[2] = 3  # condition (1) holds for it: only condition (2) can halve its step
    reset = s.checkpoint(0.75 * 3)
    assert reset.tolist() == [False, True, True]
    assert s.eta.tolist() == [1.0, 0.5, 0.5]
    # at the next checkpoint condition (2) does not apply where the step was just halved
    s.rises[:] = 3
    assert s.checkpoint(0.75 * 3).tolist() == [True, False, False]


def test_linear_two_class_model_reaches_the_corner():
    """For logits (w·x + b, 0) the cross-entropy of class 0 is largest at the corner
    x − eps·sign(w) of the box (clipped to [0, 1]); with a margin too large to flip, APGD ends
    there."""
    torch.manual_seed(0)
    d = 12
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([0.5 * torch.randn(d), torch.zeros(d)]))
        model[1].bias.copy_(torch.tensor([5.0, 0.0]))  # a margin eps cannot overturn
    x = torch.rand(4, 1, 3, 4)
    y = torch.zeros(4, dtype=torch.long)
    eps = 0.05
    got = APGD(model, eps=eps, steps=20)(x, y)
    w = model[1].weight[0].view(1, 1, 3, 4)
    corner = (x - eps * w.sign()).clamp(0, 1)
    assert torch.allclose(got, corner, atol=1e-6)


def test_broken_examples_stop_and_stay_in_the_ball():
    x, y = batch(n=16)
    model = tiny_model().eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    attack = APGD(model, eps=0.3, steps=10)
    x_adv = attack(x, y)
    fooled = attack.last_fooled
    assert fooled.any() and (x_adv - x).abs().max() <= 0.3 + 1e-6
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    assert torch.equal(pred[fooled] != y[fooled], torch.ones_like(y[fooled], dtype=torch.bool))
    # at most N + 1 evaluations per example, fewer once examples leave the batch
    assert sum(calls) < 11 * len(y)


def test_cascade_is_at_least_as_strong_as_its_first_attack():
    x, y = batch(n=16)
    model = tiny_model().eval()
    ce = APGD(model, eps=0.1, steps=10, generator=torch.Generator().manual_seed(1))
    ce_alone = APGD(model, eps=0.1, steps=10, generator=torch.Generator().manual_seed(1))
    ce_alone(x, y)
    targets = apgd_targets(model, x, y, 3)
    assert targets.shape == (16, 3) and not (targets == y[:, None]).any()
    x_adv, fooled, after = ce_then_targeted(ce, APGD(model, eps=0.1, steps=10, loss="dlr-t"), x, y,
                                     targets)
    assert (fooled | ~ce_alone.last_fooled).all()  # every example CE broke stays broken
    assert torch.equal(after[0], ce_alone.last_fooled) and torch.equal(after[-1], fooled)
    assert all((a <= b).all() for a, b in zip(after, after[1:], strict=False))
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1) != y, fooled)
