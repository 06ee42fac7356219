"""CUDA checks: skipped without a GPU (conftest marks them)."""

import pytest
import torch

from robust_amo import create_model
from robust_amo.attacks import PGD
from robust_amo.resolve import resolve
from robust_amo.train import train

pytestmark = pytest.mark.gpu


def test_pgd_same_on_cpu_and_cuda():
    torch.manual_seed(0)
    model = create_model("tiny-cnn", input_shape=(1, 8, 8)).eval().double()
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    cpu = PGD(model, eps=0.1, step_size=0.02, steps=5, generator=torch.Generator().manual_seed(3))
    a = cpu(x, y)
    model_cuda = model.cuda()
    gpu = PGD(model_cuda, eps=0.1, step_size=0.02, steps=5,
              generator=torch.Generator().manual_seed(3))
    b = gpu(x.cuda(), y.cuda())
    assert b.device.type == "cuda"
    torch.testing.assert_close(a, b.cpu(), atol=1e-6, rtol=0)


def test_bf16_channels_last_training_runs(tmp_path):
    cfg = resolve(None, [{"arch": "tiny-wrn", "dataset": "digits", "method": "pgd", "epochs": 2,
                          "batch_size": 128, "device": "cuda", "out": str(tmp_path),
                          "model_kwargs": {}, "data": {"augment": False},
                          "optim": {"lr": 0.05}, "eval": {"n_examples": 128}}])
    # digits are 1x8x8: a WRN stem accepts any channel count and size
    m = train(cfg)
    assert m["train_loss"] < 2.3 and m["clean_acc"] > 0.3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_with_a_cuda_generator(norm):
    from robust_amo.attacks import random_start

    x = torch.rand(4, 1, 8, 8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = random_start(x, 0.1, norm, g)
    assert x0.device == x.device and 0 < (x0 - x).abs().max() <= 0.1 + 1e-6
