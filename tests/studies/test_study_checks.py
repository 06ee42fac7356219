"""``robust-amo reproduce`` checks a study before its first run and lists studies cheaply: the
whole study file (selection metric, eval attacks and counts, archs naming the file and cell),
the data folder, a run folder held by a job of an earlier runner; and a runner's jobs die with
it, ``kill -9`` included (issue 20, items 5, 10, 17, 19, 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from robust_amo.cli import main
from robust_amo.errors import OutputError
from robust_amo.studies import Options, load_study, plan
from robust_amo.studies import runner as runner_mod
from tests.helpers import ROOT
from tests.studies.test_reproduce import TINY, write_study

STUDIES = ROOT / "configs" / "studies"


def count_yaml_loads(monkeypatch) -> list[int]:
    """A one-element list counting every ``yaml.safe_load`` from now on."""
    calls = [0]
    real = yaml.safe_load

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(yaml, "safe_load", counting)
    return calls


def test_list_reads_each_study_and_its_base_once(monkeypatch, capsys):
    """--list resolved all 3,878 runs of the shipped studies (3,850 YAML reads, 22 s)."""
    calls = count_yaml_loads(monkeypatch)
    assert main(["reproduce", "--list", "--studies-dir", str(STUDIES)]) == 0
    n_studies = len(list(STUDIES.glob("*.yaml")))
    assert calls[0] <= 2 * n_studies, calls[0]
    listed = capsys.readouterr().out
    # the same counts and estimates as resolving every run gave
    assert "sokolic-table1               quick: 168 runs, ~13.8 h; paper: 2880 runs, ~412.5 h" \
        in listed
    assert "robust-amo-vs-pgd-small      quick: 9 runs, ~1.5 h; paper: 25 runs, ~2.8 h" in listed


def test_a_dry_run_reads_the_base_config_once(monkeypatch, tmp_path, capsys):
    calls = count_yaml_loads(monkeypatch)
    assert main(["reproduce", "sokolic-table1", "--studies-dir", str(STUDIES), "--dry-run",
                 "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)]) == 0
    assert calls[0] <= 3, calls[0]  # the study, its base (and nothing per run)
    assert "168 runs, 168 to train" in capsys.readouterr().out


def test_runs_of_one_point_differ_only_in_seed_and_folder(tmp_path):
    spec = load_study(write_study(tmp_path))
    states = plan(spec, Options(out=tmp_path / "o", seeds=[3, 4]))
    a, b = (s for s in states if s.run.cell_key == "mlp/none")
    assert (a.cfg.seed, b.cfg.seed) == (3, 4)
    assert (a.cfg.out, b.cfg.out) == (str(a.folder), str(b.folder))
    assert {**a.cfg.to_dict(), "seed": 0, "out": ""} == {**b.cfg.to_dict(), "seed": 0, "out": ""}


def test_a_dry_run_checks_the_data_folder_first(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-data"
    code = main(["reproduce", "sokolic-table1", "--studies-dir", str(STUDIES), "--dry-run",
                 "--out", str(tmp_path / "o"), "--data-dir", str(missing)])
    out, err = capsys.readouterr()
    assert code == 2 and "to train" not in out
    assert f"--data-dir {missing} does not exist (mnist, read by 168 runs)" in err
    assert err.count("\n") == 1, err
    # the config's own data folder (data_dir: data, relative to here) is checked as well
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "sokolic-table1", "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "data does not exist" in capsys.readouterr().err


def test_a_run_checks_the_data_before_starting_anything(tmp_path, monkeypatch, capsys):
    data = {**TINY, "config": {**TINY["config"], "dataset": "mnist"}}
    path = write_study(tmp_path, data)
    monkeypatch.setattr(runner_mod.subprocess, "Popen", None)  # starting a job would fail
    code = main(["reproduce", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "dataset 'mnist' needs --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


ARCH = {"axes": [TINY["axes"][0], {"name": "reg", "levels": [
    {"label": "none"}, {"label": "big", "set": {"arch": "no-such-net"}}]}]}

BAD = [
    ({"select": {"by": "accuracy"}},
     "select.by 'accuracy' is no per-epoch accuracy of metrics.jsonl; use one of robust_acc, "
     "clean_acc, train_acc"),
    ({"eval": {"attacks": ["pgd10", "fgsm"]}},
     "eval.attacks: unknown attack 'fgsm'; use clean, pgdK"),
    ({"eval": {"attacks": ["pgd10"], "n_examples": 0}}, "eval.n_examples must be >= 1, got 0"),
    ({"eval": {"attacks": ["pgd10"], "batch_size": 0}}, "eval.batch_size must be >= 1, got 0"),
    ({"metrics": [{"name": "m", "source": "eval.pgd50"}]},
     "metric m: eval.pgd50 names no attack of the eval step (eval.attacks: pgd10)"),
    ({"metrics": [{"name": "m", "source": "best.acc"}]},
     "metric m: best.acc is no per-epoch metric of metrics.jsonl"),
    (ARCH, "tiny.yaml: cell mlp/big (default, seed 0): arch: unknown architecture "
           "'no-such-net'"),
]


@pytest.mark.parametrize(("change", "needle"), BAD)
def test_the_whole_study_is_checked_before_the_first_run(change, needle, tmp_path, monkeypatch,
                                                         capsys):
    path = write_study(tmp_path, {**TINY, **change})
    monkeypatch.setattr(runner_mod.subprocess, "Popen", None)  # starting a job would fail
    code = main(["reproduce", str(path), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""
"""Holds a folder lock as robust_amo.outputs.folder_lock does (pid in the file) for a while."""


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / ".robust-amo.lock"),
                             str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="folders are not locked on Windows")
def test_a_run_folder_held_by_a_live_process_is_waited_for_then_named(tmp_path):
    spec = load_study(write_study(tmp_path))
    states = plan(spec, Options(out=tmp_path / "o"))
    holder = hold_lock(states[1].folder, 60)
    try:
        assert runner_mod.lock_holder(states[1].folder) == str(holder.pid)
        with pytest.raises(OutputError, match=rf"run folder .*mlp-wd.* is in use by process "
                                              rf"{holder.pid} .*kill {holder.pid}\), then run"):
            runner_mod.wait_for_orphans(states, timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()
    assert runner_mod.lock_holder(states[1].folder) is None
    # a job that ends while the runner waits (it got SIGTERM when its runner died) is no error
    brief = hold_lock(states[0].folder, 0.5)
    t0 = time.monotonic()
    runner_mod.wait_for_orphans(states, timeout_s=20)
    assert time.monotonic() - t0 < 10
    brief.wait()


FAKE_WORKER = """
import os, sys, time
open(os.path.join(os.path.dirname(sys.argv[1]), "job.pid"), "w").write(str(os.getpid()))
time.sleep(120)
"""

RUNNER = """
import sys
from pathlib import Path
from robust_amo.studies import Options, load_study, run_study
from robust_amo.studies import runner
runner.WORKER = "fake_worker"
run_study(load_study(sys.argv[1]), Options(out=Path(sys.argv[2]), progress=False,
                                           only={"arch": {"mlp"}, "reg": {"none"}}))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead, waiting for its parent (init here) to reap it
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_runners_jobs_die_with_it(sig, tmp_path):
    """kill -9 of a runner (no handler runs) and SIGTERM (the runner stops its jobs) both end
    the job; a job that outlived its runner kept its run folder and failed the rerun."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    study = write_study(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(study), str(tmp_path / "o")],
                              env=env)
    pid_file = tmp_path / "o" / "runs" / "mlp-none" / "default" / "seed0" / "job.pid"
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()):
            assert runner.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        job = int(pid_file.read_text())
        assert alive(job)
        assert os.getpgid(job) == job  # its own process group, stopped as one
        runner.send_signal(sig)
        runner.wait(timeout=30)
        deadline = time.monotonic() + 5
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job)
    finally:
        runner.kill()
        runner.wait()
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
