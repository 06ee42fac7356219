"""PGD-K × R evaluation with the per-example worst case over restarts (paper F.2, ALGORITHMS.md).

An example is robust only if it is classified correctly and no iterate of any restart (the random
start, every intermediate point, the final point) is misclassified. Restart r runs only on the
examples still robust after restart r − 1, so the cost falls as examples break; within a restart,
``attacks.PGD`` with ``early_stop=True`` freezes an example at its first misclassified iterate.

Randomness: the random start of example ``i`` in restart ``r`` is drawn from a CPU generator
seeded with ``(seed, i, r)``, where ``i`` is the example's global index in the evaluation set.
The result of an example therefore does not depend on the batch it lands in, on the batch size
or on how examples are sharded across processes (up to floating-point differences of batched
kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from attacks import PGD
from attacks.pgd import LOSSES, NORMS, random_start

_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class PGDSettings:
    """Hyperparameters of one PGD evaluation.

    Attributes:
        eps: radius of the threat model in [0, 1] pixel units (8/255 for CIFAR-10).
        step_size: α per step (default in the CLI: eps / 4, i.e. 2/255 at 8/255).
        steps: iterations per restart (50 for PGD-50).
        restarts: random restarts (10 for PGD-50 × 10).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (margin).
        random_start: start from a uniform point of the ball (default True).
        seed: base seed of the per-example starts.
        early_exit: run restart r only on the examples still robust (default True); False runs
            every restart on every clean-correct example (same result, more work; for checks).
    """

    eps: float
    step_size: float
    steps: int
    restarts: int = 1
    norm: str = "linf"
    loss: str = "ce"
    random_start: bool = True
    seed: int = 0
    early_exit: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; choose one of {LOSSES}")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0 or self.restarts < 1:
            raise ValueError("PGD evaluation needs eps >= 0, step_size >= 0, steps >= 0 and "
                             "restarts >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports and state files."""
        return asdict(self)


@dataclass
class PGDResult:
    """Per-example outcome of :func:`pgd_robust` on a batch of B examples.

    Attributes:
        clean: (B,) bool, classified correctly without attack.
        robust: (B,) bool, correct at every iterate of every restart.
        after_restart: (R, B) bool, ``robust`` after restarts 1..r (non-increasing in r).
        x_adv: (B, ...) the misclassified iterate for broken examples, else the final iterate of
            the last restart run (the clean input for examples misclassified clean).
    """

    clean: torch.Tensor
    robust: torch.Tensor
    after_restart: torch.Tensor
    x_adv: torch.Tensor


def example_seed(seed: int, index: int, restart: int) -> int:
    """The generator seed of example ``index`` in restart ``restart`` (a 63-bit mix)."""
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + restart * 0x94D049BB133111EB)
    h ^= h >> 31
    return (h * 0xD6E8FEB86659FD93) & _MASK63


def restart_starts(
    x: torch.Tensor, index: torch.Tensor, settings: PGDSettings, restart: int
) -> torch.Tensor:
    """Random starts of restart ``restart`` for examples ``index`` (B,) of x (B, ...).

    Each example's start comes from its own generator, seeded by :func:`example_seed`; the noise
    is drawn on the CPU and moved to x's device in one transfer.
    """
    if not settings.random_start:
        return x.clone()
    xc = x.detach().float().cpu()
    g = torch.Generator()
    out = torch.empty_like(xc)
    for k, i in enumerate(index.tolist()):
        g.manual_seed(example_seed(settings.seed, int(i), restart))
        out[k] = random_start(xc[k : k + 1], settings.eps, settings.norm, g)[0]
    return out.to(device=x.device, dtype=x.dtype)


def pgd_robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    settings: PGDSettings,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PGDResult:
    """PGD-``steps`` × ``restarts`` on one batch; the per-example worst case over restarts.

    Args:
        model: classifier returning logits for inputs in [0, 1]; run in eval mode, its mode is
            restored afterwards.
        x: clean inputs (B, C, H, W) in [0, 1]; y: labels (B,).
        index: global example indices (B,) that key the random starts (see module docstring).
        settings: the attack.
        amp: context manager factory for the forward passes (bf16 autocast when requested;
            the attack loss itself is float32).

    Returns:
        :class:`PGDResult` with per-example boolean masks; reduce them with ``.float().mean()``
        (or gather them across processes first).
    """
    x, y = x.detach(), y.detach()
    index = index.to("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), amp():
            clean = model(x).argmax(1) == y
        attack = PGD(model, settings.eps, settings.step_size, settings.steps, settings.norm,
                     random_start=False, restarts=1, loss=settings.loss, early_stop=True)
        robust = clean.clone()
        x_adv = x.clone()
        curve = []
        for r in range(settings.restarts):
            todo = robust if settings.early_exit else clean
            active = todo.nonzero().squeeze(1)
            if active.numel() > 0:
                start = restart_starts(x[active], index[active.cpu()], settings, r)
                with amp():
                    xa, fooled, _ = attack.run_once(x[active], y[active], final_eval=True,
                                                    x_init=start)
                # once broken, an example stays broken and keeps its first fooling point
                take = robust[active]
                x_adv[active[take]] = xa[take].to(x_adv.dtype)
                robust[active] &= ~fooled
            curve.append(robust.clone())
        return PGDResult(clean, robust, torch.stack(curve), x_adv)
    finally:
        model.train(was_training)
