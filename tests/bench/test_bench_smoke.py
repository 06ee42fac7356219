"""Every benchmark script runs end to end on the CPU with a tiny model (so the scripts cannot rot).

The scripts are run in this process (``runpy``) to spare a Python and torch start-up each; the
figures are meaningless at this size, only the output format and the code paths are checked:
both sides ran, and the last line is the ratio.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--device", "cpu", "--arch", "tiny-cnn", "--channels", "1", "--image-size", "8",
        "--batch-size", "8", "--iters", "2", "--warmup", "1"]

CASES = {
    "pgd_train_vs_robustness.py": ([], "ratio robust-amo / robustness"),
    "mfu.py": (["--steps", "2", "--peak-tflops", "0.05"], "MFU (achieved / peak)"),
    "eval_vs_robustness.py": (["--dataset", "digits", "--examples", "16", "--pgd-steps", "3",
                               "--restarts", "2"], "ratio robustness time / robust-amo time"),
    "data_pipeline.py": (["--steps", "2", "--rounds", "1"], "idle fraction caused by data"),
}


@pytest.fixture
def one_thread(monkeypatch, _single_thread):
    """The benchmarks import each other from bench/; the suite already runs on one thread."""
    monkeypatch.syspath_prepend(str(BENCH))


def test_speed_bench_scripts_exist():
    # the other benchmarks in bench/ run in tests/test_bench_scripts.py
    assert set(CASES) <= {p.name for p in BENCH.glob("*.py")}


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_runs_on_cpu(script, one_thread, monkeypatch, capsys):
    extra, last_label = CASES[script]
    monkeypatch.setattr(sys, "argv", [script, *TINY, *extra])
    runpy.run_path(str(BENCH / script), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# device: cpu"), lines[0]
    label, _, value = lines[-1].rpartition(":")
    assert label.startswith(last_label), lines[-1]
    ratio = float(value)
    assert math.isfinite(ratio) and ratio >= 0
