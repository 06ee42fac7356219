"""Checkpoint conversion from robustness's layout, without importing robustness."""

from __future__ import annotations

import torch

from robust_amo import checkpoint as ckpt_io
from robust_amo.checkpoint import from_robustness
from robust_amo.models import create_model


def test_folding_two_normalisations_keeps_the_logits():
    """robustness's normaliser (applied first) and a model that normalises itself (second).

    (x − m_r)/s_r followed by (· − m_m)/s_m is (x − (m_r + m_m·s_r))/(s_r·s_m): the converted
    model must give the logits of the AttackerModel it came from.
    """
    torch.manual_seed(0)
    shape = (1, 8, 8)
    net = create_model("tiny-mlp", 10, input_shape=shape, mean=[0.3], std=[0.5])
    outer_mean, outer_std = torch.tensor([0.6]), torch.tensor([0.2])
    state = {"module.normalizer.new_mean": outer_mean.view(1, 1, 1),
             "module.normalizer.new_std": outer_std.view(1, 1, 1),
             "module.attacker.normalize.new_mean": outer_mean.view(1, 1, 1),
             "module.attacker.normalize.new_std": outer_std.view(1, 1, 1)}
    for k, v in net.state_dict().items():
        state[f"module.model.{k}"] = v
        state[f"module.attacker.model.{k}"] = v
    ours = ckpt_io.model_from_checkpoint(
        from_robustness({"model": state, "epoch": 3}, arch="tiny-mlp", input_shape=shape))
    x = torch.rand(5, *shape)
    with torch.no_grad():
        want = net.eval()((x - outer_mean.view(1, -1, 1, 1)) / outer_std.view(1, -1, 1, 1))
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
