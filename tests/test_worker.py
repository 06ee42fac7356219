"""``python -m robust_amo.worker REQUEST.json``: typed requests (robust_amo.jobs) read safely,
a train request runs and resumes, an eval request evaluates, and the exit statuses are the
command line's."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from robust_amo import worker
from robust_amo.config import save_yaml
from robust_amo.errors import ConfigError
from robust_amo.evaluation import EvalRequest, Report
from robust_amo.jobs import REQUESTS, EvalJobRequest, TrainRequest, read_request, write_request
from robust_amo.runs import RunDir
from tests.helpers import ROOT, tiny_run


def _config(tmp_path, **overrides):
    """A tiny run's resolved config file, its run folder beside it."""
    cfg = tiny_run(tmp_path / "run", **overrides)
    path = tmp_path / "cell.yaml"
    save_yaml(cfg, path)
    return path


def test_a_request_round_trips_through_its_file(tmp_path):
    req = TrainRequest(config="c.yaml", resume=True, device="cpu", data_dir="/d", progress=False)
    path = write_request(req, tmp_path / "r.json")
    assert json.loads(path.read_text())["kind"] == "train"
    assert read_request(path) == req
    assert read_request(write_request(TrainRequest("c.yaml"), path)) == TrainRequest("c.yaml")
    assert REQUESTS["train"] is TrainRequest
    ev = EvalJobRequest(EvalRequest(checkpoint="run", attacks=["clean"], n_examples=5).to_dict())
    assert read_request(write_request(ev, path)) == ev and REQUESTS["eval"] is EvalJobRequest
    assert json.loads(path.read_text())["evaluation"]["attacks"] == ["clean"]


@pytest.mark.parametrize("text, needle", [
    ("{not json", "cannot read it as JSON"),
    ("[1]", "expected a JSON object"),
    ('{"kind": "dance", "config": "c"}', "unknown kind 'dance'; known kinds: eval, train"),
    ('{"config": "c"}', "unknown kind None"),
    ('{"kind": "train", "config": "c", "colour": 1}', "unknown key(s) colour"),
    ('{"kind": "train", "resume": true}', "key 'config' is missing"),
    ('{"kind": "train", "config": "c", "resume": "yes"}', "resume must be"),
    ('{"kind": "train", "config": "c", "data_dir": 3}', "data_dir must be"),
    ('{"kind": "train", "config": "c", "resume": 1}', "resume must be"),
    ('{"kind": "eval", "evaluation": ["clean"]}', "evaluation must be"),
    ('{"kind": "eval"}', "key 'evaluation' is missing"),
])
def test_a_bad_request_is_one_line(tmp_path, text, needle):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_request(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        read_request(tmp_path / "missing.json")


def test_a_train_request_trains_then_resumes(tmp_path, caplog):
    config = _config(tmp_path, epochs=1)
    req = write_request(TrainRequest(str(config), device="cpu"), tmp_path / "req.json")
    assert worker.main([str(req)]) == 0
    run = RunDir(tmp_path / "run")
    assert run.finished(1) and run.last.is_file()
    first = run.metrics.read_text()

    # the same request again: the folder holds a run, so without resume it is refused
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="robust_amo.worker"):
        assert worker.main([str(req)]) == worker.USER_ERROR
    (record,) = [r for r in caplog.records if r.name == "robust_amo.worker"]
    assert "continue it (resume)" in record.getMessage() and "\n" not in record.getMessage()
    assert run.metrics.read_text() == first

    config = _config(tmp_path, epochs=2)  # more epochs: a key a resumed run may change
    write_request(TrainRequest(str(config), resume=True, device="cpu"), req)
    assert worker.main([str(req)]) == 0
    assert run.metrics.read_text().startswith(first)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_the_request_overrides_the_device_and_data_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(worker, "train", lambda cfg, **kw: seen.append((cfg, kw)) or {})
    config = _config(tmp_path)
    worker.run(TrainRequest(str(config), resume=True, device="cpu", data_dir=str(tmp_path),
                            progress=True))
    ((cfg, kw),) = seen
    assert cfg.device == "cpu" and cfg.data.data_dir == str(tmp_path)
    assert kw == {"resume": True, "progress": True}


def test_an_eval_request_evaluates_the_checkpoint(tmp_path, caplog):
    config = _config(tmp_path, epochs=1)
    assert worker.main([str(write_request(TrainRequest(str(config), device="cpu"),
                                          tmp_path / "train.json"))]) == 0
    out = tmp_path / "run" / "eval" / "study.json"
    fields = EvalRequest(checkpoint=str(tmp_path / "run"), attacks=["clean"], n_examples=20,
                         batch_size=10, device="cpu", progress=False, sanity=False,
                         out=str(out)).to_dict()
    req = write_request(EvalJobRequest(fields), tmp_path / "eval.json")
    with caplog.at_level(logging.INFO, logger="robust_amo.worker"):
        assert worker.main([str(req)]) == 0
    report = Report.read(out)
    assert report.n_examples == 20 and set(report.attacks) == {"clean"}
    assert any("| clean |" in r.getMessage() for r in caplog.records
               if r.name == "robust_amo.worker")  # the job log holds the table
    # a second start without overwrite is refused as the command refuses it: one line, exit 2
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="robust_amo.worker"):
        assert worker.main([str(req)]) == worker.USER_ERROR
    (record,) = [r for r in caplog.records if r.name == "robust_amo.worker"]
    assert "\n" not in record.getMessage()
    # a field the evaluation does not know is the evaluation's one-line error
    write_request(EvalJobRequest({**fields, "colour": 1}), req)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="robust_amo.worker"):
        assert worker.main([str(req)]) == worker.USER_ERROR
    (record,) = [r for r in caplog.records if r.name == "robust_amo.worker"]
    assert "no field 'colour'" in record.getMessage()


def test_the_worker_process_exits_as_the_command_does(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "dance"}')
    res = subprocess.run([sys.executable, "-m", "robust_amo.worker", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "unknown kind 'dance'" in res.stderr
    res = subprocess.run([sys.executable, "-m", "robust_amo.worker"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "usage" in res.stderr


def test_sigterm_stops_a_worker_with_status_130(tmp_path):
    config = _config(tmp_path, epochs=500)
    req = write_request(TrainRequest(str(config), device="cpu"), tmp_path / "req.json")
    proc = subprocess.Popen([sys.executable, "-m", "robust_amo.worker", str(req)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    run = RunDir(tmp_path / "run")
    for _ in range(600):  # wait for the first epoch
        if run.epochs_done() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert run.epochs_done(), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == worker.INTERRUPTED, err
    assert "interrupted" in err
