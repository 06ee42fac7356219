"""Wide residual networks (Zagoruyko & Komodakis 2016), pre-activation basic blocks.

WRN-D-K has (D - 4) / 6 blocks in each of three groups of widths 16K, 32K, 64K after a 16-channel
stem. The perturbation points (Wei & Ma 2020; docs/algorithms.md) are the outputs of ``conv1`` and
``conv2`` in every block, before the residual addition: 12 for WRN-16-10, 24 for WRN-28-10,
30 for WRN-34-10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnknownModelError
from .base import Normalize, RobustModel, final_relu
from .registry import register_model


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, with a 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        o = F.relu(self.bn1(x))
        # the shortcut conv sees the pre-activated input, as in the reference WRN
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + skip


class WideResNet(RobustModel):
    """WRN-depth-width for images (C, H, W); see module docstring."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (3, 32, 32),
        mean=None,
        std=None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
            raise UnknownModelError(
                f"wrn{depth}-{width}: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...) "
                "and width >= 1"
            )
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        cin = input_shape[0]
        self.normalize = Normalize(mean, std, cin)
        self.stem = nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g, stride in enumerate([1, 2, 2]):
            for b in range(n):
                c_in = widths[g] if b == 0 else widths[g + 1]
                blocks.append(BasicBlock(c_in, widths[g + 1], stride if b == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.classifier = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _point_names(self) -> list[str]:
        return [f"blocks.{i}.conv{j}" for i in range(len(self.blocks)) for j in (1, 2)]

    def features(self, x: torch.Tensor, fake_relu: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        pre = self.bn(self.blocks(self.stem(x)))
        post = final_relu(pre, fake_relu)
        return F.adaptive_avg_pool2d(post, 1).flatten(1), F.adaptive_avg_pool2d(pre, 1).flatten(1)


@register_model(pattern=r"wrn(\d+)-(\d+)", example="wrnD-K")
def wide_resnet(depth: str, width: str, **kw) -> WideResNet:
    """Any WRN-D-K, e.g. ``wrn16-10``, ``wrn28-10``, ``wrn34-10``, ``wrn10-1``."""
    return WideResNet(int(depth), int(width), **kw)


@register_model("wrn16-10")
def wrn16_10(**kw) -> WideResNet:
    """WRN-16-10 (Wei & Ma 2020, Tables 1 and 2)."""
    return WideResNet(16, 10, **kw)


@register_model("wrn28-10")
def wrn28_10(**kw) -> WideResNet:
    """WRN-28-10 (Madry PGD and robust AMO baseline, Wei & Ma 2020 F.2)."""
    return WideResNet(28, 10, **kw)


@register_model("wrn34-10")
def wrn34_10(**kw) -> WideResNet:
    """WRN-34-10 (the usual TRADES/AutoAttack leaderboard size)."""
    return WideResNet(34, 10, **kw)


@register_model("tiny-wrn")
def tiny_wrn(**kw) -> WideResNet:
    """WRN-10-1 (3 blocks, 6 perturbation points): a test model with the real block structure."""
    return WideResNet(10, 1, **kw)
