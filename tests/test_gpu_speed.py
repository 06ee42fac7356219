"""On a GPU: the PGD training step and the loader never make the host wait for the device.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call (``.item()``,
pageable copies, ``nonzero``...) into an error, so these tests fail if one creeps into the inner
loop. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from robust_amo.attacks import PGD
from robust_amo.config import TrainConfig
from robust_amo.data import Loader, Split
from robust_amo.methods import build_objective
from robust_amo.models import create_model
from robust_amo.runtime import autocast
from robust_amo.train import make_optimizer, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pgd_train_step_has_no_host_sync():
    device = torch.device("cuda")
    cfg = TrainConfig(arch="tiny-cnn", method="pgd", batch_size=32)
    net = create_model("tiny-cnn", 10, input_shape=(3, 32, 32), mean=(0.5,) * 3,
                       std=(0.25,) * 3).to(device).to(memory_format=torch.channels_last)
    attack = PGD(net, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(0))
    objective = build_objective(cfg, attack)
    optimizer = make_optimizer(net, cfg, device)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (96,), generator=g))
    batches = iter(Loader(split, 32, device, shuffle=True, augment=True, drop_last=True))
    x, y = next(batches)  # the epoch's index copy happens once, before the loop
    train_step(net, objective, optimizer, x, y, lambda: autocast(device, True))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = next(batches)
        for _ in range(2):
            loss, _ = train_step(net, objective, optimizer,
                                 x.contiguous(memory_format=torch.channels_last), y,
                                 lambda: autocast(device, True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
