"""Small networks: Sokolić et al. 2017's MNIST CNNs and DNNs, and tiny test models.

- ``mnist-cnn2``/``mnist-cnn3`` (Sokolić Table I): (32,5,5)-conv, 2x2 max-pool, (32,5,5)-conv,
  2x2 max-pool [, (32,5,5)-conv], linear classifier. Convolutions use padding 2 so that the third
  convolution of ``mnist-cnn3`` fits a 7x7 map (the paper does not give the padding).
- ``mlpL`` (Sokolić Fig. 2 DNN): flattened input, L hidden layers of 392 units, linear classifier
  (``mlpL-W`` for width W).
- ``small-cnn``: 3x3 convolutions of 16 and 32 channels, each pooled, linear classifier (CPU-sized
  studies).
- Test models: ``tiny-cnn`` (two 8-channel convs), ``tiny-mlp`` (one hidden layer of 32),
  ``linear`` (a single linear layer; its one perturbation point is the flattened input, so
  δ is scaled by ‖x‖₂ as in Wei & Ma Example 2.1).

Perturbation points: every convolution's and every hidden linear layer's output (before the ReLU);
never the classifier.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Normalize, RobustModel, final_relu
from .registry import register_model


class ConvNet(RobustModel):
    """conv(5x5, pad 2)-ReLU[-maxpool] stacks followed by a linear classifier."""

    def __init__(
        self,
        channels: list[int],
        pools: list[bool],
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        mean=None,
        std=None,
        kernel: int = 5,
    ) -> None:
        super().__init__()
        cin, h, w = input_shape
        self.normalize = Normalize(mean, std, cin)
        self.convs = nn.ModuleList()
        self.pools = list(pools)
        for c, pool in zip(channels, pools, strict=True):
            self.convs.append(nn.Conv2d(cin, c, kernel, 1, kernel // 2))
            cin = c
            if pool:
                h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for {len(pools)} poolings")
        self.classifier = nn.Linear(cin * h * w, num_classes)

    def _point_names(self) -> list[str]:
        return [f"convs.{i}" for i in range(len(self.convs))]

    def features(self, x: torch.Tensor, fake_relu: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        last = len(self.convs) - 1
        pre = x
        for i, (conv, pool) in enumerate(zip(self.convs, self.pools, strict=True)):
            x = conv(x)
            pre = x
            x = final_relu(x, fake_relu) if i == last else torch.relu(x)
            if pool:
                x = nn.functional.max_pool2d(x, 2)
                pre = nn.functional.max_pool2d(pre, 2)
        return x.flatten(1), pre.flatten(1)


class MLP(RobustModel):
    """Flatten, ``depth`` hidden linear+ReLU layers of ``width`` units, linear classifier."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        mean=None,
        std=None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, input_shape[0])
        d = math.prod(input_shape)
        self.hidden = nn.ModuleList()
        for _ in range(depth):
            self.hidden.append(nn.Linear(d, width))
            d = width
        self.flat = nn.Flatten()
        self.classifier = nn.Linear(d, num_classes)

    def _point_names(self) -> list[str]:
        # a linear model's only layer input is x itself: perturb the flattened input
        return [f"hidden.{i}" for i in range(len(self.hidden))] or ["flat"]

    def features(self, x: torch.Tensor, fake_relu: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        x = self.flat(x)
        pre = x
        last = len(self.hidden) - 1
        for i, layer in enumerate(self.hidden):
            pre = layer(x)
            x = final_relu(pre, fake_relu) if i == last else torch.relu(pre)
        return x, pre


@register_model("mnist-cnn2")
def mnist_cnn2(**kw) -> ConvNet:
    """Sokolić et al. 2017 Table I, 2-layer CNN."""
    return ConvNet([32, 32], [True, True], **kw)


@register_model("mnist-cnn3")
def mnist_cnn3(**kw) -> ConvNet:
    """Sokolić et al. 2017 Table I, 3-layer CNN (an extra (32,5,5)-conv before the classifier)."""
    return ConvNet([32, 32, 32], [True, True, False], **kw)


@register_model(pattern=r"mlp(\d+)(?:-(\d+))?", example="mlpL[-W]")
def mlp(depth: str, width: str | None = None, **kw) -> MLP:
    """Sokolić et al. 2017 Fig. 2 DNN: L hidden layers of 392 units (``mlp1``, ``mlp2``, ...)."""
    return MLP(int(depth), int(width) if width else 392, **kw)


@register_model("tiny-cnn")
def tiny_cnn(**kw) -> ConvNet:
    """Two 3x3 convolutions of 8 channels with one max-pool: for tests and the quickstart."""
    return ConvNet([8, 8], [True, False], kernel=3, **kw)


@register_model("small-cnn")
def small_cnn(**kw) -> ConvNet:
    """3x3 convolutions of 16 and 32 channels, each with a 2x2 max-pool: about five times
    cheaper than ``mnist-cnn2``, for the CPU-sized study robust-amo-vs-pgd-small."""
    return ConvNet([16, 32], [True, True], kernel=3, **kw)


@register_model("tiny-mlp")
def tiny_mlp(**kw) -> MLP:
    """One hidden layer of 32 units: for tests."""
    return MLP(1, 32, **kw)


@register_model("linear")
def linear(**kw) -> MLP:
    """A single linear layer (no hidden layer): Wei & Ma Example 2.1."""
    return MLP(0, 0, **kw)
