"""One writer per folder: a second ``train`` into a run folder, or a second ``reproduce`` on a
study folder, is refused while the first runs; a killed holder leaves no stale lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from robust_amo.errors import OutputError
from robust_amo.outputs import fcntl, folder_lock
from robust_amo.runs import RunDir
from robust_amo.studies import Options, load_study, run_study
from robust_amo.train import train
from tests.helpers import tiny_run
from tests.studies.test_reproduce import write_study

pytestmark = pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")


def test_train_into_a_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunDir(run).lock():
        with pytest.raises(OutputError, match=r"is in use by another robust-amo train \(pid \d+"):
            train(tiny_run(run, epochs=1))
    assert not (run / "metrics.jsonl").exists()
    train(tiny_run(run, epochs=1))  # released: the folder is free again
    assert (run / "checkpoint.pt").exists()


def test_a_second_runner_on_one_study_folder_is_refused(tmp_path):
    spec = load_study(write_study(tmp_path))
    out = tmp_path / "out"
    with folder_lock(out, "robust-amo reproduce"):
        with pytest.raises(OutputError, match="in use by another robust-amo reproduce"):
            run_study(spec, Options(out=out, device="cpu", progress=False))
    assert not (out / "runs").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from robust_amo.outputs import folder_lock
        with folder_lock({str(tmp_path)!r}, "test"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputError, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, "test"):
            pass
    holder.kill()
    holder.wait()
    with folder_lock(tmp_path, "test"):  # the kernel dropped the dead process's lock
        pass


def test_sigterm_stops_a_runner_and_its_training_process(tmp_path):
    import yaml

    from tests.studies.test_reproduce import TINY

    study = write_study(tmp_path, {**TINY, "config": {**TINY["config"], "epochs": 500}})
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "robust_amo.cli", "reproduce", str(study),
                               "--out", str(out), "--device", "cpu", "--no-progress"],
                              stderr=subprocess.PIPE, text=True)
    logs = []
    for _ in range(600):  # wait for the first training process to log an epoch
        logs = list(out.glob("runs/*/*/*/metrics.jsonl"))
        if logs or runner.poll() is not None:
            break
        time.sleep(0.1)
    assert logs, runner.stderr.read()
    runner.terminate()  # SIGTERM
    assert runner.wait(timeout=60) == 130
    assert "rerun the same command" in runner.stderr.read()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    request = str(logs[0].parent / "train-request.json")
    assert request not in ps  # the training process went with the runner
    assert yaml.safe_load((logs[0].parent / "cell.yaml").read_text())["epochs"] == 500
