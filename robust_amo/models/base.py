"""Common base of every registered architecture.

A :class:`RobustModel` takes inputs in [0, 1] and normalises them itself (per-dataset mean/std
buffers), declares its perturbation points (Wei & Ma 2020, Algorithm 1; see
docs/algorithms.md) and its final linear layer, and accepts the keywords that MadryLab's
``robustness`` passes to architectures (``with_latent``, ``fake_relu``, ``no_relu``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FakeReLU(torch.autograd.Function):
    """ReLU forward, identity backward (robustness's ``fake_relu``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def final_relu(x: torch.Tensor, fake_relu: bool) -> torch.Tensor:
    """The last non-linearity before pooling, honouring robustness's ``fake_relu``."""
    if fake_relu:
        return FakeReLU.apply(x)
    return torch.relu(x)


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers; saved in the state dict.

    Args:
        mean: per-channel mean, length C, finite (defaults to zeros: identity).
        std: per-channel standard deviation, length C, finite and > 0 (defaults to ones).
        channels: number of input channels C.

    Raises:
        ValueError: a length other than C, a mean that is not finite, or a std <= 0 or not
            finite.
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        channels: int,
    ) -> None:
        super().__init__()
        f32 = torch.float32
        mean_t = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=f32)
        std_t = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=f32)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(
                f"mean/std need {channels} values, got {mean_t.numel()}/{std_t.numel()}"
            )
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError(f"mean must be finite numbers, got {mean_t.tolist()}")
        if not bool((torch.isfinite(std_t) & (std_t > 0)).all()):
            # dividing by 0 (or a negative std) gives inf or flipped inputs: never a model
            raise ValueError(f"std must be finite numbers > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, channels, 1, 1))
        self.register_buffer("std", std_t.view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x - self.mean) / self.std


class RobustModel(nn.Module):
    """Base class: subclasses set ``self.normalize``, ``self.classifier`` and ``_points``.

    Attributes:
        normalize: the input normalisation, applied first in ``forward``.
        classifier: the final ``nn.Linear`` (logits = classifier(features)).
        arch: the registry name the model was created with (set by ``create_model``).
    """

    normalize: Normalize
    classifier: nn.Linear
    arch: str = ""

    def perturbation_points(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs carry an all-layer perturbation δ, in forward order.

        Returns:
            list of ``(qualified_name, module)``; see docs/algorithms.md, "Perturbation points".
        """
        names = self._point_names()
        modules = dict(self.named_modules())
        return [(n, modules[n]) for n in names]

    def _point_names(self) -> list[str]:
        raise NotImplementedError

    def features(self, x: torch.Tensor, fake_relu: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features for a normalised input.

        Returns:
            ``(post, pre)``, each (B, D): φ(x) fed to the classifier, and the same features taken
            before the last ReLU (robustness's ``no_relu`` latent).
        """
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        with_latent: bool = False,
        fake_relu: bool = False,
        no_relu: bool = False,
    ):
        """Logits for inputs in [0, 1].

        Args:
            x: images (B, C, H, W) in [0, 1].
            with_latent: also return the penultimate features (robustness's convention).
            fake_relu: use a ReLU with identity gradient before pooling (robustness).
            no_relu: the latent is taken before the last ReLU (robustness).

        Returns:
            logits (B, num_classes), or ``(logits, latent)`` when ``with_latent``.
        """
        if no_relu and not with_latent:
            raise ValueError("no_relu only makes sense together with with_latent=True")
        post, pre = self.features(self.normalize(x), fake_relu=fake_relu)
        logits = self.classifier(post)
        if not with_latent:
            return logits
        return logits, (pre if no_relu else post)
