"""Each method trains a tiny model on digits (no file needed), from Python and from the CLI."""

from __future__ import annotations

import json
import math

import pytest

from robust_amo.cli import main
from robust_amo.errors import ConfigError
from robust_amo.methods import build_objective, method_options
from robust_amo.resolve import resolve
from robust_amo.train import lr_lambda, train
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


COMMON = {
    "dataset": "digits", "batch_size": 50, "seed": 0, "device": "cpu", "log_every": 1000,
    "data": {"augment": False, "train_subset": 600},
    "optim": {"lr": 0.1, "schedule": "constant", "weight_decay": 0.0},
    "attack": {"eps": 0.1, "step_size": 0.04, "steps": 3},
    "eval": {"n_examples": 150, "steps": 3, "batch_size": 150},
}

CASES = [
    ("robust-amo", "tiny-cnn", {}),
    ("amo", "tiny-cnn", {"eta_p": 0.05}),
    ("jacobian-lm", "tiny-mlp", {"lam_lm": 0.01, "variant": "all"}),
    ("jacobian-lm", "tiny-mlp", {"lam_lm": 0.01, "variant": "random", "task_loss": "ce"}),
]


@pytest.mark.parametrize("method,arch,args", CASES)
def test_method_trains_on_digits(tmp_path, method, arch, args):
    cfg = resolve(None, [COMMON, {"method": method, "arch": arch, "epochs": 4,
                                  "out": str(tmp_path), "method_args": args}])
    metrics = train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert all(math.isfinite(m["train_loss"]) for m in lines)
    assert metrics["clean_acc"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("method", ["robust-amo", "amo", "jacobian-lm"])
def test_cli_trains_each_method(tmp_path, method, capsys):
    out = tmp_path / method
    rc = main(["train", "--dataset", "digits", "--arch", "tiny-mlp", "--method", method,
               "--epochs", "1", "--batch-size", "100", "--device", "cpu", "--out", str(out),
               "--no-progress", "--set", "data.train_subset=300", "--set", "eval.n_examples=50",
               "--set", "eval.steps=2", "--set", "attack.steps=2",
               "--set", "data.augment=false"])
    assert rc == 0
    saved = (out / "config.yaml").read_text()
    assert f"method: {method}" in saved
    assert (out / "checkpoint.pt").exists() or any(out.glob("*.pt"))


def test_bad_method_args_are_config_errors(tmp_path, capsys):
    cfg = resolve(None, [{"method": "robust-amo", "method_args": {"eta_delta": "8/255"}}])
    assert method_options(cfg).eta_delta == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="method_args.etadelta"):
        method_options(resolve(None, [{"method": "robust-amo", "method_args": {"etadelta": 1}}]))
    with pytest.raises(ConfigError, match="method_args.delta_grad"):
        build_objective(resolve(None, [{"method": "amo",
                                        "method_args": {"delta_grad": "max"}}]), None)
    with pytest.raises(ConfigError, match="method_args.variant"):
        method_options(resolve(None, [{"method": "jacobian-lm",
                                       "method_args": {"variant": "some"}}]))
    rc = main(["train", "--method", "amo", "--set", "method_args.steps=-1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "method_args.steps" in capsys.readouterr().err


def test_multistep_gamma_per_milestone():
    """Sokolić et al.'s CNN schedule 0.01 (34 epochs), 0.001 (33), 0.0005 (33)."""
    cfg = resolve(None, [{"epochs": 100, "optim": {"lr": 0.01, "milestones": [34, 67],
                                                   "gamma": ["1/10", 0.5]}}])
    f = lr_lambda(cfg, steps_per_epoch=8)
    got = [0.01 * f(e * 8) for e in (0, 33, 34, 66, 67, 99)]
    assert got == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0005, 0.0005])
    with pytest.raises(ConfigError, match="one factor per milestone"):
        resolve(None, [{"optim": {"milestones": [34, 67], "gamma": [0.1]}}])


# every training config (the study files of configs/studies/ are checked in tests/studies/)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_files_resolve(path):
    cfg = resolve(path)
    method_options(cfg)


def test_paper_settings_in_configs():
    configs = ROOT / "configs"
    r16 = resolve(configs / "cifar10_wrn16-10_robust-amo.yaml")
    r28 = resolve(configs / "cifar10_wrn28-10_robust-amo.yaml")
    assert (r16.batch_size, r16.optim.lr, r16.optim.weight_decay) == (128, 0.1, 5e-4)
    # F.2's rationale for the smaller batch (lr^2 / B kept fixed): 0.1 / sqrt(2), not the 0.707
    # it prints (docs/methods.md)
    assert (r28.batch_size, r28.optim.weight_decay) == (64, 2e-4)
    assert r28.optim.lr == pytest.approx(r16.optim.lr * (r28.batch_size / r16.batch_size) ** 0.5,
                                         abs=1e-4)
    for r in (r16, r28):
        opts = method_options(r)
        assert (opts.rho, opts.eta_delta) == (0.92, 6.4e-3)
        assert (r.attack.eps, r.attack.step_size, r.attack.steps) == (8 / 255, 2 / 255, 10)
        assert (r.epochs, r.optim.milestones) == (150, [50, 100, 150])
    assert len(list((configs / "sokolic_table1").glob("*.yaml"))) == 36
    assert len(list((configs / "sokolic_fig2").glob("*.yaml"))) == 12


@pytest.mark.parametrize("depth", ["16", "28"])
def test_robust_amo_configs_match_their_pgd_baselines(depth):
    """Table 2 compares robust AMO with Madry training under the same protocol (F.2: "for both
    methods"): same data, split, augmentation, threat model, per-epoch check and schedule."""
    configs = ROOT / "configs"
    amo = resolve(configs / f"cifar10_wrn{depth}-10_robust-amo.yaml")
    pgd = resolve(configs / f"cifar10_wrn{depth}-10_pgd.yaml")
    assert (amo.arch, amo.dataset, amo.epochs) == (pgd.arch, pgd.dataset, pgd.epochs)
    assert amo.data == pgd.data
    assert amo.attack == pgd.attack
    assert amo.eval == pgd.eval
    assert (amo.optim.milestones, amo.optim.gamma, amo.optim.momentum) == (
        pgd.optim.milestones, pgd.optim.gamma, pgd.optim.momentum)


AMO_CONFIGS = sorted((ROOT / "configs").glob("*_amo*.yaml"))


@pytest.mark.parametrize("path", AMO_CONFIGS, ids=[p.name for p in AMO_CONFIGS])
def test_clean_amo_configs_follow_the_authors_schedule(path):
    """Wei & Ma's code sets lr = 0.1·0.2^[e ≥ 60]·0.2^[e ≥ 120]·0.2^[e ≥ 150] for the epoch
    e = 1..200 counted from 1 (train_util.lr_wr_default(lr, epoch + 1)), Nesterov SGD."""
    cfg = resolve(path)
    assert (cfg.epochs, cfg.batch_size, cfg.optim.nesterov) == (200, 128, True)
    f = lr_lambda(cfg, steps_per_epoch=4)
    for epoch in range(cfg.epochs):  # 0-based, as the trainer counts
        e = epoch + 1
        authors = 0.1 * 0.2 ** (e >= 60) * 0.2 ** (e >= 120) * 0.2 ** (e >= 150)
        assert cfg.optim.lr * f(epoch * 4) == pytest.approx(authors), epoch


def test_a_method_that_needs_no_attack_gets_none(monkeypatch, tmp_path):
    from robust_amo.methods import METHODS, MethodContext, register_method

    # the methods that train at adversarial points need one, the others get none
    needs = {m for m, s in METHODS.items() if s.needs_attack}
    assert {"pgd", "robust-amo", "trades", "mart", "fgsm-rs", "n-fgsm",
            "awp"} <= needs
    assert not needs & {"standard", "amo", "jacobian-lm"}
    seen = []
    monkeypatch.setattr("robust_amo.methods.registry.METHODS", dict(METHODS))

    @register_method("spy")
    def _spy(options, ctx: MethodContext):
        seen.append(ctx)
        return METHODS["standard"].build(None, ctx)

    from robust_amo.attacks import PGD

    built = []

    class RecordingPGD(PGD):
        @classmethod
        def from_threat(cls, model, threat, **kwargs):
            built.append(kwargs.get("early_stop", False))
            return PGD.from_threat(model, threat, **kwargs)

    monkeypatch.setattr("robust_amo.train.PGD", RecordingPGD)
    cfg = resolve(None, [{"arch": "tiny-mlp", "dataset": "digits", "method": "spy",
                          "epochs": 1, "out": str(tmp_path), "eval": {"n_examples": 0}}])
    train(cfg)
    assert seen and seen[0].attack is None and seen[0].generator is not None
    assert built == [True]  # only the per-epoch check's attack (early stop), no training attack
    with pytest.raises(ConfigError, match="training attack"):
        build_objective(resolve(None, [{"method": "pgd"}]))
