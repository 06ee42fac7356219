"""The method, margin, plugin and evaluation-agreement benchmarks run on the CPU (tiny settings).

Like tests/test_bench_smoke.py for the speed benchmarks: only the code paths and the output
format are checked, so a script that rots fails here. The scripts run in this process (runpy).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def run_script(monkeypatch, capsys, _single_thread):
    monkeypatch.syspath_prepend(str(BENCH))

    def run(script: str, *args: str) -> list[str]:
        monkeypatch.setattr(sys, "argv", [script, *args])
        runpy.run_path(str(BENCH / script), run_name="__main__")
        return capsys.readouterr().out.strip().splitlines()

    return run


def test_step_cost(run_script):
    lines = run_script("step_cost.py", "--arch", "tiny-cnn", "--shape", "1,8,8", "--batch", "8",
                       "--pgd-steps", "2", "--steps", "1", "--rounds", "1", "--threads", "1",
                       "--device", "cpu")
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert {"standard", "pgd", "robust-amo", "amo", "jacobian-lm"} <= set(rows)
    # robust AMO makes exactly PGD training's forward and backward passes; the ratio column to
    # pgd is 1 on the pgd row
    assert rows["robust-amo"][1:3] == rows["pgd"][1:3] == ["3", "3"]
    assert float(rows["pgd"][4]) == 1.0


def test_bench_margins(run_script):
    lines = run_script("bench_margins.py", "--arch", "tiny-cnn", "--batch", "4", "--iters", "1",
                       "--threads", "1")
    gram = next(ln for ln in lines if ln.startswith("gram"))
    assert float(gram.rsplit(" ", 1)[1]) < 1e-4  # exact up to float rounding


def test_robustness_plugin_step(run_script):
    lines = run_script("robustness_plugin_step.py", "--arch", "tiny-cnn", "--dataset", "digits",
                       "--batch-size", "8", "--steps", "2", "--repeats", "1", "--device", "cpu")
    assert lines[-1].startswith("plugin, eta_delta=0") and "x1.00" in lines[-1]


def test_eval_agreement(run_script, tmp_path):
    from robust_amo.config import resolve
    from robust_amo.train import train

    train(resolve(None, [{"arch": "tiny-cnn", "dataset": "digits", "method": "standard",
                          "epochs": 1, "batch_size": 64, "out": str(tmp_path),
                          "data": {"augment": False}, "eval": {"examples": 16, "steps": 0},
                          "attack": {"eps": 0.1, "step_size": 0.025}}]))
    lines = run_script("eval_agreement.py", "--checkpoint", str(tmp_path), "--n-examples", "16",
                       "--steps", "2", "--restarts", "2", "--repeats", "1", "--device", "cpu")
    table = [ln for ln in lines if ln.startswith("| ")]
    methods = [ln.split("|")[1].strip() for ln in table[1:]]
    assert methods[0] == "robust-amo (ours)" and any("torchattacks" in m for m in methods)
