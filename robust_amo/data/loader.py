"""Minibatches on the training device: the :class:`Loader` and its crop-and-flip :func:`augment`.

Keeping the whole uint8 set on the device and doing crop/flip there keeps the data pipeline off
the critical path of adversarial training (10+ forward/backward passes per batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import runtime
from .splits import Examples


def augment(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, *, rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, per example.

    Args:
        x: float images (B, C, H, W) on any device.
        generator: a CPU generator; offsets are drawn on the CPU so the stream does not depend
            on the device.
        pad: the zero padding, in pixels, and so the largest shift.
        rank, world_size: ``x`` is this rank's share of a global batch of ``B * world_size``
            examples (positions ``rank::world_size``, as :class:`Loader` deals them). The
            offsets are drawn for the whole global batch and this rank's are kept, so every
            example is augmented exactly as in a single-process run.

    Returns:
        The augmented images, like ``x``.
    """
    b, _, h, w = x.shape
    n = b * world_size
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[rank::world_size]
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[rank::world_size]
    flip = (torch.rand(n, generator=generator) < 0.5)[rank::world_size]
    dx, dy, flip = (runtime.to_device(t, x.device) for t in (dx, dy, flip))
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(b, 1))  # (B, H)
    cols = torch.arange(w, device=x.device).view(1, w).expand(b, w)
    cols = torch.where(flip.view(b, 1), (w - 1) - cols, cols) + dx.view(b, 1)  # (B, W)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class Loader:
    """Minibatches of an :class:`Examples` on ``device`` as float images in [0, 1].

    The order (and the augmentation) of epoch ``e`` depends only on ``(seed, e)``, so a run that
    resumes at an epoch boundary sees exactly the batches an uninterrupted run would.

    Args:
        split: the examples.
        batch_size: examples per batch.
        device: where batches live; the uint8 data is moved there once.
        shuffle: a new permutation every epoch.
        augment: random crop (4-pixel padding) and horizontal flip.
        seed: base seed of the per-epoch generator.
        drop_last: drop the final incomplete batch.
        rank, world_size: shard every epoch's permutation across data-parallel ranks: with
            ``batch_size`` b per rank, the union over ranks of batch i is batch i of a
            single-process loader with batch size ``b * world_size`` (same examples, same
            augmentation); the last ``n % world_size`` examples of the permutation are dropped.
    """

    def __init__(
        self,
        split: Examples,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and augmentation stream of ``epoch``."""
        self.epoch = epoch

    def _indices(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.y)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            idx = idx[: n - n % self.world_size][self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self.y) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = runtime.generator(self.seed, "loader", self.epoch)
        idx = self._indices(g).to(self.x.device)
        for i in range(len(self)):
            j = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.x[j].float().div_(255)
            if self.augment:
                x = augment(x, g, rank=self.rank, world_size=self.world_size)
            yield x, self.y[j]
