"""Evaluation: PGD-K x R worst case, AutoAttack adapter, resumable runner, reports, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robust_amo.checkpoint import FORMAT
from robust_amo.cli import main
from robust_amo.config import ThreatModel
from robust_amo.data import dataset_info, load_dataset
from robust_amo.errors import CheckpointError, RobustAmoError
from robust_amo.evaluation import (
    AttackOutcome,
    AutoAttackSettings,
    PGDSettings,
    autoattack_robust,
    evaluate_attacks,
    large_eps_accuracy,
    load_eval_data,
    load_model,
    parse_attack,
    pgd_robust,
)
from robust_amo.evaluation.autoattack_adapter import LogitsOnly
from robust_amo.evaluation.pgd_eval import restart_starts
from robust_amo.evaluation.report import build_report, markdown, sanity_checks, validate_report
from robust_amo.models import create_model
from tests.helpers import ROOT

EPS = 0.1




@pytest.fixture(scope="module")
def digits():
    """The digits test split as floats in [0, 1]."""
    _, test = load_dataset("digits")
    return test.x.float() / 255, test.y


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny MLP trained for a second on digits (clean training: PGD at eps 0.1 breaks some)."""
    train, _ = load_dataset("digits")
    info = dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("tiny-mlp", info.num_classes, input_shape=info.input_shape,
                         mean=info.mean, std=info.std)
    x, y = train.x.float() / 255, train.y
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Lucky(nn.Module):
    """Zero gradient everywhere; class 1 iff pixel 0 exceeds 0.5 + 0.9 eps.

    From the all-0.5 image at eps = 0.1, PGD cannot move (zero gradient), so only the random
    start decides: a uniform start lands there with probability 0.05 per restart.
    """

    def forward(self, x):
        v = x.flatten(1)
        hit = (v[:, 0] > 0.5 + 0.9 * EPS).float()
        tie = v.sum(1) * 0  # keeps the graph so autograd.grad returns zeros
        return torch.stack([1 - hit, hit], 1) + tie[:, None]


class Band(nn.Module):
    """The CE gradient pushes pixel 0 up; class 1 only while pixel 0 is in (0.525, 0.545)."""

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        band = ((v > 0.525) & (v < 0.545)).float()
        return torch.stack([torch.full_like(v, 5.0), 10 * (v - 0.5) + 100 * band], 1)


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_pgd_bounds_range_and_broken_points_are_misclassified(trained, digits, norm, eps):
    x, y = digits[0][:120], digits[1][:120]
    s = PGDSettings(ThreatModel(norm, eps, eps / 4, 10), 2)
    r = pgd_robust(trained, x, y, torch.arange(len(y)), s)
    delta = (r.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    broken = r.clean & ~r.robust
    assert broken.sum() >= 5, "the attack should break some examples of a clean-trained model"
    with torch.no_grad():
        assert (trained(r.x_adv[broken]).argmax(1) != y[broken]).all()
    assert not (r.robust & ~r.clean).any()
    assert (r.after_restart[1:] <= r.after_restart[:-1]).all()
    assert torch.equal(r.after_restart[-1], r.robust)


def test_worst_case_over_restarts_counts_a_lucky_random_start():
    n, restarts = 400, 10
    x = torch.full((n, 1, 8, 8), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    s = PGDSettings(ThreatModel("linf", EPS, EPS / 4, 3), restarts, seed=3)
    r = pgd_robust(Lucky(), x, y, torch.arange(n), s)
    # brute force: broken iff some restart's start already lands in the class-1 region
    hits = torch.stack([restart_starts(x, torch.arange(n), s, k)[:, 0, 0, 0] > 0.5 + 0.9 * EPS
                        for k in range(restarts)])
    assert torch.equal(r.robust, ~hits.any(0))
    curve = r.after_restart.float().mean(1)
    # the starts are uniform and independent per restart: P(robust after k) = 0.95^k
    for k in (0, 4, 9):
        assert abs(curve[k].item() - 0.95 ** (k + 1)) < 0.08
    broken_late = (r.after_restart[0] & ~r.robust).sum()
    assert broken_late > 20, "examples broken only by later restarts must count as broken"


def test_an_intermediate_iterate_counts_even_if_the_final_one_is_correct():
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    s = PGDSettings(ThreatModel("linf", EPS, 0.01, 10, random_start=False), 1)
    r = pgd_robust(Band(), x, y, torch.arange(4), s)
    assert r.clean.all() and not r.robust.any()
    final = (x + EPS).clamp(0, 1)  # where the ascent ends: correct again
    assert (Band()(final).argmax(1) == 0).all()


def test_early_exit_equals_every_restart_on_every_example_and_batching_does_not_matter(
        trained, digits):
    x, y = digits[0][:150], digits[1][:150]
    idx = torch.arange(150)
    threat = ThreatModel("linf", EPS, EPS / 4, 5)
    fast = pgd_robust(trained, x, y, idx, PGDSettings(threat, 4, seed=1))
    full = pgd_robust(trained, x, y, idx, PGDSettings(threat, 4, seed=1, early_exit=False))
    assert torch.equal(fast.robust, full.robust)
    assert torch.equal(fast.after_restart, full.after_restart)
    assert (fast.after_restart[0] & ~fast.robust).any(), "later restarts should matter here"
    parts = [pgd_robust(trained, x[i:i + 32], y[i:i + 32], idx[i:i + 32],
                        PGDSettings(threat, 4, seed=1)).robust for i in range(0, 150, 32)]
    assert torch.equal(torch.cat(parts), fast.robust)


def test_autoattack_adapter_matches_calling_autoattack_directly(trained, digits):
    pyautoattack = pytest.importorskip("pyautoattack")
    x, y = digits[0][:16], digits[1][:16]
    attacks = ["apgd-ce", "apgd-t"]
    s = AutoAttackSettings(EPS, "linf", "custom", tuple(attacks), seed=0, backend="pyautoattack")
    rng_before = torch.get_rng_state()
    res = autoattack_robust(trained, x, y, s)
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG must be restored"
    aa = pyautoattack.AutoAttack(LogitsOnly(trained).eval(), attacks=attacks, device="cpu",
                                 eps=EPS, norm="Linf", seed=0, version="custom")
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=len(y))
    assert torch.equal(res.robust, y_adv == y)
    assert res.robust.sum() < res.clean.sum(), "the attack should break some examples"
    assert (res.x_adv - x).abs().max() <= EPS + 1e-5
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.equal(res.after_attack["apgd-t"], res.robust)
    assert (res.after_attack["apgd-ce"] >= res.robust).all()


def test_adapter_drives_the_fra31_api_the_same_way(trained, digits, monkeypatch):
    """A stand-in with fra31/auto-attack's constructor and run signature, backed by pyautoattack."""
    import sys
    import types

    pyautoattack = pytest.importorskip("pyautoattack")
    calls = []

    class Fra31Style:
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True,
                     attacks_to_run=(), version="standard", is_tf_model=False, device="cuda",
                     log_path=None):
            if version != "custom" and list(attacks_to_run):
                raise ValueError("attacks_to_run will be overridden unless version='custom'")
            self._aa = pyautoattack.AutoAttack(
                model, attacks=list(attacks_to_run) or None, device=device, eps=eps, norm=norm,
                seed=seed, version=version)
            self.model = model
            self.attacks_to_run = self._aa.attacks_to_run

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False):
            calls.append((list(self.attacks_to_run), bs))
            print("Warning: stand-in check message")
            self._aa.attacks_to_run = self.attacks_to_run
            x_adv, y_adv = self._aa.run_standard_evaluation(x, y, batch_size=bs)
            return (x_adv, y_adv) if return_labels else x_adv

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=Fra31Style))
    x, y = digits[0][:8], digits[1][:8]
    kw = dict(eps=EPS, norm="linf", version="custom", attacks=("apgd-ce", "apgd-dlr"))
    via_fra31 = autoattack_robust(trained, x, y, AutoAttackSettings(**kw, backend="autoattack"))
    via_pypi = autoattack_robust(trained, x, y, AutoAttackSettings(**kw, backend="pyautoattack"))
    assert torch.equal(via_fra31.robust, via_pypi.robust)
    assert calls[0] == (["apgd-ce"], int(via_fra31.clean.sum()))
    assert all(c[0] == ["apgd-dlr"] for c in calls[1:]) and len(calls) <= 2
    assert via_fra31.warnings == ["stand-in check message"]


def test_autoattack_checks_are_captured(trained, digits):
    pytest.importorskip("pyautoattack")

    class Probs(nn.Module):  # outputs probabilities: AutoAttack's check must complain
        def forward(self, x):
            return trained(x).softmax(1)

    s = AutoAttackSettings(EPS, "linf", "custom", ("apgd-ce",), backend="pyautoattack")
    res = autoattack_robust(Probs(), digits[0][:8], digits[1][:8], s)
    assert any("probability" in w for w in res.warnings), res.warnings


def test_killed_and_resumed_evaluation_equals_uninterrupted(trained, digits, tmp_path):
    pytest.importorskip("pyautoattack")
    x, y = digits[0][:24], digits[1][:24]
    specs = [parse_attack("pgd5", eps=EPS, restarts=2),
             parse_attack("autoattack-custom", eps=EPS, aa_attacks=("apgd-ce", "apgd-t"))]
    whole = evaluate_attacks(trained, x, y, specs, batch_size=8)

    class Killed(Exception):
        pass

    calls = []

    def kill(name, chunk):
        calls.append((name, chunk))
        if name == "autoattack-custom" and chunk == 1:
            raise Killed  # after apgd-ce of chunk 1, before apgd-t

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        evaluate_attacks(trained, x, y, specs, batch_size=8, state_path=state, interrupt=kill)
    resumed = evaluate_attacks(trained, x, y, specs, batch_size=8, state_path=state,
                               resume=True)
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a.robust, b.robust)
        assert all(torch.equal(a.steps[k], b.steps[k]) for k in a.steps)
    # chunk 0 finished and chunk 1 half done (apgd-ce saved) both count as resumed
    assert resumed[0].resumed_chunks == 3 and resumed[1].resumed_chunks == 2
    other = create_model("linear", 10, input_shape=(1, 8, 8))
    with pytest.raises(RobustAmoError, match="another model"):
        evaluate_attacks(other, x, y, specs, batch_size=8, state_path=state, resume=True)


def test_autoattack_resumed_inside_its_only_chunk_reports_it(trained, digits, tmp_path):
    pytest.importorskip("pyautoattack")
    x, y = digits[0][:16], digits[1][:16]
    specs = [parse_attack("autoattack-custom", eps=EPS, aa_attacks=("apgd-ce", "apgd-t"))]
    whole = evaluate_attacks(trained, x, y, specs, batch_size=64)

    class Killed(Exception):
        pass

    def kill(name, chunk):
        raise Killed  # at the first save: after apgd-ce of the only chunk

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        evaluate_attacks(trained, x, y, specs, batch_size=64, state_path=state, interrupt=kill)
    (again,) = evaluate_attacks(trained, x, y, specs, batch_size=64, state_path=state,
                                resume=True)
    assert again.resumed_chunks == 1 and torch.equal(again.robust, whole[0].robust)


def _outcome(name, clean, robust, steps=None):
    spec = parse_attack(name, eps=EPS)
    return AttackOutcome(spec, torch.tensor(clean, dtype=torch.bool),
                         torch.tensor(robust, dtype=torch.bool), steps or {})


def test_report_schema_worst_case_and_flags(tmp_path):
    clean = [1, 1, 1, 1, 0]
    outs = [
        _outcome("clean", clean, clean),
        _outcome("pgd50", clean, [1, 1, 0, 0, 0],
                 {"restart 1": torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool),
                  "restart 2": torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)}),
        _outcome("autoattack", clean, [1, 0, 1, 0, 0]),
    ]
    outs[2].warnings.append("it seems to be a randomized defense!")
    checks = sanity_checks(0.8, outs, large_eps=(0.5, 0.2), tolerance=0.03)
    by = {c.name: c for c in checks}
    assert by["robust<=clean"].passed
    assert by["restarts-monotone"].passed
    assert by["pgd-vs-autoattack"].passed  # both 0.4
    assert not by["large-eps"].passed
    assert not by["autoattack-checks"].passed
    report = build_report(outcomes=outs, model_meta={"arch": "tiny-mlp", "path": "x.pt"},
                          dataset="digits", split="test", norm="linf", eps=EPS, seed=0,
                          device="cpu", bf16=False, wall_time_s=1.0, checks=checks)
    rep = report.to_dict()
    validate_report(json.loads(json.dumps(rep)))
    assert rep["clean_accuracy"] == pytest.approx(0.8)
    assert rep["attacks"]["pgd50"]["robust_accuracy"] == pytest.approx(0.4)
    assert rep["attacks"]["pgd50"]["curve"] == {"restart 1": 0.6, "restart 2": 0.4}
    assert rep["robust_accuracy"] == pytest.approx(0.2)  # per example: only example 0 survives
    assert not rep["sanity_ok"]
    md = markdown(report)
    assert "| pgd50 |" in md and "**20.00%**" in md and "FLAGGED: large-eps" in md
    with pytest.raises(ValueError, match="lacks"):
        validate_report({k: v for k, v in rep.items() if k != "attacks"})
    # flags that must fire
    bad = [outs[0], _outcome("pgd20", clean, [1, 1, 1, 1, 1]),
           _outcome("pgd50", clean, [1, 1, 1, 1, 1])]
    bad_checks = {c.name: c for c in sanity_checks(0.8, bad + [outs[2]])}
    assert not bad_checks["robust<=clean"].passed
    assert not bad_checks["pgd-vs-autoattack"].passed
    rising = _outcome("pgd20", clean, [1, 1, 0, 0, 0],
                      {"restart 1": torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool),
                       "restart 2": torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)})
    assert not {c.name: c for c in sanity_checks(0.8, [rising])}["restarts-monotone"].passed
    weaker = [_outcome("pgd20", clean, [1, 0, 0, 0, 0]),
              _outcome("pgd50", clean, [1, 1, 1, 0, 0])]
    assert not {c.name: c for c in sanity_checks(0.8, weaker)}["more-steps"].passed


def test_large_eps_reaches_zero(trained, digits):
    eps, acc = large_eps_accuracy(trained, digits[0], digits[1], "linf", n_max=100)
    assert eps == 0.5 and acc == 0.0


def test_missing_or_incompatible_checkpoint_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "nothing")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a robust-amo checkpoint"):
        load_model(tmp_path / "other.pt")
    wrong = create_model("tiny-mlp", 10, input_shape=(1, 8, 8)).state_dict()
    torch.save({"format": FORMAT, "version": 1, "arch": "tiny-cnn", "num_classes": 10,
                "input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4], "model": wrong},
               tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "mismatch.pt")
    for path in ("nothing", "other.pt", "mismatch.pt"):
        assert main(["eval", "--checkpoint", str(tmp_path / path), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("robust-amo: error:")


def test_data_that_does_not_fit_the_model_is_a_checkpoint_error():
    meta = {"dataset": "digits", "input_shape": [3, 32, 32], "num_classes": 10, "config": {}}
    with pytest.raises(CheckpointError, match="expects inputs of shape"):
        load_eval_data(meta)
    meta = {"dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "config": {}}
    with pytest.raises(RobustAmoError, match="val_size"):
        load_eval_data(meta, split="val")
    assert len(load_eval_data(meta, n_examples=7).y) == 7


def test_unknown_attack_name_is_a_config_error():
    with pytest.raises(RobustAmoError, match="unknown attack"):
        parse_attack("fgsm", eps=EPS)
    with pytest.raises(RobustAmoError, match="custom"):
        parse_attack("autoattack-custom", eps=EPS)
    spec = parse_attack("pgd50", eps=8 / 255)
    t = spec.pgd.threat
    assert (t.steps, spec.pgd.restarts, t.step_size) == (50, 10, 2 / 255)


def test_cli_train_then_eval_writes_json_and_markdown(tmp_path, capsys):
    run = tmp_path / "run"
    config = str(ROOT / "configs" / "quickstart.yaml")
    assert main(["train", "--config", config, "--epochs", "1", "--out", str(run),
                 "--no-progress", "--set", "data.train_subset=300",
                 "--set", "eval.n_examples=50", "--set", "eval.steps=5"]) == 0
    out = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(run), "--attack", "pgd20", "--n-examples", "50",
                 "--no-progress", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    validate_report(rep)
    assert rep["n_examples"] == 50 and rep["dataset"] == "digits"
    assert rep["threat_model"]["eps"] == pytest.approx(0.1)  # the checkpoint's training eps
    assert set(rep["attacks"]) == {"clean", "pgd20"}
    assert rep["robust_accuracy"] <= rep["clean_accuracy"]
    assert out.with_suffix(".md").read_text().startswith("# Robustness evaluation")
    assert not out.with_suffix(".state.pt").exists()
    assert "| pgd20 |" in capsys.readouterr().out
    # the held-out split of the run (data.val_size = 200 in the quickstart)
    assert main(["eval", "--checkpoint", str(run), "--attack", "clean", "--split", "val",
                 "--no-progress", "--no-sanity", "--out", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["n_examples"] == 200


def test_autoattack_adapter_restores_the_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    x, y = torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    s = AutoAttackSettings(0.1, version="custom", attacks=("apgd-ce",))
    done = {"clean": torch.zeros(6, dtype=torch.bool), "robust": torch.zeros(6, dtype=torch.bool),
            "after_attack": {"apgd-ce": torch.zeros(6, dtype=torch.bool)}, "warnings": [],
            "done": ["apgd-ce"]}
    model.train()
    autoattack_robust(model, x, y, s, state=done)
    assert model.training
    model.eval()
    autoattack_robust(model, x, y, s, state=done)
    assert not model.training


def test_model_digest_of_a_batchnorm_model():
    """BatchNorm's 0-dim ``num_batches_tracked`` buffer must not break the state-file digest
    (it made `robust-amo eval` fail on every WideResNet)."""
    from robust_amo.evaluation import model_digest

    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8))
    before = model_digest(model)
    assert before == model_digest(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.num_batches_tracked += 1
    assert model_digest(model) != before
