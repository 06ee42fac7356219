"""What would skew the device suite's GPU figures (issue 21), checked on the CPU.

cudnn.benchmark per step, each method's own peak memory, GPU tests collected from the gpu-marked
files only, one guarded step-cost run per Jacobian-LM variant, training planned from a warm
epoch, AutoAttack extrapolated per attack, the measured MFU ceiling and the documented command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bench import device_suite as ds
from bench import mfu, step_cost

ROOT = Path(__file__).resolve().parents[2]


def _suite(tmp_path, budget=60.0) -> ds.Suite:
    return ds.Suite(tmp_path, budget, True, torch.device("cpu"), None, ds.Sizes.smoke())


def test_cudnn_benchmark_is_set_per_step_and_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = {}

    def look(name):
        def run(s):
            seen[name] = torch.backends.cudnn.benchmark
            if name == "tuned_fails":
                raise RuntimeError("boom")
        return run

    steps = [ds.Step(n, "", look(n), [], min_s=0, cudnn_benchmark=flag)
             for n, flag in (("tuned", True), ("after", None), ("tuned_fails", True),
                             ("shrinking", False))]
    ds.run_suite(_suite(tmp_path), steps)
    # "after" runs with what the process had, not what the step before it set
    assert seen == {"tuned": True, "after": False, "tuned_fails": True, "shrinking": False}
    assert torch.backends.cudnn.benchmark is False
    doc = json.loads((tmp_path / "figures.json").read_text())
    assert [st["cudnn_benchmark"] for st in doc["steps"].values()] == [True, None, True, False]
    md = (tmp_path / "figures.md").read_text()
    assert "| tuned | ok |" in md and "| on |" in md and "| off |" in md
    # the suite's own steps: tuned for fixed-shape training, off where batches shrink
    flags = {st.name: st.cudnn_benchmark for st in ds.STEPS}
    assert flags["eval"] is False and flags["autoattack"] is False
    assert flags["step_cost"] and flags["mfu"] and flags["pgd_train"] and flags["data"]


def test_native_trainer_does_not_set_the_global_flag():
    src = (ROOT / "bench" / "common.py").read_text()
    assert "cudnn.benchmark =" not in src.split("class NativeTrainer")[1].split("def step")[0]


class FakeMemory:
    """torch.cuda's memory counters over a running total of 'allocated' bytes."""

    def __init__(self, allocated: int) -> None:
        self.allocated = self.peak = allocated

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def empty_cache(self) -> None:
        pass


@pytest.mark.parametrize("graph", [50, 400])
def test_peak_memory_is_the_methods_own(graph):
    mem = FakeMemory(allocated=2_200)  # earlier models still allocated: not this method's
    state = {"steps": 0}

    def make():
        mem.alloc(100)  # the model

        def step():
            if state["steps"] == 0:
                mem.alloc(30)  # gradients and optimiser state, kept
            mem.alloc(graph)  # the graphs of the step, freed at its end
            mem.alloc(-graph)
            state["steps"] += 1

        return step

    peak = step_cost.own_peak_bytes(make, torch.device("cpu"), mem)
    assert peak == 100 + 30 + graph
    assert state["steps"] == 2


def test_gpu_tests_collect_only_marked_files_and_report_collection_errors(tmp_path,
                                                                           monkeypatch):
    tests = tmp_path / "tests"
    tests.mkdir()
    mark = "pytest.mark." + "gpu"  # this file itself must not look gpu-marked
    (tests / "test_marked.py").write_text(
        f"import pytest\npytestmark = {mark}\n\ndef test_runs():\n    pass\n")
    (tests / "test_marked_broken.py").write_text(
        f"import pytest\nimport no_such_module_here\n\n@{mark}\ndef test_x():\n    pass\n")
    (tests / "test_unmarked_broken.py").write_text("import no_such_module_either\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    assert ds.gpu_test_files(tmp_path) == ["tests/test_marked.py", "tests/test_marked_broken.py"]
    monkeypatch.setattr(ds, "ROOT", tmp_path)
    s = _suite(tmp_path / "out")
    (tmp_path / "out").mkdir()
    s.declare(ds.STEPS_BY_NAME["gpu_tests"])
    ds.step_gpu_tests(s)
    f = s.figures
    assert f["gpu_test tests/test_marked.py::test_runs"]["value"] == "passed"
    assert f["gpu_tests.ran"]["value"] == 1 and f["gpu_tests.failed"]["value"] == 0
    assert f["gpu_tests.collection_errors"]["value"] == 1
    assert f["gpu_tests.collection_errors"]["pass"] is False
    assert "tests/test_marked_broken.py" in f["gpu_tests.collection_errors"]["note"]
    assert f["gpu_test tests/test_marked_broken.py"]["value"] == "collection error"
    assert "no_such_module_here" in f["gpu_test tests/test_marked_broken.py"]["note"]
    assert not any("unmarked" in k for k in f)


def test_the_repositorys_gpu_files_include_the_host_sync_tests():
    files = ds.gpu_test_files(ROOT)
    assert "tests/test_gpu_speed.py" in files and "tests/test_gpu.py" in files
    assert "tests/test_layout.py" not in files


def test_one_failing_jacobian_variant_keeps_the_other_rows(tmp_path, monkeypatch):
    calls = []

    def fake_measure(settings):
        calls.append(list(settings.methods))
        if "jacobian-lm-batched" in settings.methods:
            raise torch.OutOfMemoryError("CUDA out of memory")
        rows = []
        for i, m in enumerate(settings.methods):
            t = 1.0 + i
            rows.append({"method": m, "forward": 1, "backward": 1, "s_per_step": t,
                         "vs_pgd": t, "vs_standard": t, "graph_mib": t, "graph_vs_pgd": t,
                         "cuda_peak_mib": float("nan"), "cuda_peak_vs_pgd": float("nan"),
                         "delta_mib": 1.0, "floor_vs_pgd": 1.5})
        return {"header": "", "results": rows}

    monkeypatch.setattr(step_cost, "measure", fake_measure)
    ok = ds.run_suite(_suite(tmp_path), [ds.STEPS_BY_NAME["step_cost"]])
    assert ok is False
    assert calls[1:] == [["pgd", "jacobian-lm"], ["pgd", "jacobian-lm-batched"],
                         ["pgd", "jacobian-lm-random"]]
    figs = json.loads((tmp_path / "figures.json").read_text())["figures"]
    assert figs["step_cost.jacobian-lm.s_per_step"]["value"] == 2.0
    assert figs["step_cost.jacobian-lm-random.x_pgd"]["value"] == 2.0
    assert figs["step_cost.jacobian-lm-batched.s_per_step"]["value"] is None
    assert "out of memory" in figs["step_cost.jacobian-lm-batched.s_per_step"]["note"]
    assert figs["step_cost.pgd.s_per_step"]["value"] == 2.0  # the main group's pgd row


def test_training_is_planned_from_a_warm_epoch():
    # a 21 s first epoch of 10 steps whose first step took 20 s (tuning): ~1.1 s per warm epoch
    assert ds.planned_steps(75.0, 21.0, 20.0, 10) == 10 * (1 + 48)
    # no tuning: 1 s epochs, 75 of them
    assert ds.planned_steps(75.0, 1.0, 0.1, 10) == 750
    # over budget after the first epoch, or one step per epoch
    assert ds.planned_steps(5.0, 21.0, 20.0, 10) == 10
    assert ds.planned_steps(10.0, 2.0, 2.0, 1) == 5


def test_autoattack_is_extrapolated_attack_by_attack():
    runs = [{"attack": "apgd-ce", "s": 2.0, "attacked": 80},
            {"attack": "apgd-t", "s": 6.0, "attacked": 30},
            {"attack": "fab-t", "s": 3.0, "attacked": 28},
            {"attack": "square", "s": 9.0, "attacked": 27}]
    # first attack: this run's share (80 of 100); later ones: 55% of the full set
    want = (2.0 * 1000 * 0.8 / 80 + (6.0 / 30 + 3.0 / 28 + 9.0 / 27) * 1000 * 0.55) * 3.0
    assert ds.aa_extrapolate(runs, 100, 1000, 3.0, 0.55) == pytest.approx(want)
    # this run's own shares: the old linear scaling of the whole run
    assert ds.aa_extrapolate(runs, 100, 1000, 3.0, None) == pytest.approx(20.0 * 10 * 3.0)
    # nothing left to time an attack on: no rate to scale
    runs[3]["attacked"] = 0
    assert ds.aa_extrapolate(runs, 100, 1000, 3.0, 0.55) is None
    names = {n for n, _, _ in ds.STEPS_BY_NAME["autoattack"].figures}
    assert {f"aa.{a}_{k}" for a in ds.AA_STANDARD for k in ("s", "survivors")} <= names


def test_new_figures_are_named_for_what_they_are():
    names = {n for st in ds.STEPS for n, _, _ in st.figures}
    assert {"eval.peer_looped_s", "eval.peer_looped_robust_acc",
            "eval.acc_not_above_peer_looped", "pgd_train.native_fp32_images_per_s",
            "pgd_train.robustness_use_best0_images_per_s", "pgd_train.native_fp32_ratio",
            "gpu_tests.collection_errors", "env.clamp_grad_at_0_1"} <= names
    targets = {n: t for st in ds.STEPS for n, _, t in st.figures}
    # strength is judged against the looped peer; the plain one is what robustness users get
    assert targets["eval.acc_not_above_peer_looped"].any_device
    assert targets["eval.acc_not_above_peer"] is None
    # the measured ceiling is the MFU; the datasheet is a second column
    assert targets["mfu.vs_probe"] is not None and targets["mfu.vs_datasheet"] is None


def test_clamp_gradient_is_measured():
    g = ds.clamp_grad_at_bounds(torch.device("cpu")).split(",")
    assert len(g) == 2 and all(v in ("0", "1") for v in g)


@pytest.mark.parametrize("name, peak", [("NVIDIA H200 NVL", 835.0), ("NVIDIA H200", 989.4),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 PCIe", 756.0)])
def test_datasheet_peak_of_each_variant(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert mfu.peak_tflops(torch.device("cuda"), None) == peak


def test_documented_command_keeps_its_log_when_killed():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.S)
    (cmd,) = [b for b in blocks if "bench.device_suite --out \"$OUT" in b]
    assert "set -o pipefail" in cmd and "PYTHONUNBUFFERED=1" in cmd
    limit = int(re.search(r"timeout -s TERM (\d+)", cmd).group(1))
    budget = float(re.search(r"--budget-s (\d+)", cmd).group(1))
    assert budget < limit < 460  # the suite stops itself first; SIGTERM before the tool's kill
    assert re.search(r"2>&1 \| tee \"\$OUT/[\w.-]+\"", cmd)


def test_looped_peer_restarts_only_the_examples_still_robust(monkeypatch):
    from bench import eval_vs_robustness as evr

    restarts, n = 3, 9
    calls: list[tuple[int, object]] = []

    seen = torch.zeros(n, dtype=torch.long)  # times each example was attacked

    class FakeAttacker:
        """Breaks example i at its (i mod restarts)-th attack, one restart per call."""

        def __call__(self, x, y, make_adv, **kw):
            calls.append((len(y), kw["random_restarts"]))
            idx = x[:, 0, 0, 0].long()
            broken = idx % restarts == seen[idx]
            seen[idx] += 1
            return torch.nn.functional.one_hot((y + broken.long()) % 10, 10).float(), x

    def fake_attacker(model, x, args, device, steps, r):
        return FakeAttacker(), {"random_restarts": r}

    monkeypatch.setattr(evr, "_attacker", fake_attacker)
    x = torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.zeros(n, dtype=torch.long)
    args = type("A", (), {"batch_size": 4})()
    acc, _ = evr.robustness_looped(None, x, y, args, torch.device("cpu"), 5, restarts)
    # broken at any restart counts (the last restart's verdict alone would leave 6 of 9)
    assert acc == 0.0
    # one restart per call of robustness's own loop; each pass only over the survivors
    assert [b for b, _ in calls] == [4, 4, 1, 4, 2, 3]
    assert all(r is False for _, r in calls)
