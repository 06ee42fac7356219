"""The device suite (``python -m bench.device_suite``): its smoke run, its guards and its parts.

The smoke run is the CI check that the one prepared GPU command cannot rot: every step runs on
the CPU with tiny models, and figures.json/figures.md hold every declared figure with the schema
the issue fixes. The other tests check what a GPU run relies on without a GPU: a failing step is
recorded and the later steps still run, the budget skips steps with a reason, a kill keeps what
was measured, the junit parsing, the FLOP counter and the CIFAR-10 split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench import device_suite as ds
from bench.common import forward_flops, pgd_step_flops

FIGURE_KEYS = {"value", "unit", "target", "pass", "step", "note"}


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines()[4:]:
        if not line.strip():  # the steps table follows the figures
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


def test_smoke_suite_writes_every_figure(tmp_path, monkeypatch):
    out = tmp_path / "suite"
    rc = ds.main(["--out", str(out), "--smoke"])
    doc = json.loads((out / "figures.json").read_text())
    assert {"device", "torch", "date", "figures"} <= set(doc)
    assert doc["torch"] == torch.__version__ and doc["smoke"] is True
    assert [n for n in doc["steps"]] == [st.name for st in ds.STEPS]
    assert all(st["status"] == "ok" for st in doc["steps"].values()), doc["steps"]
    assert rc == 0
    figs = doc["figures"]
    for st in ds.STEPS:
        for name, unit, target in st.figures:
            fig = figs[name]
            assert set(fig) == FIGURE_KEYS, name
            assert fig["step"] == st.name and fig["unit"] == unit
            assert fig["target"] == (target.text() if target else None)
            assert fig["pass"] in (True, False, None)
            # measured, or a reason why not (a peer that is missing, a CUDA-only figure)
            assert fig["value"] is not None or fig["note"], name
            if isinstance(fig["value"], float):
                assert math.isfinite(fig["value"])
            if target is not None and not target.any_device:
                assert fig["pass"] is None  # GPU targets are not judged on the CPU
    # the steps measured real things, not placeholders
    assert figs["step_cost.pgd.x_pgd"]["value"] == 1.0
    assert figs["step_cost.robust-amo.delta_floor_x_pgd"]["value"] > 1.0  # δ's are in the graph
    assert figs["mfu.step_gflop_per_image"]["value"] > figs["mfu.forward_gflop_per_image"][
        "value"] > 0
    assert 0 <= figs["eval.native_robust_acc"]["value"] <= figs["eval.clean_acc"]["value"]
    assert figs["eval.acc_not_above_peer"]["pass"] in (True, None)
    # every GPU test was collected, among them the no-host-sync tests of step and PGD loop
    tests = {k for k in figs if k.startswith("gpu_test ")}
    assert any("test_gpu_speed.py::test_pgd_attack_loop_has_no_host_sync" in k for k in tests)
    assert any("test_gpu_speed.py::test_train_step_has_no_host_sync[robust-amo]" in k
               for k in tests)
    assert figs["gpu_tests.no_host_sync"]["value"] in ("skipped", "passed")
    # missing peers are reported, not failures
    for peer in ("robustness",):
        if ds.peer_version(peer) is None:
            assert "peer missing" in figs["pgd_train.ratio"]["note"]
    # figures.md: the same figures, one row each
    rows = _table_rows((out / "figures.md").read_text())
    assert set(rows) == set(figs)
    assert rows["step_cost.robust-amo.x_pgd"][3] == "≤ 1.1"
    # a second run does not silently replace the first
    assert ds.main(["--out", str(out), "--smoke"]) == 2


def _suite(tmp_path, budget=60.0) -> ds.Suite:
    return ds.Suite(tmp_path, budget, True, torch.device("cpu"), None, ds.Sizes.smoke())


def _read(tmp_path) -> dict:
    return json.loads((tmp_path / "figures.json").read_text())


def test_a_failing_step_is_recorded_and_later_steps_still_run(tmp_path):
    def boom(s):
        s.record("a.first", 1.5)
        raise ValueError("no such kernel")

    written = []

    def after(s):
        written.append(_read(tmp_path)["steps"]["boom"]["status"])  # written before this step
        s.record("b.value", 3.0)

    steps = [ds.Step("boom", "fails", boom, [("a.first", "s", None),
                                              ("a.second", "s", ds.Target("<=", 1))], min_s=0),
             ds.Step("after", "runs", after, [("b.value", "s", None)], min_s=0)]
    assert ds.run_suite(_suite(tmp_path), steps) is False
    doc = _read(tmp_path)
    assert doc["steps"]["boom"]["status"] == "error"
    assert doc["steps"]["boom"]["error"] == "ValueError: no such kernel"
    assert written == ["error"]
    assert doc["figures"]["a.first"]["value"] == 1.5  # what it measured before failing is kept
    assert doc["figures"]["a.second"] == {
        "value": None, "unit": "s", "target": "≤ 1", "pass": None, "step": "boom",
        "note": "error: ValueError: no such kernel"}
    assert doc["steps"]["after"]["status"] == "ok" and doc["figures"]["b.value"]["value"] == 3.0
    assert "a.second" in (tmp_path / "figures.md").read_text()


def test_over_budget_steps_are_skipped_with_a_reason(tmp_path):
    ran = []
    steps = [ds.Step("first", "", lambda s: ran.append(1), [("x", "", None)], min_s=0,
                     min_s_smoke=0),
             ds.Step("big", "", lambda s: ran.append(2), [("y", "", ds.Target(">=", 2))],
                     min_s=1e6, min_s_smoke=1e6)]
    assert ds.run_suite(_suite(tmp_path, budget=30), steps)
    doc = _read(tmp_path)
    assert ran == [1]
    assert doc["steps"]["big"]["status"] == "skipped"
    assert doc["figures"]["y"]["pass"] is None
    assert doc["figures"]["y"]["note"].startswith("skipped: over budget")


def test_a_killed_run_keeps_its_figures(tmp_path):
    def killed(s):
        s.record("m", 2.0)
        raise ds.Killed("killed by signal 15")

    steps = [ds.Step("k", "", killed, [("m", "", None), ("n", "", None)], min_s=0),
             ds.Step("later", "", lambda s: None, [("o", "", None)], min_s=0)]
    with pytest.raises(ds.Killed):
        ds.run_suite(_suite(tmp_path), steps)
    doc = _read(tmp_path)
    assert doc["figures"]["m"]["value"] == 2.0
    assert doc["steps"]["k"]["status"] == "killed"
    assert doc["steps"]["later"]["status"] == "not run"
    assert doc["figures"]["o"]["note"].startswith("not run: killed")


def test_a_missing_peer_is_reported_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "peer_version", lambda name: None)
    assert ds.run_suite(_suite(tmp_path), [ds.STEPS_BY_NAME["pgd_train"],
                                           ds.STEPS_BY_NAME["autoattack"]])
    figs = _read(tmp_path)["figures"]
    assert figs["pgd_train.native_images_per_s"]["value"] > 0
    assert figs["pgd_train.ratio"]["value"] is None
    assert figs["pgd_train.ratio"]["note"].startswith("peer missing: robustness")
    assert all(figs[n]["note"].startswith("peer missing")
               for n, _, _ in ds.STEPS_BY_NAME["autoattack"].figures)


def test_targets_are_judged_on_cuda_only_unless_any_device():
    t = ds.Target("<=", 1.10)
    assert t.judge(1.05, on_cuda=True) is True and t.judge(1.2, on_cuda=True) is False
    assert t.judge(1.05, on_cuda=False) is None and t.judge(None, on_cuda=True) is None
    assert ds.Target(">=", 3).judge(2.9, True) is False
    assert ds.Target("==", 0, any_device=True).judge(0, on_cuda=False) is True
    assert ds.Target("==", True, any_device=True).text() == "= true"


def test_nan_figures_become_null_with_a_note(tmp_path):
    s = _suite(tmp_path)
    s.record("peak", float("nan"), unit="MiB")
    assert s.figures["peak"]["value"] is None and s.figures["peak"]["note"]


def test_parse_junit(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_gpu" name="test_a" time="0.1"/>'
        '<testcase classname="tests.test_gpu_speed" name="test_b[pgd]">'
        '<failure message="RuntimeError: called a synchronizing CUDA operation">tb</failure>'
        '</testcase>'
        '<testcase classname="tests.m.test_c" name="test_c"><skipped message="needs CUDA"/>'
        '</testcase></testsuite></testsuites>')
    assert ds.parse_junit(xml) == [
        ("tests/test_gpu.py::test_a", "passed", ""),
        ("tests/test_gpu_speed.py::test_b[pgd]", "failed",
         "RuntimeError: called a synchronizing CUDA operation"),
        ("tests/m/test_c.py::test_c", "skipped", "needs CUDA")]


def test_flop_counter_matches_the_closed_form():
    """2 FLOPs per multiply-add of every convolution and linear layer, nothing else counted."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    x = torch.zeros(4, 3, 10, 10)
    conv1 = 2 * (8 * 10 * 10) * (3 * 3 * 3)  # outputs × multiply-adds per output
    conv2 = 2 * (8 * 5 * 5) * (8 // 2 * 3 * 3)  # grouped: each output sees 4 input channels
    fc = 2 * 10 * (8 * 5 * 5)
    total, first = forward_flops(net, x)
    assert (total, first) == (4 * (conv1 + conv2 + fc), 4 * conv1)
    # PGD-k step: k attack forward+backward-to-input, then forward + full backward except the
    # first layer's input gradient
    k = 10
    assert pgd_step_flops(total, first, k) == k * 2 * total + 3 * total - first


def test_cifar_splits_from_the_test_set_file(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(10), 5).astype(np.int64)  # ordered by class, as the shared file
    np.savez(tmp_path / "cifar10_jpegq75_test.npz", x_test=x, y_test=y)
    assert ds.find_cifar(tmp_path) == tmp_path / "cifar10_jpegq75_test.npz"
    assert ds.find_cifar(tmp_path / "nothing") is None
    train, test = ds.cifar_splits(ds.find_cifar(tmp_path), n_test=10)
    assert train.x.shape == (40, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    assert train.x.dtype == torch.uint8
    # a permutation of the file: disjoint, complete, labels kept with their images
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    seen = sorted(int((nchw == im).flatten(1).all(1).nonzero()) for im in
                  torch.cat([train.x, test.x]))
    assert seen == list(range(50))
    for im, lab in zip(test.x, test.y, strict=True):
        i = int((nchw == im).flatten(1).all(1).nonzero())
        assert lab == int(y[i])
    assert len(set(test.y.tolist())) > 1  # not the first class only
