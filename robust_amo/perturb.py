"""All-layer perturbations through forward hooks (Wei & Ma 2020, Algorithm 1 FORWARDPERTURB).

Inside ``with perturb(model) as p:`` every perturbation point j declared by the model computes
h_j ← h_j + ‖h_j‖₂ · δ_j, where ‖h_j‖₂ is the L2 norm of each example's whole activation
(flattened) and stays in the autograd graph (ALGORITHMS.md, "Perturbation points"). The
architectures stay plain: nothing changes once the context exits, also on error.

δ_j has the shape of h_j (channels_last preserved), is kept in float32 even when the forward runs
under bf16 autocast (float64 for a float64 model), and is created zero-filled and requiring grad at
the first forward unless given. With every δ_j = 0 the perturbed forward equals the plain forward
exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision activations, the activation's own dtype otherwise (float64)."""
    return torch.promote_types(dtype, torch.float32)


def example_norm(h: torch.Tensor) -> torch.Tensor:
    """‖h‖₂ per example over all non-batch dimensions, in float32 or wider: (B,)."""
    return torch.linalg.vector_norm(h.to(_work_dtype(h.dtype)), dim=tuple(range(1, h.dim())))


def unwrap(model: nn.Module) -> nn.Module:
    """The registered model inside DDP/compiled wrappers (``.module``/``._orig_mod``).

    Raises:
        TypeError: when no wrapped module declares ``perturbation_points()``.
    """
    inner = model
    while not hasattr(inner, "perturbation_points"):
        nxt = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if nxt is None:
            raise TypeError(f"{type(model).__name__} declares no perturbation_points()")
        inner = nxt
    return inner


class Perturbation:
    """State of an installed perturbation; ``deltas[j]`` belongs to ``names[j]``.

    Attributes:
        names: qualified module names of the perturbation points, in forward order.
        deltas: the δ_j tensors (float32, activation shape), ``None`` until created.
        scales: ‖h_j‖₂ (B,) seen in the latest forward (the s_j(x) of Wei & Ma Appendix C).
        create: create missing δ_j (zeros, ``requires_grad``) at the next forward.
    """

    def __init__(self, names: list[str], deltas: Sequence[torch.Tensor | None] | None,
                 requires_grad: bool) -> None:
        self.names = names
        if deltas is not None and len(deltas) != len(names):
            raise ValueError(f"got {len(deltas)} deltas for {len(names)} perturbation points")
        self.deltas: list[torch.Tensor | None] = (
            list(deltas) if deltas is not None else [None] * len(names)
        )
        self.scales: list[torch.Tensor | None] = [None] * len(names)
        self.requires_grad = requires_grad
        self.create = True

    def reset(self) -> None:
        """Forget every δ (the next forward creates zeros again)."""
        self.deltas = [None] * len(self.names)

    def detached(self) -> list[torch.Tensor]:
        """The current δ's, detached (for the weight update of (robust) AMO)."""
        return [d.detach() if d is not None else None for d in self.deltas]

    def norm(self) -> torch.Tensor:
        """‖δ‖₂ per example over all points concatenated: (B,)."""
        sq = [example_norm(d) ** 2 for d in self.deltas if d is not None]
        return torch.stack(sq).sum(0).sqrt()

    def _hook(self, j: int):
        def hook(module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
            d = self.deltas[j]
            if d is None:
                if not self.create:
                    return out
                d = torch.zeros_like(out, dtype=_work_dtype(out.dtype))
                d.requires_grad_(self.requires_grad)
                self.deltas[j] = d
            if d.shape != out.shape:
                raise ValueError(
                    f"δ for {self.names[j]} has shape {tuple(d.shape)} but the activation has "
                    f"{tuple(out.shape)}; a Perturbation serves one batch shape (call reset())"
                )
            s = example_norm(out)
            self.scales[j] = s
            return out + (s.view(-1, *([1] * (out.dim() - 1))) * d).to(out.dtype)

        return hook


@contextlib.contextmanager
def perturb(
    model: nn.Module,
    deltas: Sequence[torch.Tensor | None] | None = None,
    *,
    requires_grad: bool = True,
) -> Iterator[Perturbation]:
    """Install δ hooks on ``model``'s perturbation points for the duration of the block.

    Args:
        model: a registered model (it has ``perturbation_points()``), or a DDP/compiled wrapper
            around one (``.module``/``._orig_mod``).
        deltas: one tensor (or None) per point; None: created zero-filled at the first forward.
        requires_grad: whether created δ's require grad (default True).

    Yields:
        the :class:`Perturbation` whose ``deltas`` the hooks read at every forward.
    """
    points = unwrap(model).perturbation_points()
    state = Perturbation([n for n, _ in points], deltas, requires_grad)
    handles = []
    try:
        for j, (_, module) in enumerate(points):
            handles.append(module.register_forward_hook(state._hook(j)))
        yield state
    finally:
        for h in handles:
            h.remove()
