import json
import math

import pytest
import torch

from robust_amo import CheckpointError
from robust_amo import checkpoint as ckpt_io
from robust_amo.resolve import resolve
from robust_amo.train import lr_lambda, train
from tests.helpers import tiny_run


def _cfg(out, **kw):
    base = {"epochs": 3, "data": {"train_subset": 900}, "optim": {"lr": 0.1},
            "eval": {"n_examples": 64}}
    return tiny_run(out, **{**base, **kw})


def test_training_lowers_the_loss_and_writes_a_run(tmp_path):
    metrics = train(_cfg(tmp_path, epochs=4))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] - 0.3
    assert metrics["clean_acc"] > 0.5 and 0 <= metrics["robust_acc"] <= metrics["clean_acc"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "best.pt").is_file()
    ck = ckpt_io.load_checkpoint(tmp_path)
    assert ck["epoch"] == 4 and ck["config"]["arch"] == "tiny-cnn" and ck["arch"] == "tiny-cnn"
    assert {"model", "optimizer", "scheduler", "rng", "best_robust_acc"} <= set(ck)
    model = ckpt_io.model_from_checkpoint(ck)
    assert not model.training


class Killed(Exception):
    pass


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    # augmentation on, so the resumed epochs must replay the same crops, flips and starts
    data = {"augment": True, "train_subset": 300}
    full = tmp_path / "full"
    train(_cfg(full, data=data))

    def kill_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        train(_cfg(part, data=data), callbacks=[kill_after_first_epoch])
    assert ckpt_io.load_checkpoint(part)["epoch"] == 1
    torch.manual_seed(1234)  # a resumed process starts with another global RNG state
    train(_cfg(part, data=data), resume=True)

    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(part)
    for k in ckpt_io.model_state(a):
        assert torch.equal(ckpt_io.model_state(a)[k], ckpt_io.model_state(b)[k]), k
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_resume_refuses_a_different_run(tmp_path):
    first = train(_cfg(tmp_path, epochs=1))
    # resuming a finished run trains nothing and still returns its last epoch's metrics
    assert train(_cfg(tmp_path, epochs=1), resume=True) == first
    with pytest.raises(CheckpointError, match="arch"):
        train(_cfg(tmp_path, epochs=2, arch="tiny-mlp"), resume=True)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "version": 1, "epoch": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt_io.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_truncated_or_foreign_checkpoint_gives_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "version": 1, "w": torch.ones(1000)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt_io.load_checkpoint(bad)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a robust-amo checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "missing")


def test_schedules():
    cfg = resolve(None, [{"epochs": 10, "optim": {"schedule": "multistep", "milestones": [2, 5],
                                                  "gamma": [0.1, 0.5]}}])
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == 1.0 and f(19) == 1.0 and f(20) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.05)
    cfg = resolve(None, [{"epochs": 10, "optim": {"schedule": "cosine", "warmup_epochs": 1}}])
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0)


class _WrongOnlyAtClean(torch.nn.Module):
    """Misclassifies the all-zero image (class 1 wins) and is right (class 0) on any image with
    a non-zero pixel, with zero input gradient: PGD never moves off its random start."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # evaluate() reads the device here

    def forward(self, x):
        nonzero = (x.detach() != 0).flatten(1).float().sum(1)
        z0 = nonzero + 0 * x.flatten(1).sum(1)
        return torch.stack([z0, torch.full_like(z0, 0.5)], 1)


def test_evaluate_counts_robust_only_where_clean_is_correct():
    from robust_amo.attacks import PGD
    from robust_amo.train import evaluate

    model = _WrongOnlyAtClean()
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    attack = PGD(model, 0.1, 0.02, 3, early_stop=True)
    m = evaluate(model, [(x, y)], attack)
    # the random start is classified correctly, the clean point is not: not robust
    assert m["clean_acc"] == 0.0
    assert m["robust_acc"] == 0.0


def test_rng_state_touches_only_this_process_gpu(monkeypatch):
    """Under torchrun each rank drives one GPU: saving or restoring the CUDA RNG must not create
    contexts on every GPU of the node, and a checkpoint written on a node with more GPUs must
    resume on one with fewer."""
    calls = []

    def every_gpu(*args):
        raise AssertionError("touches every GPU of the node")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda *a: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: calls.append(s.tolist()))
    state = ckpt_io.rng_state()
    ckpt_io.set_rng_state(state)
    # a version-2 checkpoint written on an 8-GPU node holds 8 states: this process's is restored
    ckpt_io.set_rng_state({**state, "cuda": [torch.tensor([i], dtype=torch.uint8)
                                             for i in range(8)]})
    assert calls == [[7], [0]]


def test_no_evaluation_examples_means_no_best_checkpoint(tmp_path):
    """eval.n_examples: 0 measures nothing: NaN accuracies, so best.pt is never chosen by a 0."""
    metrics = train(_cfg(tmp_path, epochs=1, eval={"n_examples": 0}))
    assert metrics["n"] == 0 and math.isnan(metrics["robust_acc"])
    assert not (tmp_path / "best.pt").exists()
