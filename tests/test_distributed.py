"""Data-parallel training and evaluation on the CPU: 2 gloo processes vs one process.

One module-scoped fixture spawns the two ranks once (the expensive part) and runs every
scenario in them; the tests then compare files. Model without BatchNorm (tiny-mlp), PGD training
without random start, augmentation on: everything is deterministic, so the distributed run must
match the single-process run with the same global batch up to float summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from robust_amo import distributed
from robust_amo.checkpoint import load_checkpoint, model_state
from robust_amo.cli import main as cli_main
from robust_amo.config import ConfigError, TrainConfig, from_dict, validate
from robust_amo.data import Examples, Loader, augment
from robust_amo.train import train

WORLD = 2
TIMEOUT_S = 240


def _start_method() -> str:
    """fork where safe: it shares this process's imported torch/sklearn with the workers (spawn
    imports them again, most of the cost on a small CI machine); a forked child cannot use CUDA
    once this process has initialised it, so then spawn."""
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


# methods whose per-example δ step depends on the batch size (merged from the methods work);
# under DDP they must scale by the global batch (robust_amo.distributed.global_batch); awp's
# weight ascent must use the global batch's gradient (averaged over the ranks)
DELTA_METHODS = {"robust-amo": {}, "amo": {"steps": 2, "eta_p": 0.5}, "awp": {"gamma": 0.02}}


def _delta_methods() -> dict:
    from robust_amo.methods import METHODS as OBJECTIVES

    return {m: a for m, a in DELTA_METHODS.items() if m in OBJECTIVES}


def _method_cfg(out: Path, method: str) -> dict:
    return {**_cfg(out, 1), "method": method, "method_args": _delta_methods()[method]}


def _cfg(out: Path, epochs: int) -> dict:
    return {
        "arch": "tiny-mlp", "dataset": "digits", "method": "pgd", "epochs": epochs,
        "batch_size": 64, "seed": 3, "device": "cpu", "out": str(out),
        "data": {"train_subset": 256, "augment": True, "val_size": 50},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "attack": {"eps": 0.1, "step_size": 0.03, "steps": 2, "random_start": False},
        "eval": {"n_examples": 50, "batch_size": 16, "steps": 3},
    }


def _train_single(cfg_dict: dict, resume: bool = False) -> None:
    cfg = from_dict(TrainConfig, cfg_dict)
    validate(cfg)
    train(cfg, resume=resume)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker():
    """tests/_dist_worker.py as a module (a spawned child imports it by this name)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import _dist_worker
    finally:
        sys.path.pop(0)
    return _dist_worker


def _spawn(job: dict) -> None:
    """Run tests/_dist_worker.run on WORLD spawned processes; fail (not hang) on error."""
    import torch.multiprocessing as mp

    _dist_worker = _worker()
    for k in distributed.ENV_VARS:
        assert k not in os.environ, "run the tests outside torchrun"
    ctx = mp.start_processes(_dist_worker.run, args=(WORLD, _free_port(), job), nprocs=WORLD,
                             join=False, start_method=_start_method())
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single, two, mixed = root / "single", root / "two_ranks", root / "one_then_two"
    _train_single(_cfg(single, 1))
    shutil.copytree(single, mixed)
    single_epoch1 = load_checkpoint(single)
    eval_argv = ["eval", "--checkpoint", str(mixed / "epoch1.pt"), "--attack", "pgd3",
                 "--restarts", "2", "--eps", "0.1", "--n-examples", "45", "--batch-size", "8",
                 "--device", "cpu", "--no-progress", "--no-sanity"]
    shutil.copy(mixed / "checkpoint.pt", mixed / "epoch1.pt")
    methods = _delta_methods()
    for m in methods:
        _train_single(_method_cfg(root / f"{m}-one", m))
    _spawn({"out": str(root), "train": [(_cfg(two, 1), False), (_cfg(mixed, 2), True)]
            + [(_method_cfg(root / f"{m}-two", m), False) for m in methods],
            "eval": [eval_argv + ["--out", str(root / "eval_two" / "report.json")]],
            "masks": str(mixed / "epoch1.pt")})
    assert cli_main(eval_argv + ["--out", str(root / "eval_one" / "report.json")]) == 0
    two_epoch1 = load_checkpoint(two)
    _train_single(_cfg(single, 2), resume=True)  # the reference: one process throughout
    _train_single(_cfg(two, 2), resume=True)  # 2 ranks for epoch 1, then 1 rank
    return {"root": root, "single1": single_epoch1, "two1": two_epoch1,
            "single2": load_checkpoint(single), "two_then_one": load_checkpoint(two),
            "one_then_two": load_checkpoint(mixed), "two_dir": two, "single_dir": single}


def test_distributed_eval_equals_single_process(runs):
    root = runs["root"]
    single = _worker().eval_masks(str(root / "one_then_two" / "epoch1.pt"))
    saved = [torch.load(root / f"masks_rank{r}.pt") for r in range(WORLD)]
    ranks = [d["masks"] for d in saved]
    # the work was split: rank r attacked chunks r, r+2, r+4 of every attack, and only those
    for r in range(WORLD):
        assert saved[r]["chunks"] == [(a, c) for a in ("clean", "pgd3", "pgd4")
                                      for c in range(r, 6, WORLD)]
    assert set(single) == set(ranks[0]) == set(ranks[1])
    assert "pgd3/restart 2" in single
    for k, v in single.items():
        assert v.dtype == torch.bool and len(v) == 45, k
        for r in range(WORLD):
            assert torch.equal(ranks[r][k], v), (k, r)
    # the masks are not trivial: the attack breaks some examples and not others
    assert 0 < int(single["pgd3/robust"].sum()) < int(single["pgd3/clean"].sum())
    one = json.loads((root / "eval_one" / "report.json").read_text())
    two = json.loads((root / "eval_two" / "report.json").read_text())
    assert _strip_timing(two["attacks"]) == _strip_timing(one["attacks"])
    assert not list((root / "eval_two").glob("*.state*"))  # per-rank state files cleaned up


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if "time" not in k}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _assert_weights_close(a: dict, b: dict) -> None:
    a, b = model_state(a), model_state(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_weights_match_single_process(runs):
    assert runs["two1"]["epoch"] == runs["single1"]["epoch"] == 1
    _assert_weights_close(runs["two1"], runs["single1"])
    # the run did move the weights: equal weights are not vacuous
    moved = (model_state(runs["single1"])["classifier.weight"]
             - model_state(runs["single2"])["classifier.weight"]).abs().max()
    assert moved > 1e-3


def test_metrics_reduced_across_ranks(runs):
    two = [json.loads(s) for s in (runs["two_dir"] / "metrics.jsonl").read_text().splitlines()]
    one = runs["single1"]["metrics"]
    assert [m["epoch"] for m in two] == [1, 2]  # rank 0 alone wrote epoch 1 (then 1 rank)
    m = two[0]
    assert m["n"] == one["n"] == 50
    assert m["clean_acc"] == one["clean_acc"]
    assert m["robust_acc"] == one["robust_acc"]
    assert m["train_acc"] == one["train_acc"]
    assert m["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)


def test_resume_with_fewer_ranks(runs):
    _assert_weights_close(runs["two_then_one"], runs["single2"])


def test_resume_with_more_ranks(runs):
    assert runs["one_then_two"]["epoch"] == 2
    _assert_weights_close(runs["one_then_two"], runs["single2"])
    _assert_weights_close(runs["one_then_two"], runs["two_then_one"])


@pytest.mark.parametrize("method", sorted(DELTA_METHODS))
def test_ddp_delta_methods_match_single_process(runs, method):
    if method not in _delta_methods():
        pytest.skip(f"method {method} is not registered in this checkout")
    _assert_weights_close(load_checkpoint(runs["root"] / f"{method}-two"),
                          load_checkpoint(runs["root"] / f"{method}-one"))


def test_sharding_helpers_in_a_group(runs):
    n = 23
    for r in range(WORLD):
        got = json.loads((runs["root"] / f"helpers_rank{r}.json").read_text())
        assert got["values"] == [3 * i + 1 for i in range(n)]
        assert got["mask"] == [i % 3 == 0 for i in range(n)]
        assert got["count"] == n
        assert got["mask_dtype"] == "torch.bool"


# ---- single-process checks of the pieces (no processes spawned) ----

@pytest.mark.parametrize("n,b,world", [(23, 4, 2), (8, 4, 2), (5, 8, 3), (0, 4, 2), (17, 1, 4)])
def test_shard_batches_partition(n, b, world):
    shards = [distributed.shard_batches(n, b, r, world) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    for r, s in enumerate(shards):
        batches = [torch.arange(i * b, min((i + 1) * b, n))
                   for i in distributed.batch_ids(n, b, r, world)]
        expect = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
        assert torch.equal(s, expect)


def test_loader_shards_are_the_global_batches():
    g = torch.Generator().manual_seed(0)
    split = Examples(torch.randint(0, 256, (37, 1, 6, 6), generator=g, dtype=torch.uint8),
                  torch.arange(37))
    whole = Loader(split, 12, shuffle=True, augment=True, seed=5, drop_last=True)
    parts = [Loader(split, 6, shuffle=True, augment=True, seed=5, drop_last=True, rank=r,
                    world_size=2) for r in range(2)]
    for loader in (whole, *parts):
        loader.set_epoch(3)
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
        # rank r holds positions r, r+2, ... of the global batch, augmented identically
        assert torch.equal(yw[0::2], y0) and torch.equal(yw[1::2], y1)
        assert torch.equal(xw[0::2], x0) and torch.equal(xw[1::2], x1)


def test_augment_share_matches_global_draw():
    x = torch.rand(8, 3, 5, 5)
    full = augment(x, torch.Generator().manual_seed(1), pad=2)
    part = augment(x[1::2], torch.Generator().manual_seed(1), pad=2, rank=1, world_size=2)
    assert torch.equal(full[1::2], part)


def test_env_context(monkeypatch):
    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_context() == distributed.DistContext(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.env_context()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_context() == distributed.DistContext(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="integers"):
        distributed.env_context()


def test_global_batch_must_divide():
    ctx = distributed.DistContext(0, 3, 0)
    assert distributed.per_rank_batch(96, ctx) == 32
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        distributed.per_rank_batch(128, ctx)


def test_single_process_helpers_are_identity():
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    idx = torch.tensor([2, 0])
    assert distributed.assemble(torch.tensor([True, False]), idx, 3).tolist() == [False, False,
                                                                                True]
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net, distributed.DistContext(), torch.device("cpu")) is net
    assert distributed.global_batch(16) == 16
