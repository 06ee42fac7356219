"""torch.compile as a training option: same numbers as eager, hooks honoured, clean fallback.

The CPU tests compile with the ``aot_eager`` backend (seconds instead of inductor's C++ build);
it goes through dynamo and AOTAutograd, which is where hooks are dropped and double backward
fails, so the behaviour checked here is the one inductor shows on the GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from robust_amo import train as train_module
from robust_amo.checkpoint import model_state
from robust_amo.compiled import CompiledModel, has_hooks, probe
from robust_amo.models import create_model
from robust_amo.perturb import compiled_hook_backend, perturb
from robust_amo.resolve import resolve
from robust_amo.train import train

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_forward_honours_perturbation_hooks():
    torch.manual_seed(0)
    net = create_model("tiny-cnn", 10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.3,))
    cm = CompiledModel(net, backend=BACKEND)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(cm(x), net(x))
    assert not has_hooks(net)
    outs = []
    for model in (net, cm):
        with perturb(model) as p:
            model(x)  # creates the zero deltas
            p.deltas = [torch.full_like(d, 0.2) for d in p.deltas]
            outs.append(model(x))
    # a nonzero delta changes the output, and the compiled wrapper applies it like eager does
    assert (outs[0] - net(x)).abs().max() > 1e-3
    torch.testing.assert_close(outs[1], outs[0])
    assert not has_hooks(net)


def _input_gradient_penalty(model, x, y):
    """A double-backprop objective (Jacobian-regularizer style): CE + ||d CE / dx||^2."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + g.pow(2).sum(), logits


def test_probe_falls_back_on_double_backward(caplog):
    torch.manual_seed(0)
    # BatchNorm: its running statistics must survive the probe's forward
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cm = CompiledModel(net, backend=BACKEND)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="robust_amo.compiled"):
        assert probe(cm, _input_gradient_penalty, x, y, torch.enable_grad) is False
    assert not cm.enabled
    assert "training without compilation" in caplog.text and "double backward" in caplog.text
    # the probe leaves no trace: BatchNorm statistics, weights, gradients, global RNG
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # and the disabled wrapper now trains eagerly, double backward included
    loss, _ = _input_gradient_penalty(cm, x, y)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_train_with_compile_matches_eager(tmp_path, caplog):
    def run(compile_: bool):
        cfg = resolve(None, [{
            "arch": "tiny-mlp", "dataset": "digits", "method": "pgd", "epochs": 1,
            "batch_size": 32, "device": "cpu", "out": str(tmp_path / f"c{int(compile_)}"),
            "compile": compile_, "compile_backend": BACKEND,
            "data": {"train_subset": 96, "augment": False, "val_size": 32},
            "attack": {"eps": 0.1, "step_size": 0.03, "steps": 1, "random_start": False},
            "eval": {"n_examples": 32, "batch_size": 32, "steps": 1},
        }])
        return train(cfg)

    with caplog.at_level(logging.INFO, logger="robust_amo.compiled"):
        compiled = run(True)
    assert "compiled training step works" in caplog.text
    eager = run(False)
    a = torch.load(tmp_path / "c1" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "c0" / "checkpoint.pt", weights_only=False)
    a, b = model_state(a), model_state(b)
    assert a.keys() == b.keys()  # plain keys, no wrapper prefixes
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert compiled["clean_acc"] == eager["clean_acc"]


@pytest.mark.parametrize("compile_", [True, False])
def test_train_with_compile_compiles_the_delta_points(tmp_path, monkeypatch, compile_):
    """With compile on, every training step runs under ``compiled_hook`` of the run's backend
    (the model itself runs eagerly under δ hooks); without, the points stay eager."""
    seen = []
    step = train_module.train_step

    def spy(*args, **kwargs):
        seen.append(compiled_hook_backend())
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    cfg = resolve(None, [{
        "arch": "tiny-cnn", "dataset": "digits", "method": "robust-amo", "epochs": 1,
        "batch_size": 32, "device": "cpu", "out": str(tmp_path / "r"), "compile": compile_,
        "compile_backend": BACKEND, "method_args": {"eta_delta": 0.01},
        "data": {"train_subset": 64, "augment": False, "val_size": 16},
        "attack": {"eps": 0.1, "step_size": 0.03, "steps": 1},
        "eval": {"n_examples": 16, "batch_size": 16, "steps": 1},
    }])
    train(cfg)
    assert seen and set(seen) == {BACKEND if compile_ else None}
