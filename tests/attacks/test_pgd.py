import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_amo.attacks import PGD, margin_loss, pgd_step


def _batch(digits, n=64):
    train, test = digits
    return test.x[:n].float() / 255, test.y[:n]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_bounds_and_box(trained_tiny, digits, norm, eps):
    x, y = _batch(digits)
    x_adv = PGD(trained_tiny, eps=eps, step_size=eps / 3, steps=7, norm=norm,
                generator=torch.Generator().manual_seed(1))(x, y)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > 0.5 * eps).float().mean() > 0.5  # it moved


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("l2", "ce"), ("linf", "cw")])
def test_loss_increases_and_accuracy_drops(trained_tiny, digits, norm, loss):
    x, y = _batch(digits, 128)
    eps = 0.1 if norm == "linf" else 1.0
    x_adv = PGD(trained_tiny, eps=eps, step_size=eps / 4, steps=10, norm=norm, loss=loss)(x, y)
    with torch.no_grad():
        clean, adv = trained_tiny(x), trained_tiny(x_adv)
    if loss == "ce":
        l0 = F.cross_entropy(clean, y, reduction="none")
        l1 = F.cross_entropy(adv, y, reduction="none")
    else:
        l0, l1 = margin_loss(clean, y), margin_loss(adv, y)
    assert (l1 >= l0 - 1e-4).float().mean() > 0.95 and l1.mean() > l0.mean() + 0.1
    assert (adv.argmax(1) == y).float().mean() < (clean.argmax(1) == y).float().mean()


def test_same_generator_seed_same_result(trained_tiny, digits):
    x, y = _batch(digits, 32)
    run = lambda s: PGD(trained_tiny, eps=0.1, step_size=0.03, steps=3,  # noqa: E731
                        generator=torch.Generator().manual_seed(s))(x, y)
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    state = torch.get_rng_state()
    run(5)
    assert torch.equal(state, torch.get_rng_state())  # never touches the global RNG


class ModeSpy(nn.Module):
    """Linear model recording `training` at each forward (BatchNorm would follow the same flag)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.bn(self.lin(x.flatten(1)))


def test_eval_mode_during_attack_and_restored():
    m = ModeSpy().train()
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    stats = m.bn.running_mean.clone()
    PGD(m, eps=0.1, step_size=0.05, steps=3)(x, y)
    assert m.modes and not any(m.modes) and m.training
    assert torch.equal(stats, m.bn.running_mean)  # running statistics untouched
    assert all(p.grad is None for p in m.parameters())  # no weight gradients accumulated

    class Boom(Exception):
        pass

    def explode(*a):
        raise Boom

    m.lin.register_forward_hook(explode)
    with pytest.raises(Boom):
        PGD(m, eps=0.1, step_size=0.05, steps=1)(x, y)
    assert m.training


def test_linf_projection_closed_form():
    x = torch.tensor([[0.5, 0.0, 1.0, 0.3]])
    x_adv = torch.tensor([[0.55, 0.0, 1.0, 0.25]])
    g = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = pgd_step(x_adv, g, x, eps=0.1, alpha=0.08, norm="linf")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.0, 1.0, 0.2]]))
    out = pgd_step(x, torch.tensor([[3.0, 4.0, 0.0, 0.0]]), x, eps=0.1, alpha=1.0, norm="l2")
    torch.testing.assert_close(out, torch.tensor([[0.56, 0.08, 1.0, 0.3]]))


class Scripted(PGD):
    """PGD whose restarts return scripted results, to test the worst-case bookkeeping.

    Example i carries i in feature 0; the point returned by restart r carries r + 1 in feature 1.
    """

    def __init__(self, script):
        super().__init__(nn.Identity(), restarts=len(script), steps=1)
        self.script, self.calls = script, []

    def run_once(self, x, y, final_eval=False):
        r = len(self.calls)
        self.calls.append(len(y))
        idx = x[:, 0].long()
        fooled, loss = self.script[r]
        out = x.clone()
        out[:, 1] = r + 1
        return out, fooled[idx], loss[idx]


def test_restarts_keep_per_example_worst_case():
    x = torch.stack([torch.arange(4.0), torch.zeros(4)], 1)
    y = torch.zeros(4, dtype=torch.long)
    script = [
        (torch.tensor([True, False, False, False]), torch.tensor([9.0, 1.0, 5.0, 0.0])),
        (torch.tensor([False, False, True, False]), torch.tensor([0.0, 3.0, 2.0, 0.5])),
        (torch.tensor([False, False, False, False]), torch.tensor([0.0, 2.0, 0.0, 0.1])),
    ]
    atk = Scripted(script)
    out = atk(x, y)
    # restart r runs only on examples no earlier restart broke
    assert atk.calls == [4, 3, 2]
    # 0: broken by restart 1; 1: highest loss in restart 2; 2: broken by restart 2 although
    # restart 1 had a higher loss; 3: highest loss in restart 2
    assert out[:, 1].tolist() == [1.0, 2.0, 2.0, 2.0]


def test_restart_that_breaks_only_from_some_starts_counts():
    # f(x) = 1 - |x - 0.5| * 40 for class 0: misclassified only near the edges of the ball
    class Bump(nn.Module):
        def forward(self, x):
            s = (x.flatten(1)[:, 0] - 0.5).abs() * 40 - 1.5
            return torch.stack([-s, s], 1)

    x = torch.full((200, 1), 0.5)
    y = torch.zeros(200, dtype=torch.long)
    m = Bump()
    one = PGD(m, eps=0.05, steps=0, restarts=1, generator=torch.Generator().manual_seed(0))(x, y)
    many = PGD(m, eps=0.05, steps=0, restarts=8, generator=torch.Generator().manual_seed(0))(x, y)
    broken_one = (m(one).argmax(1) != y).float().mean()
    broken_many = (m(many).argmax(1) != y).float().mean()
    # with random starts only, P(broken) = 0.25 per start: 1 - 0.75^8 = 0.9 with 8 restarts
    assert 0.15 < broken_one < 0.35 and broken_many > 0.8


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        PGD(nn.Identity(), norm="l3")
    with pytest.raises(ValueError, match="loss"):
        PGD(nn.Identity(), loss="hinge")
    with pytest.raises(ValueError, match="restarts"):
        PGD(nn.Identity(), restarts=0)


def test_early_stop_steps_never_read_device_values_on_the_host(monkeypatch):
    """Freezing broken examples must be pure tensor work: a Python ``if`` on a device tensor
    (``bool(t)``, ``t.item()``) would make the host wait for the GPU at every PGD step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    ref = PGD(model, 0.3, 0.1, 5, early_stop=True).run_once(x, y, final_eval=True, x_init=x)

    def no_host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor inside the PGD step loop")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_host_read)
    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    out = PGD(model, 0.3, 0.1, 5, early_stop=True).run_once(x, y, final_eval=True, x_init=x)
    monkeypatch.undo()
    assert ref[1].any() and not ref[1].all()  # some examples freeze, others keep ascending
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)
