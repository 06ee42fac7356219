"""``robust-amo reproduce``: a tiny study on the bundled digits (2 x 2 table cells, 1 epoch) is
expanded, run as separate processes, selected, tabulated, skipped when done and resumed."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from robust_amo.cli import main
from robust_amo.errors import ConfigError
from robust_amo.evaluation import EvalRequest
from robust_amo.jobs import read_request, write_request
from robust_amo.runs import read_metrics
from robust_amo.studies import Options, expand, load_study, plan, run_study, select
from robust_amo.studies import runner as runner_mod
from robust_amo.studies.results import RunState
from robust_amo.studies.spec import EPOCH_METRICS, parse_only
from tests.helpers import ROOT

PNG = b"\x89PNG\r\n\x1a\n"

TINY = {
    "name": "tiny",
    "title": "tiny study",
    "paper": "none",
    "config": {
        "dataset": "digits", "method": "pgd", "epochs": 1, "batch_size": 64,
        "data": {"augment": False, "train_subset": 300},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "attack": {"eps": 0.1, "step_size": 0.05, "steps": 2},
        "eval": {"n_examples": 100, "steps": 2},
        "bf16": False,
    },
    "axes": [
        {"name": "arch", "levels": [{"label": "mlp", "set": {"arch": "tiny-mlp"}},
                                    {"label": "lin", "set": {"arch": "linear"}}]},
        {"name": "reg", "levels": [
            {"label": "none", "set": {"optim": {"weight_decay": 0.0}}},
            {"label": "wd", "grid": {"quick": {"optim.weight_decay": [1.0e-4, 1.0e-1]},
                                     "paper": {"optim.weight_decay": [1.0e-4]}}}]},
    ],
    "seeds": {"quick": [0], "paper": [0, 1]},
    "select": {"by": "robust_acc", "split": "test"},
    "eval": {"attacks": ["pgd10"], "n_examples": 20, "batch_size": 20},
    "metrics": [
        {"name": "clean", "source": "best.clean_acc", "paper": {"mlp/none": 90.0}},
        {"name": "pgd10", "source": "eval.pgd10"},
        {"name": "error", "source": "best.clean_acc", "kind": "error"},
    ],
    "table": {"rows": ["arch"], "columns": ["reg"]},
    "cost": {"epoch_s": 0.5, "eval_s": 1.0},
}


def write_study(folder: Path, data: dict | None = None, name: str = "tiny.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data or TINY, sort_keys=False))
    return path


class CountingPopen(subprocess.Popen):
    """subprocess.Popen that records the commands the runner starts."""

    started: list[list[str]] = []

    def __init__(self, argv, *args, **kwargs):
        CountingPopen.started.append(list(argv))
        super().__init__(argv, *args, **kwargs)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """The tiny study run once to the end with two workers."""
    folder = tmp_path_factory.mktemp("study")
    spec = load_study(write_study(folder))
    out = folder / "out"
    failed = run_study(spec, Options(out=out, workers=2, threads=1, device="cpu",
                                     progress=False))
    return spec, out, failed


def test_expand_is_the_product_of_levels_grids_and_seeds(tmp_path):
    spec = load_study(write_study(tmp_path))
    runs = expand(spec, "quick")
    # 2 archs x (none: 1 point + wd: 2 points) x 1 seed
    assert len(runs) == 6
    assert len({r.folder(tmp_path) for r in runs}) == 6
    assert {r.cell_key for r in runs} == {"mlp/none", "mlp/wd", "lin/none", "lin/wd"}
    assert len(expand(spec, "paper")) == 2 * (1 + 1) * 2
    assert len(expand(spec, "quick", seeds=[3, 4, 5])) == 18
    only = expand(spec, only=parse_only(["arch=lin", "reg=wd"], spec))
    assert [r.point_label for r in only] == ["weight_decay=0.0001", "weight_decay=0.1"]


def test_later_overrides_win(tmp_path):
    spec = load_study(write_study(tmp_path))
    run = next(r for r in expand(spec, sets=[{"epochs": 3}], seeds=[7])
               if r.point_label == "weight_decay=0.1" and r.cell == ("lin", "wd"))
    cfg = plan(spec, Options(out=tmp_path / "o", sets=[{"epochs": 3}], seeds=[7]))
    cfg = next(s.cfg for s in cfg if s.run == run)
    assert (cfg.arch, cfg.optim.weight_decay, cfg.epochs, cfg.seed) == ("linear", 0.1, 3, 7)
    assert cfg.out == str(run.folder(tmp_path / "o" / "runs"))


def _state(spec, tmp_path, cell, point, seed, score):
    run = next(r for r in expand(spec, seeds=[0, 1]) if r.cell == cell
               and r.point_label == point and r.seed == seed)
    cfg = plan(spec, Options(out=tmp_path, seeds=[0, 1]))[0].cfg
    return RunState(run, tmp_path, cfg, epochs_done=cfg.epochs, score=score)


def test_selection_takes_the_largest_mean_over_seeds(tmp_path):
    spec = load_study(write_study(tmp_path))
    small, large = "weight_decay=0.0001", "weight_decay=0.1"
    states = [_state(spec, tmp_path, ("mlp", "wd"), small, 0, 90.0),
              _state(spec, tmp_path, ("mlp", "wd"), small, 1, 70.0),   # mean 80
              _state(spec, tmp_path, ("mlp", "wd"), large, 0, 85.0),
              _state(spec, tmp_path, ("mlp", "wd"), large, 1, 84.0)]   # mean 84.5: chosen
    chosen = select(states)["mlp/wd"]
    assert chosen.point == large and chosen.complete
    assert chosen.means == {small: 80.0, large: 84.5}
    states[3].epochs_done = 0  # an unfinished seed: left out of the mean, cell not complete
    chosen = select(states)["mlp/wd"]
    assert chosen.point == large and chosen.means[large] == 85.0 and not chosen.complete
    tie = [_state(spec, tmp_path, ("mlp", "wd"), p, 0, 80.0) for p in (small, large)]
    assert select(tie)["mlp/wd"].point == small  # ties: the first grid point


def test_runs_select_and_write_csv_md_png(finished_study):
    spec, out, failed = finished_study
    assert failed == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 and all(r["finished"] == "True" for r in rows)
    # brute force: re-read every run's metrics and pick each cell's point by hand
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        assert not Path(r["run_dir"]).is_absolute()  # relative to the study folder
        metrics = read_metrics(out / r["run_dir"] / "metrics.jsonl")
        score = 100 * max(m["robust_acc"] for m in metrics)
        assert math.isclose(float(r["score_robust_acc"]), score, abs_tol=1e-3)
        key = f"{r['arch']}/{r['reg']}"
        if key not in best or score > best[key][0]:
            best[key] = (score, r["point"])
    for r in rows:
        key = f"{r['arch']}/{r['reg']}"
        assert (r["selected"] == "True") == (r["point"] == best[key][1])
        report = out / r["run_dir"] / "eval" / "study.json"
        assert report.is_file() == (r["selected"] == "True")  # only selected runs evaluated
        if report.is_file():
            rep = json.loads(report.read_text())
            assert math.isclose(float(r["pgd10"]),
                                100 * rep["attacks"]["pgd10"]["robust_accuracy"], abs_tol=1e-3)
            assert rep["n_examples"] == 20
        assert math.isclose(float(r["error"]), 100 - float(r["clean"]), abs_tol=2e-3)
    table = (out / "table.md").read_text()
    assert "# tiny study" in table and "selected on the **test set**" in table
    mlp_none = next(r for r in rows if r["arch"] == "mlp" and r["reg"] == "none")
    ours = float(mlp_none["clean"])
    assert f"{ours:.2f} ± 0.00 (n=1) · 90.00 · {ours - 90:+.2f}" in table
    assert (out / "tiny.png").read_bytes().startswith(PNG)
    cell_cfg = yaml.safe_load((out / mlp_none["run_dir"] / "cell.yaml").read_text())
    assert cell_cfg["arch"] == "tiny-mlp" and cell_cfg["out"] == str(out / mlp_none["run_dir"])


def test_the_selection_metrics_are_what_train_writes(finished_study):
    """A study's select.by and best.KEY are checked against these names: keys of every
    metrics.jsonl line of a run (the last epoch's runs the per-epoch check)."""
    _, out, _ = finished_study
    for path in out.rglob("metrics.jsonl"):
        assert set(EPOCH_METRICS) <= set(read_metrics(path)[-1]), path


def test_a_finished_study_starts_nothing(finished_study, monkeypatch):
    spec, out, _ = finished_study
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    CountingPopen.started = []
    monkeypatch.setattr(runner_mod.subprocess, "Popen", CountingPopen)
    assert run_study(spec, Options(out=out, workers=2, threads=1, device="cpu",
                                   progress=False)) == 0
    assert CountingPopen.started == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == before


def test_a_cut_short_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    data = {**TINY, "eval": None, "metrics": [TINY["metrics"][0]]}
    spec = load_study(write_study(tmp_path, data))
    out = tmp_path / "out"
    opts = dict(out=out, only=parse_only(["arch=mlp", "reg=none"], spec), threads=1,
                device="cpu", progress=False)
    assert run_study(spec, Options(**opts, sets=[{"epochs": 1}])) == 0
    (state,) = plan(spec, Options(**opts, sets=[{"epochs": 2}]))
    assert state.epochs_done == 1 and not state.finished  # as a run killed after epoch 1
    first = (state.folder / "metrics.jsonl").read_text()
    CountingPopen.started = []
    monkeypatch.setattr(runner_mod.subprocess, "Popen", CountingPopen)
    assert run_study(spec, Options(**opts, sets=[{"epochs": 2}])) == 0
    (argv,) = CountingPopen.started
    assert argv[1:3] == ["-m", "robust_amo.worker"]
    assert json.loads(Path(argv[-1]).read_text())["resume"] is True
    lines = (state.folder / "metrics.jsonl").read_text()
    assert lines.startswith(first) and [m["epoch"] for m in read_metrics(
        state.folder / "metrics.jsonl")] == [1, 2]
    # a run killed before its first checkpoint holds only cell.yaml: it trains from scratch
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "config.yaml"):
        (state.folder / name).unlink(missing_ok=True)
    CountingPopen.started = []
    assert run_study(spec, Options(**opts, sets=[{"epochs": 2}])) == 0
    (argv,) = CountingPopen.started
    assert json.loads(Path(argv[-1]).read_text())["resume"] is False
    assert plan(spec, Options(**opts, sets=[{"epochs": 2}]))[0].finished


BAD = [
    ({"colour": 1}, "unknown study key colour"),
    ({"axes": []}, "axes must be a non-empty list"),
    ({"axes": [{"name": "a", "levels": [{"label": "x/y"}]}]}, "label 'x/y'"),
    ({"axes": [{"name": "a", "levels": [{"label": "x"}, {"label": "x"}]}]}, "labels repeat"),
    ({"metrics": [{"name": "m", "source": "loss"}]}, "must be best.KEY"),
    ({"metrics": [{"name": "m", "source": "best.clean_acc", "paper": {"mlp/none/x": 1}}]},
     "no table cell"),
    ({"table": {"rows": ["arch"], "columns": []}}, "must name every axis"),
    ({"seeds": {"quick": [-1]}}, "seeds must map"),
    ({"select": {"split": "train"}}, "select.split"),
    ({"config": {"epochs": "many"}}, "epochs: expected an integer"),
    ({"config": {**TINY["config"], "method": "no-such-method"}}, "no-such-method"),
]


@pytest.mark.parametrize(("change", "needle"), BAD)
def test_a_malformed_study_is_one_line_and_exit_2(change, needle, tmp_path, capsys):
    path = write_study(tmp_path, {**TINY, **change})
    code = main(["reproduce", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_flags_are_one_line(tmp_path, capsys):
    path = write_study(tmp_path)
    for argv, needle in [(["--only", "arch=cnn9"], "has no level 'cnn9'"),
                         (["--only", "depth=1"], "AXIS one of arch, reg"),
                         (["--workers", "0"], "--workers must be >= 1"),
                         (["--set", "epochs"], "expected KEY=VALUE")]:
        assert main(["reproduce", str(path), "--dry-run", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert main(["reproduce", "no-such-study", "--studies-dir", str(tmp_path)]) == 2
    assert "no study 'no-such-study'" in capsys.readouterr().err


def test_another_studys_folder_is_refused(finished_study, tmp_path, capsys):
    _, out, _ = finished_study
    other = write_study(tmp_path, {**TINY, "name": "other"})
    assert main(["reproduce", str(other), "--out", str(out), "--device", "cpu"]) == 2
    assert "holds the results of study 'tiny'" in capsys.readouterr().err


def test_shipped_studies_list_and_dry_run(tmp_path, capsys):
    studies = ROOT / "configs" / "studies"
    assert main(["reproduce", "--list", "--studies-dir", str(studies)]) == 0
    listed = capsys.readouterr().out
    for name in ("sokolic-table1", "sokolic-fig2", "wei-ma-table1", "wei-ma-table2",
                 "wei-ma-table2-small", "robust-amo-vs-pgd-small", "baselines-small",
                 "cifar10-baselines"):
        assert name in listed
    assert "sokolic-table1               quick: 168 runs" in listed
    assert main(["reproduce", "wei-ma-table2", "--studies-dir", str(studies), "--dry-run",
                 "--out", "/nonexistent/study", "--data-dir", str(tmp_path)]) == 0
    dry = capsys.readouterr().out
    assert "wrn28-10/robust-amo" in dry and "4 runs, 4 to train" in dry
    spec = load_study(studies / "wei-ma-table2.yaml")
    states = plan(spec, Options(out=Path("/nonexistent")))
    wrn28 = next(s.cfg for s in states if s.run.cell_key == "wrn28-10/robust-amo")
    wrn16 = next(s.cfg for s in states if s.run.cell_key == "wrn16-10/robust-amo")
    assert (wrn28.batch_size, wrn28.optim.lr, wrn28.optim.weight_decay) == (64, 0.0707, 2e-4)
    assert (wrn16.batch_size, wrn16.optim.lr) == (128, 0.1)


def test_paper_values_of_sokolic_table1_match_the_cell_configs():
    """The study's paper column is the per-cell configs' (checked there against Table I)."""
    spec = load_study(ROOT / "configs" / "studies" / "sokolic-table1.yaml")
    paper = spec.metrics[0].paper
    assert len(paper) == 36
    for key, value in paper.items():
        arch, n, loss, reg = key.split("/")
        text = (ROOT / "configs" / "sokolic_table1" / f"mnist_{arch}_{n}_{loss}_{reg}.yaml"
                ).read_text()
        assert f"Paper accuracy: {value:.2f}%" in text
    assert statistics.fmean(paper.values()) > 90


def test_val_selection_needs_a_test_number(tmp_path):
    data = {**TINY, "eval": None, "metrics": [{"name": "pgd", "source": "best.robust_acc"}]}
    spec = load_study(write_study(tmp_path, data))
    with pytest.raises(ConfigError, match="report an eval.ATTACK"):
        plan(spec, Options(out=tmp_path / "o", select="val"))


def test_val_selection_holds_examples_out_and_evaluates_on_test(tmp_path):
    spec = load_study(write_study(tmp_path))
    states = plan(spec, Options(out=tmp_path / "o", select="val"))
    assert all(s.folder.is_relative_to(tmp_path / "o" / "runs-val") for s in states)
    assert {(s.cfg.data.val_size, s.cfg.eval.split) for s in states} == {(1000, "val")}
    job = runner_mod.eval_job(states[0], spec, Options(out=tmp_path / "o", select="val"))
    request = read_request(write_request(job.request, tmp_path / "eval-request.json"))
    assert request.evaluation["split"] == "test"
    # a study without an eval step still reports test numbers under val: clean accuracy
    no_eval = load_study(write_study(tmp_path, {**TINY, "eval": None, "name": "noeval",
                                                "metrics": TINY["metrics"][:1]}, "n.yaml"))
    ev = runner_mod.eval_spec(no_eval, "val")
    assert ev is not None and ev.attacks == ["clean"] and ev.n_examples is None
    assert runner_mod.eval_spec(no_eval, "test") is None


def test_a_train_job_is_a_worker_request_and_says_what_it_runs(tmp_path):
    spec = load_study(write_study(tmp_path))
    opts = Options(out=tmp_path / "o", device="cpu", data_dir="/data")
    state = plan(spec, opts)[0]
    job = runner_mod.train_job(state, opts)
    assert job.argv[1:] == ["-m", "robust_amo.worker", str(state.folder / "train-request.json")]
    assert job.request == runner_mod.TrainRequest(
        config=str(state.folder / "cell.yaml"), resume=False, device="cpu", data_dir="/data")
    assert job.describe().startswith(f"train config={state.folder / 'cell.yaml'} resume=False")
    assert not job.request_path.exists()  # written when the process starts, not when planned
    ev = runner_mod.eval_job(state, spec, opts)
    assert ev.argv[1:] == ["-m", "robust_amo.worker", str(state.folder / "eval-request.json")]
    assert ev.describe().startswith(f"eval checkpoint={state.folder} ")


def test_an_eval_job_is_a_worker_request_that_resumes(tmp_path):
    spec = load_study(write_study(tmp_path))
    opts = Options(out=tmp_path / "o", device="cpu", data_dir="/data")
    state = plan(spec, opts)[0]
    job = runner_mod.eval_job(state, spec, opts)
    assert job.kind == "eval" and not job.request_path.exists()
    state.folder.mkdir(parents=True)  # as the runner does when it starts the job
    write_request(job.request, job.request_path)
    fields = read_request(job.request_path).evaluation
    out = state.folder / "eval" / "study.json"
    expected = EvalRequest(
        checkpoint=str(state.folder), which="best", split="test", out=str(out),
        batch_size=20, n_examples=20, attacks=["pgd10"], device="cpu", data_dir="/data",
        progress=False, sanity=True, resume=False)
    assert EvalRequest.from_dict(fields) == expected
    # an interrupted evaluation left its state file: the next start resumes it
    out.parent.mkdir()
    out.with_suffix(".state.pt").write_bytes(b"")
    assert runner_mod.eval_job(state, spec, opts).request.evaluation["resume"] is True
    # clean accuracy only: no large-eps check, which is about attacks
    clean = load_study(write_study(tmp_path, {**TINY, "eval": {"attacks": ["clean"]},
                                              "name": "clean", "metrics": TINY["metrics"][:1]},
                                   "c.yaml"))
    fields = runner_mod.eval_job(plan(clean, opts)[0], clean, opts).request.evaluation
    assert fields["sanity"] is False and fields["n_examples"] == 1000
