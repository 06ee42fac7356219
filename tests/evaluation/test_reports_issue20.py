"""Evaluation runs and reports (issue 20, items 4, 7, 9, 11, 17, 20): an overwrite replaces every
file of the old report, progress lines without bars, the AutoAttack version and eps as people
write them, an honest restart picture, NaN logits flagged, and messages that fit the problem."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch
from torch import nn

import robust_amo
from robust_amo import distributed
from robust_amo.cli import build_parser, main
from robust_amo.errors import CheckpointError
from robust_amo.evaluation import AttackOutcome, evaluate_attacks, parse_attack
from robust_amo.evaluation import autoattack_adapter as aa_adapter
from robust_amo.evaluation.api import selection_of
from robust_amo.evaluation.report import (
    MIN_SPAN,
    build_report,
    fraction_text,
    markdown,
    report_files,
    restarts_figure,
    sanity_checks,
)
from robust_amo.evaluation.runner import EvalState
from robust_amo.models import create_model
from robust_amo.train import train
from tests.helpers import tiny_run

EPS = 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("issue20") / "run"
    train(tiny_run(out, epochs=1, device="cpu"))
    return out


def _eval(run, out, *args):
    return main(["eval", "--checkpoint", str(run), "--n-examples", "24", "--device", "cpu",
                 "--no-progress", "--no-sanity", "--out", str(out), *args])


# item 4 -------------------------------------------------------------------------------------

def test_an_overwrite_removes_every_file_of_the_old_report(run, tmp_path, capsys):
    out = tmp_path / "ev" / "report.json"
    assert _eval(run, out, "--attack", "pgd2", "--restarts", "3") == 0
    png = out.with_name("report.restarts.png")
    assert png.is_file()
    # what other runs of the old report left: its RobustBench entry, a 2-rank state
    stale = [out.with_name("report.robustbench.json"), out.with_name("report.state.rank1of2.pt")]
    for f in stale:
        f.write_text("old")
    assert _eval(run, out, "--attack", "clean") == 2  # refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _eval(run, out, "--attack", "clean", "--overwrite") == 0
    assert sorted(f.name for f in out.parent.iterdir()) == ["report.json", "report.md"]
    assert set(json.loads(out.read_text())["attacks"]) == {"clean"}
    assert report_files(out) == [out, out.with_suffix(".md")]


def test_a_folder_holding_only_the_old_picture_holds_a_report(run, tmp_path, capsys):
    out = tmp_path / "ev" / "report.json"
    out.parent.mkdir()
    out.with_name("report.restarts.png").write_bytes(b"old")
    assert _eval(run, out, "--attack", "clean") == 2
    assert "report.restarts.png" in capsys.readouterr().err


# item 7 -------------------------------------------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    return create_model("tiny-mlp", 10, input_shape=(1, 8, 8)).eval()


def _runner_lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "robust_amo.evaluation.runner" and r.levelno == logging.INFO]


def test_one_line_per_attack_and_autoattack_sub_attack_without_bars(caplog):
    pytest.importorskip("pyautoattack")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=g), torch.randint(10, (24,), generator=g)
    model = _tiny()
    specs = [parse_attack("clean", eps=EPS), parse_attack("pgd2", eps=EPS),
             parse_attack("autoattack-custom", eps=EPS, aa_attacks=("apgd-ce", "apgd-t"),
                          aa_backend="pyautoattack")]
    with caplog.at_level(logging.INFO, logger="robust_amo"):
        outs = evaluate_attacks(model, x, y, specs, batch_size=12, progress=False)
    lines = _runner_lines(caplog)
    done = [ln for ln in lines if " done: robust accuracy" in ln]
    assert [ln.split(" ")[0] for ln in done] == ["clean", "pgd2", "autoattack-custom"]
    n_clean = int(outs[0].robust.sum())
    # the clean pass is one forward pass per example: 24, counted in example units
    assert done[0] == (f"clean done: robust accuracy {100 * n_clean / 24:.2f}% ({n_clean}/24 "
                       f"examples); 24 forward and 0 backward passes; "
                       + done[0].split("; ")[-1])
    assert done[0].endswith(" s")
    assert outs[0].forward_passes == 24 and outs[1].forward_passes >= 24
    # per AutoAttack sub-attack of each of the two chunks, and per chunk of every attack
    for step in ("apgd-ce", "apgd-t"):
        for c in (1, 2):
            assert any(ln.startswith(f"autoattack-custom: {step} done on chunk {c}/2; robust "
                                     "accuracy so far") for ln in lines), (step, c, lines)
    assert any(ln.startswith("pgd2: chunk 2/2 done; robust accuracy so far") for ln in lines)


def test_only_rank_0_logs(caplog, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    x, y = torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="robust_amo"):
        evaluate_attacks(_tiny(), x, y, [parse_attack("clean", eps=EPS),
                                         parse_attack("pgd2", eps=EPS)], batch_size=4)
    assert _runner_lines(caplog) == []


def test_the_command_logs_each_attack_and_done_with_no_progress(run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="robust_amo"):
        assert _eval(run, tmp_path / "report.json", "--attack", "pgd2") == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pgd2 done: robust accuracy" in text and " backward passes; " in text
    assert "\ndone: clean accuracy" in text


# item 9 -------------------------------------------------------------------------------------

def _checkout(tmp_path, head, refs=None, packed=None):
    root = tmp_path / "auto-attack"
    (root / "fakeaa").mkdir(parents=True)
    (root / "fakeaa" / "__init__.py").write_text("")
    git = root / ".git"
    git.mkdir()
    (git / "HEAD").write_text(head + "\n")
    for ref, commit in (refs or {}).items():
        (git / ref).parent.mkdir(parents=True, exist_ok=True)
        (git / ref).write_text(commit + "\n")
    if packed:
        (git / "packed-refs").write_text("# pack-refs with: peeled\n" + packed)
    return types.SimpleNamespace(__file__=str(root / "fakeaa" / "__init__.py"))


COMMIT = "a39220048b3c9f2cca9a4d3a54604793c68eca7e"


def test_autoattack_version_of_a_git_checkout(tmp_path):
    name = "robust-amo-test-no-such-distribution"
    mod = _checkout(tmp_path / "a", "ref: refs/heads/master", {"refs/heads/master": COMMIT})
    assert aa_adapter.backend_version(name, mod) == f"{name} git {COMMIT[:12]}"
    mod = _checkout(tmp_path / "b", "ref: refs/heads/main",
                    packed=f"{COMMIT} refs/heads/main\n")
    assert aa_adapter.backend_version(name, mod) == f"{name} git {COMMIT[:12]}"
    mod = _checkout(tmp_path / "c", COMMIT)  # a detached HEAD
    assert aa_adapter.backend_version(name, mod) == f"{name} git {COMMIT[:12]}"
    mod.__version__ = "0.1"
    assert aa_adapter.backend_version(name, mod) == f"{name} 0.1 (git {COMMIT[:12]})"
    bare = tmp_path / "d" / "fakeaa.py"
    bare.parent.mkdir()
    bare.write_text("")
    assert aa_adapter.backend_version(name, types.SimpleNamespace(__file__=str(bare))) == \
        f"{name} unknown"


def test_autoattack_version_of_a_pip_install_from_git(monkeypatch):
    class Dist:
        def read_text(self, name):
            assert name == "direct_url.json"
            return json.dumps({"url": "https://example.invalid/auto-attack",
                               "vcs_info": {"vcs": "git", "commit_id": COMMIT}})

    monkeypatch.setattr(aa_adapter.metadata, "version", lambda name: "0.1")
    monkeypatch.setattr(aa_adapter.metadata, "distribution", lambda name: Dist())
    module = types.SimpleNamespace(__file__="/site-packages/autoattack/__init__.py")
    assert aa_adapter.backend_version("autoattack", module) == \
        f"autoattack 0.1 (git {COMMIT[:12]})"


@pytest.mark.parametrize(("x", "text"), [
    (8 / 255, "8/255"), (2 / 255, "2/255"), (0.1, "1/10"), (0.5, "1/2"), (1.5, "3/2"),
    (float(torch.tensor(8 / 255, dtype=torch.float32)), "8/255"),  # a float32 round trip
    (0.0313725, None), (0.123457, None), (1.0, None), (0.0, None), (float("nan"), None)])
def test_fraction_text(x, text):
    assert fraction_text(x) == text


def _report(eps=8 / 255, n=200, curve=(162, 161), aa=160, checks=()):
    clean = torch.ones(n, dtype=torch.bool)

    def mask(k):
        return torch.arange(n) < k

    pgd = parse_attack("pgd50", eps=eps, restarts=len(curve))
    outs = [AttackOutcome(parse_attack("clean", eps=eps), clean, clean),
            AttackOutcome(pgd, clean, mask(curve[-1]),
                          {f"restart {i + 1}": mask(k) for i, k in enumerate(curve)})]
    if aa is not None:
        outs.append(AttackOutcome(parse_attack("autoattack", eps=eps), clean, mask(aa)))
    return build_report(outcomes=outs, model_meta={"arch": "tiny-mlp", "path": "x.pt"},
                        dataset="digits", split="test", norm="linf", eps=eps, seed=0,
                        device="cpu", bf16=False, wall_time_s=1.0, checks=list(checks))


def test_reports_give_eps_as_a_fraction():
    report = _report()
    assert report.to_dict()["threat_model"] == {"norm": "linf", "eps": 8 / 255,
                                                "eps_fraction": "8/255"}
    md = markdown(report)
    assert "linf eps = 0.0313725 (8/255)" in md and "step 0.007843 (2/255)" in md
    assert "eps_fraction" not in _report(eps=0.0123457).to_dict()["threat_model"]


# item 11 ------------------------------------------------------------------------------------

def test_the_restart_picture_does_not_magnify_one_example():
    fig = restarts_figure(_report())  # 81.0% then 80.5%: one example of 200
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert hi - lo >= MIN_SPAN and 0 <= lo and hi <= 100 and lo <= 80 and hi >= 81
    assert "%" in ax.get_ylabel() and "1 example = 0.5 points" in ax.get_ylabel()
    title = ax.get_title()
    assert "n = 200" in title and "eps = 0.0313725 (8/255)" in title and "linf" in title
    (curve,) = ax.get_lines()
    assert list(curve.get_ydata()) == [81.0, 80.5]
    aa = [c for c in ax.collections if c.get_label().startswith("autoattack")]
    assert len(aa) == 1 and aa[0].get_label() == "autoattack (80.00%)"
    assert aa[0].get_segments()[0][0][1] == pytest.approx(80.0)
    assert any("autoattack" in t.get_text() for t in ax.get_legend().get_texts())
    (counts,) = ax.child_axes
    assert counts.get_ylabel() == "robust examples (of 200)"


@pytest.mark.parametrize(("curve", "limits"), [((200, 199), (90, 100)), ((2, 1), (0, 10))])
def test_the_restart_picture_stays_within_0_and_100(curve, limits):
    ax = restarts_figure(_report(curve=curve, aa=None)).axes[0]
    assert ax.get_ylim() == pytest.approx(limits)
    assert not ax.collections  # no AutoAttack ran: no line for it


# item 17 ------------------------------------------------------------------------------------

class NaNLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def test_nan_logits_are_flagged():
    report = robust_amo.evaluate(NaNLogits(), dataset="digits", eps=EPS, attacks=("pgd2",),
                                 n_examples=20, sanity=False, device="cpu")
    check = next(c for c in report.sanity_checks if c.name == "finite-logits")
    assert not check.passed and not report.sanity_ok
    assert check.detail.startswith("20 of 20 examples have NaN or infinite clean logits")
    assert "FLAGGED: finite-logits" in markdown(report)
    assert "sanity check(s) FLAGGED (finite-logits)" in markdown(report)
    fine = robust_amo.evaluate(_tiny(), dataset="digits", eps=EPS, attacks=("clean",),
                               n_examples=20, sanity=False, device="cpu")
    assert next(c for c in fine.sanity_checks if c.name == "finite-logits").passed


def test_nan_weights_are_flagged_by_the_command(tmp_path, capsys, caplog):
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n\n\ndef build(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight[0, 0] = float("nan")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "ev" / "report.json"
    with caplog.at_level(logging.WARNING, logger="robust_amo"):
        assert main(["eval", "--model", f"{tmp_path / 'nets.py'}:build", "--weights",
                     str(tmp_path / "w.pt"), "--dataset", "digits", "--eps", "0.1",
                     "--attack", "clean", "--n-examples", "16", "--device", "cpu",
                     "--no-progress", "--no-sanity", "--out", str(out)]) == 0
    assert "FLAGGED: finite-logits: 16 of 16 examples" in capsys.readouterr().out
    assert "the model holds 1 NaN or infinite weights" in caplog.text
    assert json.loads(out.read_text())["sanity_ok"] is False


def test_finite_logits_check_in_the_list_only_when_measured():
    out = AttackOutcome(parse_attack("clean", eps=EPS), torch.ones(2, dtype=torch.bool),
                        torch.ones(2, dtype=torch.bool))
    assert "finite-logits" not in [c.name for c in sanity_checks(1.0, [out])]


# item 20 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_state_file_says_how_to_start_afresh(tmp_path, damage, run, capsys):
    state = tmp_path / "report.state.pt"
    if damage == "truncated":
        torch.save({"format": "robust-amo-eval-state", "x": torch.zeros(1000)}, state)
        state.write_bytes(state.read_bytes()[:300])
    else:
        state.write_bytes(b"not a state file")
    with pytest.raises(CheckpointError) as e:
        EvalState(state, {}, resume=True)
    msg = str(e.value)
    assert "delete it" in msg and "without resume" in msg and e.value.params == ("resume",)
    assert "which" not in msg and "unsafe" not in msg and "checkpoint" not in msg
    assert _eval(run, tmp_path / "report.json", "--attack", "clean", "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--which" not in err and err.count("\n") == 1


def test_pgd0_names_itself_once(run, tmp_path, capsys):
    assert _eval(run, tmp_path / "report.json", "--attack", "pgd0") == 2
    err = capsys.readouterr().err
    assert err.count("pgd0") == 1 and err.count("--attack") == 1, err


def test_every_eval_option_says_its_default():
    (eval_parser,) = [p for a in build_parser()._subparsers._group_actions
                      for n, p in a.choices.items() if n == "eval"]
    own = ("--attack", "--step-size", "--restarts", "--loss", "--aa-attacks", "--aa-backend",
           "--out", "--bf16", "--resume", "--tolerance", "--format", "--no-sanity")
    helps = {a.option_strings[-1]: a.help for a in eval_parser._actions if a.option_strings}
    for flag in own:
        assert "default" in helps[flag], flag
    assert all(a in helps["--aa-attacks"] for a in aa_adapter.ATTACKS)


# item 1: the report says what chose best.pt ----------------------------------------------

def test_the_report_of_best_pt_says_which_split_chose_it(run, tmp_path):
    out = tmp_path / "ev" / "report.json"
    assert _eval(run, out, "--attack", "clean", "--which", "best") == 0
    report = json.loads(out.read_text())
    assert report["selected_on"].startswith("the val split")  # the default holds examples out
    assert "best.pt was chosen by its run's per-epoch check on the val split" in \
        out.with_suffix(".md").read_text()
    last = tmp_path / "last" / "report.json"
    assert _eval(run, last, "--attack", "clean") == 0  # checkpoint.pt: chosen by nothing
    assert "selected_on" not in json.loads(last.read_text())


@pytest.mark.parametrize(("split", "val_size", "chosen_on"), [
    ("auto", 150, "the val split"), ("val", 10, "the val split"),
    ("test", 0, "the test split"), ("auto", 0, "the test split")])  # auto + 0: older runs
def test_selection_of_reads_the_runs_check_split(split, val_size, chosen_on):
    meta = {"path": "runs/x/best.pt",
            "config": {"eval": {"split": split}, "data": {"val_size": val_size}}}
    assert selection_of(meta).startswith(chosen_on)
    assert ("optimistic" in selection_of(meta)) == (chosen_on == "the test split")
    assert selection_of({**meta, "path": "runs/x/checkpoint.pt"}) is None
    assert selection_of({"path": "w.pt", "config": {}}) is None
