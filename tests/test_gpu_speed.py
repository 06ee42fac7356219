"""On a GPU: the training step, the PGD loop and the loader never make the host wait.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call (``.item()``,
pageable copies, ``nonzero``...) into an error, so these tests fail if one creeps into the inner
loop. Skipped without CUDA; ``python -m bench.device_suite`` runs them (step 2, "gpu_tests").
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from robust_amo.attacks import PGD
from robust_amo.config import TrainConfig
from robust_amo.data import Examples, Loader
from robust_amo.methods import build_objective
from robust_amo.models import create_model
from robust_amo.runtime import autocast
from robust_amo.train import make_optimizer, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@contextlib.contextmanager
def _no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pgd_attack_loop_has_no_host_sync():
    """The training attack alone (random start from a CPU generator, K steps, projection)."""
    device = torch.device("cuda")
    net = create_model("tiny-wrn", 10, input_shape=(3, 16, 16)).to(device).eval()
    attack = PGD(net, 8 / 255, 2 / 255, 5, generator=torch.Generator().manual_seed(0))
    x = torch.rand(16, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    attack(x, y)  # warm-up
    with _no_host_sync():
        x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("method", ["pgd", "robust-amo"])
def test_train_step_has_no_host_sync(method):
    device = torch.device("cuda")
    cfg = TrainConfig(arch="tiny-cnn", method=method, batch_size=32)
    net = create_model("tiny-cnn", 10, input_shape=(3, 32, 32), mean=(0.5,) * 3,
                       std=(0.25,) * 3).to(device).to(memory_format=torch.channels_last)
    attack = PGD(net, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(0))
    objective = build_objective(cfg, attack)
    optimizer = make_optimizer(net, cfg, device)
    g = torch.Generator().manual_seed(0)
    split = Examples(torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (96,), generator=g))
    batches = iter(Loader(split, 32, device, shuffle=True, augment=True, drop_last=True))
    x, y = next(batches)  # the epoch's index copy happens once, before the loop
    train_step(net, objective, optimizer, x, y, lambda: autocast(device, True))  # warm-up
    with _no_host_sync():
        x, y = next(batches)
        for _ in range(2):
            loss, _ = train_step(net, objective, optimizer,
                                 x.contiguous(memory_format=torch.channels_last), y,
                                 lambda: autocast(device, True))
    assert torch.isfinite(loss)
