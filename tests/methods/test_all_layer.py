"""All-layer perturbations as an option of the adversarial methods (issue 22).

``pgd`` with ``method_args.all_layer`` is robust AMO bit for bit; the objective logs what δ does
per epoch without changing the training.
"""

from __future__ import annotations

import json

import pytest
import torch

from robust_amo.attacks import PGD
from robust_amo.config import AllLayerOptions
from robust_amo.errors import ConfigError
from robust_amo.methods import AdversarialObjective, AdversarialPoint, Adversary, adversarial_ce
from robust_amo.perturb import perturb
from robust_amo.runs import RunDir
from robust_amo.train import train
from tests.helpers import batch, tiny_model, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

AMO = {"rho": 0.9, "eta_delta": 0.05, "delta_grad": "mean"}


def _weights(run_dir):
    ck = torch.load(RunDir(run_dir).last, weights_only=True)
    return ck["model"]


def _metrics(run_dir):
    return [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]


def test_pgd_with_all_layer_is_robust_amo_bit_for_bit(tmp_path):
    train(tiny_run(tmp_path / "amo", method="robust-amo", method_args=AMO), progress=False)
    train(tiny_run(tmp_path / "pgd", method_args={"all_layer": AMO}), progress=False)
    a, b = _weights(tmp_path / "amo"), _weights(tmp_path / "pgd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _metrics(tmp_path / "amo"), _metrics(tmp_path / "pgd")
    for la, lb in zip(ma, mb, strict=True):
        for k in ("train_loss", "robust_acc", "delta_rel_size", "delta_loss_gain"):
            assert la[k] == lb[k], k


def test_delta_log_changes_nothing_and_shows_delta_active(tmp_path):
    """Logging every step or once per epoch trains the same weights; δ is non-zero and raises
    the loss; plain PGD logs no δ figures."""
    train(tiny_run(tmp_path / "a", method_args={"all_layer": AMO}, log_every=1), progress=False)
    train(tiny_run(tmp_path / "b", method_args={"all_layer": AMO}, log_every=1000),
          progress=False)
    train(tiny_run(tmp_path / "c"), progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for line in _metrics(tmp_path / "a"):
        sizes = line["delta_rel_size"]
        assert len(sizes) == len(tiny_model().perturbation_points())
        assert all(s > 0 for s in sizes)
        assert line["delta_loss_gain"] > 0
    assert all("delta_rel_size" not in m for m in _metrics(tmp_path / "c"))


def test_delta_log_is_the_mean_delta_norm_and_the_loss_gap():
    """The logged figures recomputed by hand from the same point: ‖‖h‖δ‖/‖h‖ = ‖δ‖ per example,
    and CE(F(x', δ)) − CE(F(x', 0)) in eval mode."""
    x, y = batch(n=8)
    model = tiny_model()
    pgd = PGD(model, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(1))
    adversary = Adversary(pgd, AllLayerOptions(0.9, 0.5, "sum"))
    points = []

    def keep(model, x, point, y):
        points.append(point)
        return adversarial_ce(model, x, point, y)

    objective = AdversarialObjective(adversary, keep)
    objective.begin_epoch(0)
    objective(model, x, y)
    assert objective.epoch_metrics() == {}  # not armed: nothing measured
    points.clear()
    objective.log_next()
    model.train()
    objective(model, x, y)
    got = objective.epoch_metrics()
    point = points[0]
    want_sizes = [d.flatten(1).norm(dim=1).mean().item() for d in point.deltas]
    assert got["delta_rel_size"] == pytest.approx(want_sizes, rel=1e-5)
    model.eval()
    with torch.no_grad():
        with perturb(model, point.deltas, requires_grad=False):
            hi = torch.nn.functional.cross_entropy(model(point.x), y)
        lo = torch.nn.functional.cross_entropy(model(point.x), y)
    assert got["delta_loss_gain"] == pytest.approx((hi - lo).item(), abs=1e-6)
    assert isinstance(point, AdversarialPoint)


def test_all_layer_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="method_args.all_layer.rho"):
        tiny_run(tmp_path, method_args={"all_layer": {"rho": -1}})
    with pytest.raises(ConfigError, match="method_args.all_layer.eta"):
        tiny_run(tmp_path, method_args={"all_layer": {"eta": 1}})
