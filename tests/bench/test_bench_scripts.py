"""The method, margin, plugin and evaluation-agreement benchmarks run on the CPU (tiny settings).

Like tests/bench/test_bench_smoke.py for the speed benchmarks: only the code paths and the output
format are checked, so a script that rots fails here. The scripts run in this process as the
modules ``bench.<name>`` (runpy), as ``python -m bench.<name>`` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys

import pytest
import torch

from bench import equivalence, step_cost
from robust_amo.models import create_model
from robust_amo.perturb import perturb
from tests.helpers import ROOT

BENCH = ROOT / "bench"
# bench.device_suite imports the benchmark modules; runpy then warns that it runs a fresh copy
# of one already imported, which is what it should do here
pytestmark = pytest.mark.filterwarnings("ignore:'bench.*' found in sys.modules:RuntimeWarning")


@pytest.fixture
def run_script(monkeypatch, capsys, _single_thread):
    def run(module: str, *args: str) -> list[str]:
        monkeypatch.setattr(sys, "argv", [str(BENCH / f"{module}.py"), *args])
        runpy.run_module(f"bench.{module}", run_name="__main__")
        return capsys.readouterr().out.strip().splitlines()

    return run


def test_step_cost(run_script):
    lines = run_script("step_cost", "--arch", "tiny-cnn", "--shape", "1,8,8", "--batch", "8",
                       "--pgd-steps", "2", "--steps", "1", "--rounds", "1", "--threads", "1",
                       "--device", "cpu", "--hook", "both")
    ratios = [ln for ln in lines if "fused hook / reference hook" in ln]
    assert [ln.split(":")[0] for ln in ratios] == ["robust-amo", "amo"]
    assert all(float(ln.rsplit(":", 1)[1]) > 0 for ln in ratios)
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln not in ratios}
    # the reference-hook rows make the same passes and build the same graph in float32
    assert rows["robust-amo-refhook"][1:3] == rows["robust-amo"][1:3]
    assert rows["robust-amo-refhook"][6] == rows["robust-amo"][6]
    assert {"standard", "pgd", "robust-amo", "amo", "jacobian-lm"} <= set(rows)
    # robust AMO makes exactly PGD training's forward and backward passes; the ratio column to
    # pgd is 1 on the pgd row
    assert rows["robust-amo"][1:3] == rows["pgd"][1:3] == ["3", "3"]
    assert float(rows["pgd"][4]) == 1.0


def test_step_cost_counts_the_baselines_passes(run_script):
    """K = 2 attack steps: fgsm-rs and n-fgsm make 2 + 2; mart K + 2 forwards (its attack, the
    adversarial and the clean branch) and K + 2 backwards (the training backward reaches both
    branches); trades one forward more (f(x) for its attack); awp on pgd one forward and one
    backward more than pgd (the weight ascent)."""
    lines = run_script("step_cost", "--arch", "tiny-cnn", "--shape", "1,8,8", "--batch", "8",
                       "--pgd-steps", "2", "--steps", "1", "--rounds", "1", "--threads", "1",
                       "--device", "cpu", "--methods", "pgd,trades,mart,awp,fgsm-rs,n-fgsm")
    rows = {ln.split()[0]: ln.split()[1:3] for ln in lines[2:]}
    assert rows == {"pgd": ["3", "3"], "trades": ["5", "4"], "mart": ["4", "4"],
                    "awp": ["4", "4"], "fgsm-rs": ["2", "2"], "n-fgsm": ["2", "2"]}


def test_bench_margins(run_script):
    lines = run_script("bench_margins", "--arch", "tiny-cnn", "--batch", "4", "--iters", "1",
                       "--threads", "1")
    gram = next(ln for ln in lines if ln.startswith("gram"))
    assert float(gram.rsplit(" ", 1)[1]) < 1e-4  # exact up to float rounding


def test_robustness_plugin_step(run_script):
    lines = run_script("robustness_plugin_step", "--arch", "tiny-cnn", "--dataset", "digits",
                       "--batch-size", "8", "--steps", "2", "--repeats", "1", "--device", "cpu")
    assert lines[-1].startswith("plugin, eta_delta=0") and "x1.00" in lines[-1]


def test_eval_agreement(run_script, tmp_path):
    from robust_amo.resolve import resolve
    from robust_amo.train import train

    train(resolve(None, [{"arch": "tiny-cnn", "dataset": "digits", "method": "standard",
                          "epochs": 1, "batch_size": 64, "out": str(tmp_path),
                          "data": {"augment": False}, "eval": {"n_examples": 16, "steps": 0},
                          "attack": {"eps": 0.1, "step_size": 0.025}}]))
    lines = run_script("eval_agreement", "--checkpoint", str(tmp_path), "--n-examples", "16",
                       "--steps", "2", "--restarts", "2", "--repeats", "1", "--device", "cpu")
    table = [ln for ln in lines if ln.startswith("| ")]
    methods = [ln.split("|")[1].strip() for ln in table[1:]]
    assert methods[0] == "robust-amo (ours)"
    if importlib.util.find_spec("torchattacks") is not None:
        assert any("torchattacks" in m for m in methods)
    else:  # an optional peer: the table still has robustness's rows and says torchattacks is absent
        assert {"robustness AttackerModel", "robustness, restarts looped here"} <= set(methods)
        assert any("torchattacks: not installed" in ln for ln in table)


@pytest.mark.slow
def test_equivalence_of_this_tree_with_itself(tmp_path):
    """bench.equivalence drives both trees through their CLIs: it must keep working on this
    one (both sides this tree: every check passes, and a difference would be a nondeterminism)."""
    rc = equivalence.main(["--old", str(ROOT), "--work", str(tmp_path)])
    assert rc == 0


def test_step_cost_bf16_deltas_halve_the_delta_bytes_of_the_graph(_single_thread):
    """Under bf16 autocast robust AMO's largest graph holds its δ's in bf16: exactly 2 bytes per
    δ element less than the float32-δ row of the same run (docs/benchmarks.md, "Robust AMO's
    memory")."""
    s = step_cost.Settings(arch="tiny-wrn", shape=(3, 8, 8), batch=4, pgd_steps=1, steps=1,
                           rounds=1, methods=["pgd", "robust-amo", "robust-amo-f32delta"],
                           device="cpu", cpu_bf16=True)
    rows = {r["method"]: r for r in step_cost.measure(s)["results"]}
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8))
    with perturb(model) as p:
        model(torch.rand(4, 3, 8, 8))
        numel = sum(d.numel() for d in p.deltas)
    saved = (rows["robust-amo-f32delta"]["graph_mib"] - rows["robust-amo"]["graph_mib"]) * 2**20
    assert saved == 2 * numel
    assert rows["pgd"]["graph_mib"] < rows["robust-amo"]["graph_mib"]
    # the δ bytes and the floor they make: 2 bytes per element in bf16, 4 in float32, and the
    # graph of every perturbed step holds at least pgd's tensors and every δ
    assert rows["robust-amo"]["delta_mib"] * 2**20 == 2 * numel
    assert rows["robust-amo-f32delta"]["delta_mib"] * 2**20 == 4 * numel
    assert math.isnan(rows["pgd"]["delta_mib"]) and math.isnan(rows["pgd"]["floor_vs_pgd"])
    for m in ("robust-amo", "robust-amo-f32delta"):
        pgd = rows["pgd"]["graph_mib"]
        assert rows[m]["floor_vs_pgd"] == pytest.approx((pgd + rows[m]["delta_mib"]) / pgd)
        assert rows[m]["graph_vs_pgd"] >= rows[m]["floor_vs_pgd"]


def test_step_cost_compiled_hook_rows_make_the_same_passes_and_graph(monkeypatch, _single_thread):
    """The ``--hook compiled`` rows run the points' torch.compile kernels (here the quick
    aot_eager backend) and change neither the passes nor a byte of the graph; the ``-noarith``
    row makes the same passes with identity points."""
    import functools

    from robust_amo import perturb as perturb_mod

    monkeypatch.setattr(perturb_mod, "_KERNELS", {})
    compiled_hook_on = functools.partial(perturb_mod.compiled_hook, True, backend="aot_eager")
    s = step_cost.Settings(arch="tiny-wrn", shape=(3, 8, 8), batch=4, pgd_steps=2, steps=1,
                           rounds=1, methods=["pgd", "robust-amo", "robust-amo-compiled", "amo",
                                              "amo-compiled"], device="cpu", cpu_bf16=True,
                           hook_backend="aot_eager")
    s.methods.append("robust-amo-noarith")
    rows = {r["method"]: r for r in step_cost.measure(s)["results"]}
    assert set(perturb_mod._KERNELS["aot_eager"]) == {"forward", "backward", "delta_step"}
    for m in ("robust-amo", "amo"):
        c = rows[f"{m}-compiled"]
        assert (c["forward"], c["backward"]) == (rows[m]["forward"], rows[m]["backward"])
        assert c["graph_mib"] == rows[m]["graph_mib"] and c["s_per_step"] > 0
    # the diagnostic row makes the same passes with the points' arithmetic gone: a nonzero δ
    # leaves the forward the plain one, ∇h = g, ∇δ = δ; and the patch is undone afterwards
    na = rows["robust-amo-noarith"]
    assert (na["forward"], na["backward"]) == (rows["robust-amo"]["forward"],
                                               rows["robust-amo"]["backward"])
    model = create_model("tiny-wrn", 10, input_shape=(3, 8, 8)).eval()
    x = torch.rand(2, 3, 8, 8)
    with perturb(model) as p:
        model(x)
    deltas = [torch.randn_like(d).requires_grad_(True) for d in p.deltas]
    with step_cost.identity_points(), compiled_hook_on(), perturb(model, deltas) as p:
        out = model(x)
        grads = torch.autograd.grad(out.sum(), deltas)
    assert torch.equal(out, model(x))
    assert all(torch.equal(g, d) for g, d in zip(grads, deltas, strict=True))
    with compiled_hook_on(), perturb(model, deltas):
        assert not torch.equal(model(x), out)


def test_fast_eval_bench_reuses_autoattack_from_its_cache(run_script, tmp_path, monkeypatch):
    """The table has a row per fast variant, the counts add up, and a second run meets the
    cached AutoAttack result instead of attacking again."""
    from bench import fast_eval
    from robust_amo.train import train
    from tests.helpers import tiny_run

    train(tiny_run(tmp_path / "run", method="standard", epochs=1))
    args = ("--checkpoint", str(tmp_path / "run"), "--n-examples", "12", "--variants", "t1",
            "t2-malt", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "a.json"))
    first = [ln for ln in run_script("fast_eval", *args) if ln.startswith("| ")][1:]
    assert [ln.split("|")[5].strip() for ln in first] == ["t1", "t2-malt"]
    assert len(list((tmp_path / "cache").glob("aa-*.pt"))) == 1
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    aa = rows[0]["autoattack"]
    for f in rows[0]["fast"].values():
        assert f["aa_only"] == len(f["aa_only_by"]) == len(f["aa_only_examples"])
        assert f["robust"] - f["aa_only"] + f["fast_only"] == aa["robust"]

    def no_attack(*a, **k):
        raise AssertionError("AutoAttack ran again despite the cache")

    monkeypatch.setattr(fast_eval, "autoattack_robust", no_attack)
    again = [ln for ln in run_script("fast_eval", *args[:-2]) if ln.startswith("| ")][1:]
    assert [ln.split("|")[4] for ln in again] == [ln.split("|")[4] for ln in first]


def test_fast_eval_bench_names_the_attack_that_broke_each_example_first():
    from bench.fast_eval import first_breaker, parse_variant

    clean = torch.tensor([True, True, True, False, True])
    after = {"apgd-ce": torch.tensor([False, True, True, False, True]),
             "apgd-t": torch.tensor([False, True, False, False, True]),
             "square": torch.tensor([False, False, False, False, True])}
    assert first_breaker(after, clean) == ["apgd-ce", "square", "apgd-t", "", ""]
    assert parse_variant("t4-malt", 0.1).rank == "malt"
    assert parse_variant("t2-x0", 0.1).clean_start
    with pytest.raises(SystemExit, match=r"tN\[-malt\]\[-x0\]"):
        parse_variant("malt", 0.1)
