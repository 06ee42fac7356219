"""Pre-activation ResNet-18 (He et al. 2016), the common adversarial-training baseline.

Perturbation points: ``conv1`` and ``conv2`` of every block (16 points), as for WRNs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Normalize, RobustModel, final_relu
from .registry import register_model
from .wrn import BasicBlock


class PreActResNet(RobustModel):
    """Pre-activation ResNet with basic blocks; ``blocks_per_stage`` e.g. (2, 2, 2, 2)."""

    def __init__(
        self,
        blocks_per_stage=(2, 2, 2, 2),
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (3, 32, 32),
        mean=None,
        std=None,
    ) -> None:
        super().__init__()
        cin = input_shape[0]
        self.normalize = Normalize(mean, std, cin)
        self.stem = nn.Conv2d(cin, 64, 3, 1, 1, bias=False)
        widths = [64, 128, 256, 512]
        blocks, c = [], 64
        for s, (w, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for b in range(n):
                blocks.append(BasicBlock(c, w, 2 if (b == 0 and s > 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def _point_names(self) -> list[str]:
        return [f"blocks.{i}.conv{j}" for i in range(len(self.blocks)) for j in (1, 2)]

    def features(self, x: torch.Tensor, fake_relu: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        pre = self.bn(self.blocks(self.stem(x)))
        post = final_relu(pre, fake_relu)
        return F.adaptive_avg_pool2d(post, 1).flatten(1), F.adaptive_avg_pool2d(pre, 1).flatten(1)


@register_model("preact-resnet18")
def preact_resnet18(**kw) -> PreActResNet:
    """PreAct ResNet-18 (11M parameters)."""
    return PreActResNet((2, 2, 2, 2), **kw)
