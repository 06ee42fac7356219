"""Issue 23, "passes in every report": forward and backward passes counted by hand, AutoAttack's
attacks each alone (individual), and the worst-case adversarial examples saved without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robust_amo import distributed, evaluate
from robust_amo.cli import main
from robust_amo.data import dataset_info, load_dataset
from robust_amo.errors import OutputError
from robust_amo.evaluation import (
    AutoAttackSettings,
    autoattack_robust,
    evaluate_attacks,
    parse_attack,
)
from robust_amo.evaluation.report import (
    Report,
    build_report,
    markdown,
    restarts_figure,
    worst_case_examples,
)
from robust_amo.evaluation.runner import PassCounter
from robust_amo.models import create_model
from robust_amo.train import train
from tests.helpers import tiny_run

EPS = 0.1


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny-mlp", 10, input_shape=(1, 8, 8)).eval()


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def test_counter_counts_examples_once_per_forward_and_per_backward():
    model = _tiny()
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    with PassCounter(model) as c:
        with torch.no_grad():
            model(x[:3])
        assert c.counts() == (3, 0)
        out = model(x)
        torch.autograd.grad(out.sum(), x)  # a gradient to the input: one backward of 5
        assert c.counts() == (8, 5)
        out = model(x)
        for k in range(2):  # FAB-style: one backward per class, each a pass of the batch
            out[:, k].sum().backward(retain_graph=True)
        assert c.counts() == (13, 15)
    model(x).sum().backward()  # the hook is gone
    assert c.counts() == (13, 15)


@pytest.mark.parametrize("early_exit", [True, False])
def test_pgd_passes_equal_a_hand_count_with_early_exit(early_exit):
    """PGD-K x R: a chunk of B costs B clean forwards, then restart r runs K forward+backward
    steps and one final forward on the a_r examples it attacks: a_1 the clean-correct ones, a_r
    those no earlier restart broke (early exit) or a_1 again (no early exit)."""
    K, R, B = 3, 4, 10
    model = _tiny(2)
    x, _ = _data(26)
    y = model(x).argmax(1).detach()
    y[::5] = (y[::5] + 1) % 10  # a few misclassified clean: never attacked
    spec = parse_attack(f"pgd{K}", eps=0.2, step_size=0.025, restarts=R)
    spec.pgd = type(spec.pgd)(spec.pgd.threat, R, 0, early_exit=early_exit)
    clean, pgd = evaluate_attacks(model, x, y, [parse_attack("clean", eps=EPS), spec],
                                  batch_size=B)
    assert (clean.forward_passes, clean.backward_passes) == (26, 0)
    fwd = bwd = 0
    for start in range(0, 26, B):
        sl = slice(start, start + B)
        ok = pgd.clean[sl]
        fwd += len(ok)  # the chunk's clean forward
        standing = ok.clone()
        for r in range(R):
            a = int((standing if early_exit else ok).sum())
            fwd += a * (K + 1)
            bwd += a * K
            standing = pgd.steps[f"restart {r + 1}"][sl]
    assert (pgd.forward_passes, pgd.backward_passes) == (fwd, bwd)
    after = [int(pgd.steps[f"restart {r + 1}"].sum()) for r in range(R)]
    assert after[0] > after[-1] > 0, "restarts should break examples here, or the test is weak"


def test_targeted_pgd_passes_and_report_fields():
    K, T = 2, 3
    model = _tiny(1)
    x, _ = _data(12)
    y = model(x).argmax(1).detach()
    out = evaluate_attacks(model, x, y, [parse_attack("clean", eps=EPS),
                                         parse_attack(f"pgd{K}-t{T}", eps=0.03)], batch_size=12)
    pgd = out[1]
    fwd, bwd, standing = 12, 0, torch.ones(12, dtype=torch.bool)
    for t in range(T):
        a = int(standing.sum())
        fwd += a * (1 + K + 1)  # the clean forward that ranks the targets, K steps, final
        bwd += a * K
        standing = pgd.steps[f"target {t + 1}"]
    assert (pgd.forward_passes, pgd.backward_passes) == (fwd, bwd)
    report = build_report(outcomes=out, model_meta={"arch": "tiny-mlp"}, dataset="x",
                          split="test", norm="linf", eps=0.03, seed=0, device="cpu", bf16=False,
                          wall_time_s=1.0, checks=[])
    d = report.to_dict()
    a = d["attacks"][f"pgd{K}-t{T}"]["passes"]
    assert a == {"forward": fwd, "backward": bwd,
                 "per_example": {"forward": fwd / 12, "backward": bwd / 12}}
    assert d["passes"]["forward"] == fwd + 12 and d["passes"]["backward"] == bwd
    assert Report.from_dict(d).to_dict() == d
    md = markdown(report)
    assert "passes per example (fwd / bwd)" in md and f"{(fwd + 12) / 12:.4g} / " in md
    assert f"{fwd + 12:,} forward and {bwd:,} backward" in md


def test_autoattack_sub_attack_passes_and_individual():
    pytest.importorskip("pyautoattack")
    model = _tiny(2)
    x, _ = _data(12, seed=3)
    y = model(x).argmax(1).detach()
    y[:3] = (y[:3] + 1) % 10
    attacks = ("apgd-ce", "apgd-t")
    cascade, solo = (
        evaluate_attacks(model, x, y, [parse_attack(
            "autoattack-custom", eps=0.03, aa_attacks=attacks, aa_backend="pyautoattack",
            individual=ind)], batch_size=12)[0] for ind in (False, True))
    for o in (cascade, solo):
        assert o.backward_passes > 0 and o.forward_passes > o.backward_passes
        f = sum(p[0] for p in o.sub_passes.values())
        b = sum(p[1] for p in o.sub_passes.values())
        assert list(o.sub_passes) == list(attacks) and (f, b) == (o.forward_passes,
                                                                  o.backward_passes)
    assert not cascade.individual and list(solo.individual) == list(attacks)
    # each attack alone is that attack run by itself on the chunk (AutoAttack reseeds per call)
    for name in attacks:
        alone = autoattack_robust(model, x, y, AutoAttackSettings(
            0.03, "linf", "custom", (name,), backend="pyautoattack"))
        assert torch.equal(solo.individual[name], alone.robust), name
    both = solo.individual["apgd-ce"] & solo.individual["apgd-t"]
    assert torch.equal(solo.robust, both)
    assert 0 < int(solo.robust.sum()) < int(solo.clean.sum()), "the test is weak otherwise"
    # individual runs apgd-t on more examples than the cascade does
    assert solo.sub_passes["apgd-t"][1] > cascade.sub_passes["apgd-t"][1]
    report = build_report(outcomes=[solo], model_meta={}, dataset="x", split="test",
                          norm="linf", eps=0.03, seed=0, device="cpu", bf16=False,
                          wall_time_s=1.0, checks=[])
    sec = report.to_dict()["attacks"]["autoattack-custom"]
    assert sec["individual"] == {k: int(v.sum()) / 12 for k, v in solo.individual.items()}
    assert list(sec["passes"]["by_attack"]) == list(attacks)
    assert "↳ apgd-t | after it and those above; alone" in markdown(report)


def test_worst_case_examples_name_the_first_attack_that_broke_each():
    model = _tiny(2)
    x, _ = _data(30)
    y = model(x).argmax(1).detach()
    y[:4] = (y[:4] + 1) % 10
    specs = [parse_attack("clean", eps=EPS), parse_attack("pgd1", eps=0.2, step_size=0.025),
             parse_attack("pgd3", eps=0.2, step_size=0.025, restarts=2)]
    out = evaluate_attacks(model, x, y, specs, batch_size=7, keep_adv=True)
    x_adv, found = worst_case_examples(out, x, y)
    worst = out[0].clean & out[1].robust & out[2].robust
    assert [f == "" for f in found] == worst.tolist()
    assert all(found[i] == "clean" for i in range(4))
    assert any(f.startswith("pgd1:") for f in found) and any(f.startswith("pgd3:") for f in
                                                             found)
    pred = model(x_adv).argmax(1)
    for i, f in enumerate(found):
        if f in ("", "clean"):
            assert torch.equal(x_adv[i], x[i])
        else:
            assert pred[i] != y[i] and (x_adv[i] - x[i]).abs().max() <= 0.2 + 1e-6
            # the first attack that broke it, and its first restart to do so
            first = "pgd1" if not out[1].robust[i] else "pgd3"
            o = out[1] if first == "pgd1" else out[2]
            step = next(k for k, m in o.steps.items() if not m[i])
            assert f == f"{first}:{step}"
    # without keep_adv the points are not kept (nor saved in the state)
    assert evaluate_attacks(model, x, y, specs[:2], batch_size=7)[1].adv is None


def test_kept_points_survive_a_resume(tmp_path):
    model = _tiny(1)
    x, _ = _data(20)
    y = model(x).argmax(1).detach()
    specs = [parse_attack("pgd2", eps=0.03, restarts=2)]
    whole = evaluate_attacks(model, x, y, specs, batch_size=6, keep_adv=True)[0]

    class Kill(Exception):
        pass

    def kill(name, chunk):
        if chunk == 1:
            raise Kill

    state = tmp_path / "s.pt"
    with pytest.raises(Kill):
        evaluate_attacks(model, x, y, specs, batch_size=6, keep_adv=True, state_path=state,
                         interrupt=kill)
    resumed = evaluate_attacks(model, x, y, specs, batch_size=6, keep_adv=True,
                               state_path=state, resume=True)[0]
    assert resumed.resumed_chunks == 2 and torch.equal(resumed.adv, whole.adv)
    assert (resumed.forward_passes, resumed.backward_passes) == (whole.forward_passes,
                                                                 whole.backward_passes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("issue23") / "run"
    train(tiny_run(out, epochs=1, device="cpu"))
    return out


def test_the_command_writes_passes_and_the_adversarial_file(run, tmp_path, capsys):
    out, adv = tmp_path / "report.json", tmp_path / "adv.npz"
    args = ["eval", "--checkpoint", str(run), "--n-examples", "20", "--device", "cpu",
            "--no-progress", "--no-sanity", "--out", str(out), "--attack", "pgd2,pgd2-t2",
            "--save-adv", str(adv)]
    assert main(args) == 0
    d = json.loads(out.read_text())
    for name in ("clean", "pgd2", "pgd2-t2"):
        assert set(d["attacks"][name]["passes"]) == {"forward", "backward", "per_example"}
    assert d["attacks"]["clean"]["passes"]["forward"] == 20
    assert d["passes"]["backward"] == sum(a["passes"]["backward"]
                                          for a in d["attacks"].values())
    with np.load(adv, allow_pickle=False) as f:
        assert str(f["format"]) == "robust-amo-adv/1"
        assert f["x_adv"].shape == (20, 1, 8, 8) and f["x_adv"].dtype == np.float32
        found, robust, pred, y = f["found_by"], f["robust"], f["prediction"], f["y"]
        assert list(f["attacks"]) == ["clean", "pgd2", "pgd2-t2"]
    assert int(robust.sum()) == d["n_robust"]
    assert ((pred != y) | robust | (found == "clean")).all()
    # an existing file is refused without --overwrite, before any attack runs
    assert main(args + ["--out", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "adv.npz" in err and "--overwrite" in err and "--save-adv" in err
    assert main(args + ["--out", str(tmp_path / "other.json"), "--overwrite"]) == 0
    assert main(args[:-1] + [str(tmp_path / "adv.pt"), "--overwrite"]) == 2
    assert "--save-adv must name a .npz file" in capsys.readouterr().err


def test_sharded_passes_and_points_add_up_to_the_single_process_ones(monkeypatch):
    """Two ranks simulated in one process: each attacks its chunks; rank 0's gather sums the
    passes and puts the kept points in example order (the masks' gather is tested under
    torchrun in tests/test_distributed.py)."""
    model = _tiny(2)
    x, _ = _data(23)
    y = model(x).argmax(1).detach()
    specs = [parse_attack("pgd2", eps=0.2, step_size=0.025, restarts=2)]
    whole = evaluate_attacks(model, x, y, specs, batch_size=5, keep_adv=True)[0]
    infos: dict[int, object] = {}

    class Gathered(Exception):
        pass

    for r in range(2):
        monkeypatch.setattr(distributed, "current", lambda r=r: distributed.DistContext(r, 2))

        def capture(obj, r=r):
            infos[r] = obj
            raise Gathered

        monkeypatch.setattr(distributed, "gather_objects", capture)
        with pytest.raises(Gathered):
            evaluate_attacks(model, x, y, specs, batch_size=5, keep_adv=True)
    assert infos[0][4] != whole.forward_passes  # each rank did part of the work
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistContext(0, 2))
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [infos[0], infos[1]])
    monkeypatch.setattr(distributed, "assemble", lambda values, index, n: torch.zeros(
        (n, *values.shape[1:]), dtype=values.dtype).index_copy_(0, index, values))
    rank0 = evaluate_attacks(model, x, y, specs, batch_size=5, keep_adv=True)[0]
    assert (rank0.forward_passes, rank0.backward_passes) == (whole.forward_passes,
                                                             whole.backward_passes)
    assert torch.equal(rank0.adv, whole.adv) and len(whole.adv) > 2


def test_the_restart_picture_says_targeted_points_are_targets():
    model = _tiny(2)
    x, _ = _data(12)
    y = model(x).argmax(1).detach()
    out = evaluate_attacks(model, x, y, [parse_attack("clean", eps=EPS),
                                         parse_attack("pgd2-t3", eps=0.2, step_size=0.025)],
                           batch_size=12)
    report = build_report(outcomes=out, model_meta={"arch": "tiny-mlp"}, dataset="x",
                          split="test", norm="linf", eps=0.2, seed=0, device="cpu", bf16=False,
                          wall_time_s=1.0, checks=[])
    ax = restarts_figure(report).axes[0]
    assert ax.get_xlabel() == "restart (targeted PGD: target, then restart)"
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(ax.lines[0].get_ydata()) == [100 * v for v in report.attacks["pgd2-t3"]
                                             .curve.values()]


def test_evaluate_saves_adversarial_examples_and_refuses_to_overwrite(tmp_path):
    train_split, _ = load_dataset("digits")
    info = dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("tiny-mlp", 10, input_shape=(1, 8, 8), mean=info.mean, std=info.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # clean training for a moment: most test digits right, PGD breaks some
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_split.x.float() / 255),
                                          train_split.y).backward()
        opt.step()
    model.eval()
    path = tmp_path / "adv.npz"
    kw = dict(dataset="digits", eps=0.2, attacks=("pgd2",), n_examples=16, sanity=False,
              save_adv=path)
    report = evaluate(model, **kw)
    with np.load(path, allow_pickle=False) as f:
        assert int(f["robust"].sum()) == report.n_robust and len(f["y"]) == 16
        by_pgd = np.char.startswith(f["found_by"], "pgd2:")
        assert by_pgd.any() and (f["prediction"][by_pgd] != f["y"][by_pgd]).all()
    with pytest.raises(OutputError, match="adv.npz") as e:
        evaluate(model, **kw)
    assert e.value.params == ("overwrite", "save_adv")
    evaluate(model, **kw, overwrite=True)
