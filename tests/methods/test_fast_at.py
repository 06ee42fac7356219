"""Fast adversarial training (issue 22): FGSM-RS (Wong et al. 2020) and N-FGSM (de Jorge et al.
2022), each point recomputed by hand from the same generator draw; their methods train, refuse
L2 and compose with all-layer perturbations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from robust_amo.attacks import FGSMRS, NFGSM, PGD, RobustAMOAttack
from robust_amo.cli import main
from robust_amo.errors import ConfigError
from robust_amo.methods import (
    AdversarialObjective,
    FGSMRSOptions,
    NFGSMOptions,
    build_objective,
    method_options,
)
from robust_amo.resolve import resolve
from robust_amo.runs import RunDir
from robust_amo.train import train
from tests.helpers import batch, tiny_model, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
SEED = 7


def _grad_at(model, x0, y):
    """∇ of the summed cross-entropy at x0, the model in eval mode (as the attacks take it)."""
    model.eval()
    x0 = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    return g


def _uniform(x, half_width, seed):
    """clip(x + U(−w, w)) from a CPU generator seeded ``seed``: the draw the attacks make."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + (2 * u - 1) * half_width).clamp(0, 1)


def test_fgsm_rs_point_is_the_hand_computation():
    """x' = Π_{ε-ball ∩ [0,1]}(x_0 + 1.25ε·sign(∇ℓ(x_0))), x_0 = clip(x + U(−ε, ε))."""
    model = tiny_model()
    x, y = batch()
    model.train()
    got = FGSMRS(model, eps=EPS, generator=torch.Generator().manual_seed(SEED))(x, y)
    assert model.training  # the attack's eval mode is given back
    x0 = _uniform(x, EPS, SEED)
    stepped = x0 + 1.25 * EPS * _grad_at(model, x0, y).sign()
    want = torch.minimum(torch.maximum(stepped, x - EPS), x + EPS).clamp(0, 1)
    assert torch.equal(got, want)
    # the projection is active: without it the point differs and leaves the ball
    assert not torch.equal(stepped.clamp(0, 1), want)
    assert (got - x).abs().max() <= EPS + 1e-6
    assert ((got - x).abs() >= EPS - 1e-6).float().mean() > 0.3  # many coordinates on the rim


def test_n_fgsm_point_is_the_hand_computation_and_leaves_the_ball():
    """x' = clip(x_0 + ε·sign(∇ℓ(x_0))), x_0 = clip(x + η), η ~ U(−2ε, 2ε): no projection."""
    model = tiny_model()
    x, y = batch()
    got = NFGSM(model, eps=EPS, generator=torch.Generator().manual_seed(SEED))(x, y)
    x0 = _uniform(x, 2 * EPS, SEED)
    want = (x0 + EPS * _grad_at(model, x0, y).sign()).clamp(0, 1)
    assert torch.equal(got, want)
    dist = (got - x).abs().max()
    assert 2 * EPS < dist <= 3 * EPS + 1e-6  # outside the ε-ball, inside 3ε
    assert 0 <= got.min() and got.max() <= 1


def test_n_fgsm_ratios_and_no_noise():
    """noise_ratio 0 starts at x and draws nothing; step_ratio scales α."""
    model = tiny_model()
    x, y = batch()
    gen = torch.Generator().manual_seed(SEED)
    state = gen.get_state()
    got = NFGSM(model, eps=EPS, noise_ratio=0, step_ratio=0.5, generator=gen)(x, y)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(got, (x + 0.5 * EPS * _grad_at(model, x, y).sign()).clamp(0, 1))


def test_bad_ratios_and_l2_are_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="noise_ratio"):
        NFGSM(model, noise_ratio=-1)
    with pytest.raises(ConfigError, match="step_ratio"):
        FGSMRS(model, step_ratio=float("nan"))
    l2 = PGD(model, norm="l2", eps=0.5).threat
    with pytest.raises(ConfigError, match="attack.norm") as e:
        FGSMRS.from_threat(model, l2)
    assert e.value.params == ("attack.norm",)
    for method in ("fgsm-rs", "n-fgsm"):
        cfg = resolve(None, [{"method": method, "attack": {"norm": "l2", "eps": 0.5}}])
        with pytest.raises(ConfigError, match="attack.norm"):
            build_objective(cfg, PGD.from_threat(model, cfg.attack))
    with pytest.raises(ConfigError, match="method_args.step_ratio"):
        method_options(resolve(None, [{"method": "fgsm-rs",
                                       "method_args": {"step_ratio": -0.5}}]))
    with pytest.raises(ConfigError, match="method_args.noise_ratio"):
        method_options(resolve(None, [{"method": "n-fgsm",
                                       "method_args": {"noise_ratio": ".inf"}}]))


def test_cli_refuses_l2_in_one_line(tmp_path, capsys):
    rc = main(["train", "--method", "n-fgsm", "--norm", "l2", "--dataset", "digits",
               "--arch", "tiny-mlp", "--epochs", "1", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "run"), "--set", "data.train_subset=100",
               "--set", "eval.n_examples=10"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "attack.norm" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_paper_defaults():
    assert FGSMRSOptions().step_ratio == 1.25  # Wong et al. 2020: α = 10/255 at ε = 8/255
    assert (NFGSMOptions().noise_ratio, NFGSMOptions().step_ratio) == (2.0, 1.0)
    a = NFGSM(tiny_model())
    assert (a.steps, a.step_size) == (1, pytest.approx(8 / 255))


@pytest.mark.parametrize("method,cls,step", [("fgsm-rs", FGSMRS, 1.25), ("n-fgsm", NFGSM, 1.0)])
def test_method_takes_eps_and_generator_from_the_training_attack(method, cls, step):
    """ε, loss and generator are cfg.attack's; its steps and step size are not used."""
    cfg = resolve(None, [{"method": method, "attack": {"eps": 0.2, "step_size": 0.01,
                                                       "steps": 7, "loss": "cw"}}])
    pgd = PGD.from_threat(tiny_model(), cfg.attack, generator=torch.Generator())
    objective = build_objective(cfg, pgd)
    assert isinstance(objective, AdversarialObjective)
    attack = objective.adversary.attack
    assert type(attack) is cls and attack.generator is pgd.generator
    assert (attack.eps, attack.steps, attack.loss) == (0.2, 1, "cw")
    assert attack.step_size == pytest.approx(step * 0.2)


@pytest.mark.parametrize("method", ["fgsm-rs", "n-fgsm"])
def test_all_layer_composes(method):
    """One joint step: x' is the input attack's own (δ starts at 0, so the gradient is the
    same) and each δ_j is a non-zero step; the objective logs what δ does."""
    model = tiny_model()
    x, y = batch()
    cfg = resolve(None, [{"method": method, "attack": {"eps": EPS},
                          "method_args": {"all_layer": {"rho": 0.9, "eta_delta": 0.05}}}])
    gen = torch.Generator()
    objective = build_objective(cfg, PGD.from_threat(model, cfg.attack, generator=gen))
    assert isinstance(objective.adversary.joint, RobustAMOAttack)
    gen.manual_seed(SEED)
    point = objective.adversary(x, y)
    gen.manual_seed(SEED)
    alone = objective.adversary.attack(x, y)
    assert torch.equal(point.x, alone)
    assert point.deltas is not None
    assert len(point.deltas) == len(model.perturbation_points())
    assert all(d is not None and d.abs().sum() > 0 for d in point.deltas)
    objective.begin_epoch(0)
    objective.log_next()
    model.train()
    objective(model, x, y)
    logged = objective.epoch_metrics()
    assert all(s > 0 for s in logged["delta_rel_size"])


@pytest.mark.parametrize("method", ["fgsm-rs", "n-fgsm"])
def test_method_trains_on_digits(tmp_path, method):
    """Two epochs on digits: the training loss goes down and the check beats chance."""
    cfg = tiny_run(tmp_path, method=method, data={"train_subset": 600}, batch_size=50,
                   optim={"lr": 0.1, "schedule": "constant"}, eval={"n_examples": 100})
    last = train(cfg, progress=False)
    lines = RunDir(tmp_path).read_metrics()
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    assert last["clean_acc"] > 0.3  # chance is 0.1
    assert json.loads(json.dumps(last)) == last
