import json
import subprocess
import sys

import pytest

from robust_amo.cli import main
from tests.helpers import ROOT


def test_quickstart_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "qs"
    rc = main(["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 15
    # PGD training of the tiny CNN on digits: well above chance, clean and robust
    assert lines[-1]["clean_acc"] > 0.8 and lines[-1]["robust_acc"] > 0.4
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    assert "eps: 0.1" in (out / "config.yaml").read_text()


def test_flags_override_config(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out),
               "--epochs", "1", "--method", "standard", "--eps", "2/255", "--no-progress",
               "--set", "data.train_subset=300", "--set", "eval.n_examples=20"])
    assert rc == 0
    saved = (out / "config.yaml").read_text()
    assert "epochs: 1" in saved and "method: standard" in saved and "train_subset: 300" in saved
    assert "eps: 0.00784313725490196" in saved


@pytest.mark.parametrize("args,needle", [
    (["train", "--arch", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["train", "--set", "attack.epz=0.1"], "unknown config key attack.epz"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "--set", "model_kwargs.widht=2"], "model_kwargs"),
    (["train", "--set", "compile=true", "--set", "compile_backend=nope"], "compile_backend"),
])
def test_bad_input_exits_2_with_one_clear_line(args, needle, tmp_path, capsys):
    rc = main(args + ["--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert err.startswith("robust-amo: error:")


def test_console_script_and_archs():
    res = subprocess.run([sys.executable, "-m", "robust_amo.cli", "train", "--arch", "nope"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "known architectures" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "robust_amo.cli", "archs"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0 and "wrn28-10" in res.stdout.split()


def test_import_does_not_pull_in_robustness():
    code = "import sys, robust_amo, robust_amo.train, robust_amo.cli; " \
           "print('robustness' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "False"
