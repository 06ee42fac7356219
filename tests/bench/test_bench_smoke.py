"""Every benchmark script runs end to end on the CPU with a tiny model (so the scripts cannot rot).

The scripts are run in this process as the modules ``bench.<name>`` (``runpy``, as
``python -m bench.<name>`` runs them) to spare a Python and torch start-up each; the
figures are meaningless at this size, only the output format and the code paths are checked:
both sides ran, and the last line is the ratio.
"""

from __future__ import annotations

import math
import runpy
import sys

import pytest

from tests.helpers import ROOT

BENCH = ROOT / "bench"
# bench.device_suite imports the benchmark modules; runpy then warns that it runs a fresh copy
# of one already imported, which is what it should do here
pytestmark = pytest.mark.filterwarnings("ignore:'bench.*' found in sys.modules:RuntimeWarning")
TINY = ["--device", "cpu", "--arch", "tiny-cnn", "--channels", "1", "--image-size", "8",
        "--batch-size", "8", "--iters", "2", "--warmup", "1"]

CASES = {
    "pgd_train_vs_robustness": ([], "ratio robust-amo / robustness"),
    "mfu": (["--steps", "2", "--peak-tflops", "0.05", "--matmul-n", "64"],
            "MFU vs measured ceiling"),
    "eval_vs_robustness": (["--dataset", "digits", "--examples", "16", "--pgd-steps", "3",
                           "--restarts", "2"], "ratio robustness time / robust-amo time"),
    "data_pipeline": (["--steps", "2", "--rounds", "1"], "idle fraction caused by data"),
}


def test_speed_bench_scripts_exist():
    # bench/ is a package of modules; the other benchmarks run in tests/bench/test_bench_scripts.py
    assert (BENCH / "__init__.py").is_file() and (BENCH / "common.py").is_file()
    assert set(CASES) <= {p.stem for p in BENCH.glob("*.py")}


@pytest.mark.parametrize("module", sorted(CASES))
def test_bench_runs_on_cpu(module, one_thread, monkeypatch, capsys):
    extra, last_label = CASES[module]
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{module}.py"), *TINY, *extra])
    runpy.run_module(f"bench.{module}", run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# device: cpu"), lines[0]
    label, _, value = lines[-1].rpartition(":")
    assert label.startswith(last_label), lines[-1]
    ratio = float(value)
    assert math.isfinite(ratio) and ratio >= 0
