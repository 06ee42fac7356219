"""Margins (robust_amo.margins and `robust-amo margins`): closed forms, brute force, invariants."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from robust_amo.attacks import PGD
from robust_amo.cli import main
from robust_amo.margins import (
    SearchOptions,
    adversarial_margins,
    all_layer_margin,
    input_margin,
    kappa,
    output_margin,
    pgd_neighbourhood,
)
from robust_amo.models import create_model
from robust_amo.perturb import perturb
from tests.helpers import dense_jacobian

OPTS = SearchOptions(steps=20, rounds=12, rtol=0.005)




def _linear(num_classes: int, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The registered `linear` model on (1, 4, 4) inputs, no normalisation, given W and b."""
    m = create_model("linear", num_classes, input_shape=(1, 4, 4))
    with torch.no_grad():
        m.classifier.weight.copy_(weight)
        m.classifier.bias.copy_(bias if bias is not None else torch.zeros(num_classes))
    return m.eval()


def _binary(seed: int, n: int = 12):
    """Wei & Ma Example 2.1: F(x) = wᵀx as two logits ±w/2, ‖w‖ = 1, labels y ∈ {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    w = w / w.norm()
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return w, x, y


def test_example_2_1_linear_all_layer_margin_is_output_margin():
    w, x, y = _binary(0)
    x = x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # ‖x‖ = 1
    model = _linear(2, torch.stack([-w / 2, w / 2]))
    expected = ((2 * y - 1) * (x.flatten(1) @ w)).clamp_min(0)  # max(0, y·wᵀx)
    assert (expected > 0).sum() >= 3 and (expected == 0).sum() >= 3
    est = all_layer_margin(model, x, y, OPTS, witness=True)
    # an estimate from above, within the bisection tolerance
    assert torch.all(est.value >= expected - 1e-5)
    torch.testing.assert_close(est.value, expected, rtol=2 * OPTS.rtol, atol=1e-5)
    # the witness δ has the reported norm and misclassifies
    pos = expected > 0
    with torch.no_grad(), perturb(model, est.witness, requires_grad=False):
        pred = model(x).argmax(1)
    assert torch.all(pred[pos] != y[pos])
    norms = torch.cat([d.flatten(1) for d in est.witness], 1).norm(dim=1)
    torch.testing.assert_close(norms[pos], est.value[pos], rtol=1e-5, atol=1e-6)


def test_linear_multiclass_margins_and_kappa_closed_forms():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 16, generator=g), 0.3 * torch.randn(4, generator=g)
    model = _linear(4, weight, bias)
    x = torch.rand(10, 1, 4, 4, generator=g)
    y = model(x).argmax(1)  # all correct
    y[:2] = (y[:2] + 1) % 4  # two misclassified
    xn = x.flatten(1).norm(dim=1)
    logits = model(x).detach()
    gamma_j = logits.gather(1, y[:, None]) - logits  # (B, C)
    dist = (weight[y][:, None, :] - weight[None]).norm(dim=2)  # ‖w_y − w_j‖ (B, C)
    ratio = (gamma_j / dist.clamp_min(1e-12)).scatter(1, y[:, None], math.inf)
    exact = ratio.amin(1).clamp_min(0) / xn  # δ is scaled by ‖x‖

    est = all_layer_margin(model, x, y, OPTS)
    assert torch.all(est.value[:2] == 0)
    assert torch.all(est.value >= exact - 1e-5)  # nothing below the true minimum exists
    # the attack ascends max_j F_j − F_y, so it reaches at least the logit-closest class's plane
    j_star = logits.scatter(1, y[:, None], -math.inf).argmax(1)
    closest = ratio.gather(1, j_star[:, None]).squeeze(1) / xn
    assert torch.all(est.value[2:] <= closest[2:] * (1 + 2 * OPTS.rtol) + 1e-5)

    k = kappa(model, x, y)
    torch.testing.assert_close(k.gamma, output_margin(logits, y))
    torch.testing.assert_close(k.scales[:, 0], xn)
    spec = torch.linalg.matrix_norm(weight, 2)
    torch.testing.assert_close(k.jac_norms[:, 0], spec.expand(10), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.kappa[2:, 0], (xn * spec / k.gamma)[2:], rtol=1e-5, atol=1e-6)
    assert torch.all(torch.isinf(k.kappa[:2])) and torch.all(k.first_order_margin[:2] == 0)
    # first order: γ is √2-Lipschitz in the logits, so 1/(√2‖κ‖) ≤ m_F for a linear model
    assert torch.all(k.first_order_margin[2:] / math.sqrt(2) <= exact[2:] * (1 + 1e-5))


def test_input_margin_of_linear_model():
    w, x, y = _binary(2, n=4)
    x = 0.4 + 0.2 * x  # interior points: the minimiser x − t·w stays inside [0, 1]
    target = torch.tensor([0.02, 0.05, 0.08, 0.12])
    out = []
    for i in range(4):
        # bias chosen so that example i's margin (F_1 − F_0)·(2y − 1) is target[i]
        b = (2 * y[i] - 1) * target[i] - x[i].flatten() @ w
        model = _linear(2, torch.stack([-w / 2, w / 2]), torch.stack([-b / 2, b / 2]))
        out.append(input_margin(model, x[i:i + 1], y[i:i + 1], OPTS).value)
    est = torch.cat(out)
    assert torch.all(est >= target - 1e-5)
    torch.testing.assert_close(est, target, rtol=2 * OPTS.rtol, atol=1e-5)


def test_gram_spectral_norm_equals_dense_jacobian():
    torch.manual_seed(0)
    model = create_model("tiny-cnn", 10, input_shape=(1, 8, 8), mean=[0.3], std=[0.4]).eval()
    x = torch.rand(3, 1, 8, 8)
    y = model(x).argmax(1)  # gamma > 0: κ is finite
    k = kappa(model, x, y)
    points = model.perturbation_points()
    assert k.names == [n for n, _ in points]
    for i in range(len(points)):
        for b in range(3):
            h, jac = dense_jacobian(model, x[b:b + 1], i)
            dense = torch.linalg.matrix_norm(jac, 2)
            torch.testing.assert_close(k.jac_norms[b, i], dense, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(k.scales[b, i], h.norm(), rtol=1e-5, atol=1e-6)
            gamma = k.gamma[b]
            torch.testing.assert_close(k.kappa[b, i], h.norm() * dense / gamma, rtol=1e-4,
                                       atol=1e-6)


def test_functions_run_in_eval_mode_and_restore_the_mode():
    torch.manual_seed(1)
    model = create_model("tiny-wrn", 10, input_shape=(3, 16, 16))  # BatchNorm: modes differ
    with torch.no_grad():  # non-trivial running statistics
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 16, 16)
    y = model.eval()(x).argmax(1)
    opts = SearchOptions(steps=5, rounds=3)
    k_eval, m_eval = kappa(model, x, y), all_layer_margin(model, x, y, opts).value
    model.train()
    k_train, m_train = kappa(model, x, y), all_layer_margin(model, x, y, opts).value
    assert model.training
    torch.testing.assert_close(k_train.kappa, k_eval.kappa)
    torch.testing.assert_close(m_train, m_eval)


# --- a tiny trained model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-mlp trained for 3 epochs on the bundled digits; (run folder, model, x, y)."""
    from robust_amo.checkpoint import load_checkpoint, model_from_checkpoint
    from robust_amo.data import load_dataset
    from robust_amo.resolve import resolve
    from robust_amo.train import train

    run = tmp_path_factory.mktemp("margins") / "run"
    cfg = resolve(None, [{"arch": "tiny-mlp", "dataset": "digits", "method": "standard",
                          "epochs": 3, "batch_size": 64, "device": "cpu", "out": str(run),
                          "data": {"augment": False},
                          "optim": {"lr": 0.05, "schedule": "constant"},
                          "attack": {"eps": 0.1, "step_size": 0.025, "steps": 3},
                          "eval": {"n_examples": 20, "steps": 1}}])
    train(cfg)
    model = model_from_checkpoint(load_checkpoint(run))
    _, test = load_dataset("digits")
    x, y = test.x[:20].float() / 255, test.y[:20]
    assert (model(x).argmax(1) == y).float().mean() > 0.8
    return run, model, x, y


def test_all_layer_margin_is_tight_on_trained_model(trained):
    _, model, x, y = trained
    correct = model(x).argmax(1) == y
    est = all_layer_margin(model, x, y, OPTS, witness=True)
    assert torch.all(est.value[~correct] == 0) and torch.all(est.value[correct] > 0)
    assert torch.all(torch.isfinite(est.value))
    # misclassified at the returned radius (the witness) ...
    with torch.no_grad(), perturb(model, est.witness, requires_grad=False):
        pred = model(x).argmax(1)
    assert torch.all(pred[correct] != y[correct])
    norms = torch.cat([d.flatten(1) for d in est.witness], 1).norm(dim=1)
    assert torch.all(norms[correct] <= est.value[correct] * (1 + 1e-5))
    # ... and the same attack finds nothing at 0.9 × it (upper: search only below that radius)
    below = all_layer_margin(model, x[correct], y[correct], OPTS, upper=0.9 * est.value[correct])
    assert torch.all(torch.isinf(below.value))


def _random_direction_radius(model, x, y, directions: int = 32) -> torch.Tensor:
    """Per example, the smallest radius t along random unit directions u at which F(x, t·u)
    misclassifies: the first success on a geometric grid, refined by bisection below it.

    All directions are evaluated at once by repeating the batch.
    """
    n = len(y)
    xr, yr = x.repeat(directions, 1, 1, 1), y.repeat(directions)
    with torch.no_grad(), perturb(model, requires_grad=False) as p:
        model(xr)
        shapes = [d.shape for d in p.deltas]
    g = torch.Generator().manual_seed(5)
    u = [torch.randn(s, generator=g) for s in shapes]
    norm = torch.cat([t.flatten(1) for t in u], 1).norm(dim=1)
    u = [t / norm.view(-1, *([1] * (t.dim() - 1))) for t in u]

    def wrong(t: torch.Tensor) -> torch.Tensor:
        deltas = [d * t.view(-1, *([1] * (d.dim() - 1))) for d in u]
        with torch.no_grad(), perturb(model, deltas, requires_grad=False):
            return model(xr).argmax(1) != yr

    first = torch.full((len(yr),), math.inf)
    last_fail = torch.zeros(len(yr))
    for k in range(60):
        t = torch.full((len(yr),), 1e-3 * 1.25 ** k)  # up to ~500
        w = wrong(t) & torch.isinf(first)
        last_fail = torch.where(torch.isinf(first) & ~w, t, last_fail)
        first = torch.where(w, t, first)
    found = torch.isfinite(first)
    lo, hi = last_fail, first.clone()
    for _ in range(12):
        mid = torch.where(found, (lo + hi) / 2, torch.zeros_like(lo))
        w = wrong(mid)
        hi = torch.where(found & w, mid, hi)
        lo = torch.where(found & ~w, mid, lo)
    return hi.view(directions, n).amin(0)


def test_all_layer_margin_never_exceeds_random_direction_search(trained):
    _, model, x, y = trained
    est = all_layer_margin(model, x, y, OPTS)
    rand = _random_direction_radius(model, x, y)
    found = torch.isfinite(rand)
    assert found.sum() >= len(y) // 2
    assert torch.all(est.value[found] <= rand[found])
    # and it is a real improvement, not a coincidence of the grid
    assert est.value[found & (est.value > 0)].mean() < 0.8 * rand[found & (est.value > 0)].mean()


def test_adversarial_margins_over_pgd_neighbourhood(trained):
    _, model, x, y = trained
    clean = all_layer_margin(model, x, y, OPTS).value
    kap = kappa(model, x, y)

    def attack():
        return PGD(model, 0.1, 0.03, 3, generator=torch.Generator().manual_seed(7))

    adv = adversarial_margins(model, x, y, attack(), OPTS, clean_margin=clean, clean_kappa=kap)
    assert adv.candidates == 1 + 4
    assert torch.all(adv.margin <= clean)
    correct = kap.gamma > 0
    assert (adv.margin[correct] < 0.95 * clean[correct]).float().mean() > 0.8
    assert torch.all((adv.margin == 0) == ~adv.robust)
    assert torch.all(adv.kappa_adv >= kap.kappa)

    # brute force over the same candidates (same generator seed): κ_adv is their exact max,
    # robustness is "no candidate misclassified", m_adv is the min of per-candidate estimates
    kmax, robust, mins = kap.kappa.clone(), kap.gamma > 0, clean.clone()
    for xc in pgd_neighbourhood(attack(), x, y):
        kc = kappa(model, xc, y)
        kmax = torch.maximum(kmax, kc.kappa)
        robust &= kc.gamma > 0
        mins = torch.minimum(mins, all_layer_margin(model, xc, y, OPTS).value)
    torch.testing.assert_close(adv.kappa_adv, kmax)
    assert torch.equal(adv.robust, robust)
    assert adv.robust.any() and not adv.robust.all()
    torch.testing.assert_close(adv.margin, mins, rtol=0.05, atol=1e-4)


# --- the command ----------------------------------------------------------------------------


def test_margins_command_writes_csv_json_and_plots(trained, tmp_path):
    import matplotlib.image

    run, model, x, y = trained
    out = tmp_path / "m"
    rc = main(["margins", "--checkpoint", str(run), "--n-examples", "12", "--batch-size", "8",
               "--pgd-steps", "2", "--attack-steps", "10", "--rounds", "6", "--rtol", "0.02",
               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    with (out / "margins.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    names = [n for n, _ in model.perturbation_points()]
    for col in ("output_margin", "all_layer_margin", "adv_all_layer_margin", "input_margin_l2",
                "first_order_margin", "kappa_norm", "kappa_adv_norm"):
        assert col in rows[0]
    for q in ("scale", "jac_norm", "kappa", "kappa_adv"):
        for n in names:
            assert f"{q}[{n}]" in rows[0]
    # rows are the first 12 test examples, in order
    gamma = output_margin(model(x[:12]), y[:12])
    torch.testing.assert_close(torch.tensor([float(r["output_margin"]) for r in rows]), gamma,
                               rtol=1e-4, atol=1e-4)
    alm = torch.tensor([float(r["all_layer_margin"]) for r in rows])
    adv = torch.tensor([float(r["adv_all_layer_margin"]) for r in rows])
    assert torch.all(adv <= alm) and torch.all((alm > 0) == (gamma > 0))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["n_examples"] == 12
    assert summary["clean_accuracy"] == pytest.approx(float((gamma > 0).float().mean()))
    q = summary["quantities"]["all_layer_margin"]
    assert q["count"] == 12 and q["covered"] == 12
    assert q["quantiles"]["0.5"] == pytest.approx(float(alm.double().quantile(0.5)), rel=1e-4)
    assert set(summary["per_point"]["kappa_adv"]) == set(names)
    for png in ("margins_hist.png", "kappa_adv_by_layer.png", "first_order_vs_attack.png"):
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_margins_command_without_adversarial_part(trained, tmp_path):
    run = trained[0]
    out = tmp_path / "m"
    rc = main(["margins", "--checkpoint", str(run / "checkpoint.pt"), "--n-examples", "6",
               "--no-adv", "--no-input-margin", "--no-plots", "--no-progress", "--out", str(out)])
    assert rc == 0
    with (out / "margins.csv").open() as f:
        header = next(csv.reader(f))
    assert "all_layer_margin" in header and "kappa_norm" in header
    assert not any("adv" in h or "input_margin" in h or h == "robust" for h in header)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["pgd"] is None and "pgd_neighbourhood_accuracy" not in summary
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-examples", "0"], "--n-examples must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--pgd-steps", "0"], "--pgd-steps must be >= 1"),
        (["--eps", "eight"], "--eps: expected a number"),
        (["--rtol", "-0.1"], "--rtol must be >= 0"),
        (["--dataset", "cifar10"], "pass the --dataset it was trained on"),
    ],
)
def test_margins_command_bad_arguments(trained, tmp_path, capsys, extra, message):
    run = trained[0]
    rc = main(["margins", "--checkpoint", str(run), "--no-progress", "--out", str(tmp_path),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_margins_command_missing_checkpoint(tmp_path, capsys):
    rc = main(["margins", "--checkpoint", str(tmp_path / "nothing"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint" in err


def test_margins_command_reads_a_robustness_checkpoint(trained, tmp_path, capsys):
    """A robustness file does not record its architecture: the error asks for --arch, which the
    command must then accept (as `robust-amo eval` does)."""
    from robust_amo.checkpoint import load_checkpoint, model_state

    sd = model_state(load_checkpoint(trained[0]))
    state = {"module.normalizer.new_mean": torch.zeros(1, 1, 1),
             "module.normalizer.new_std": torch.ones(1, 1, 1)}
    state.update({f"module.model.{k}": v for k, v in sd.items()})
    src = tmp_path / "checkpoint.pt.latest"
    torch.save({"model": state, "epoch": 3}, src)
    base = ["margins", "--checkpoint", str(src), "--n-examples", "4", "--no-adv",
            "--no-input-margin", "--no-plots", "--no-progress", "--out", str(tmp_path / "m")]
    assert main(base) == 2
    assert "--arch" in capsys.readouterr().err
    assert main([*base, "--arch", "tiny-mlp", "--dataset", "digits"]) == 0
    assert (tmp_path / "m" / "margins.csv").is_file()
