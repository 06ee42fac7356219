"""PGD-K × R evaluation with the per-example worst case over restarts (paper F.2;
docs/algorithms.md, "Evaluation").

An example is robust only if it is classified correctly and no iterate of any restart (the random
start, every intermediate point, the final point) is misclassified. Restart r runs only on the
examples still robust after restart r − 1, so the cost falls as examples break; within a restart,
``PGD`` with ``early_stop=True`` freezes an example at its first misclassified iterate; the
worst case over restarts is :meth:`robust_amo.attacks.PGD.worst_case`, the same code as PGD's own
restarts.

Randomness: the random start of example ``i`` in restart ``r`` is drawn from a CPU generator
seeded with ``derive_seed(seed, "pgd-eval", i, r)``, where ``i`` is the example's global index
in the evaluation set.
The result of an example therefore does not depend on the batch it lands in, on the batch size
or on how examples are sharded across processes (up to floating-point differences of batched
kernels).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from robust_amo.attacks import PGD, random_start
from robust_amo.attacks.core import check_threat_model
from robust_amo.config import AttackLoss, Norm
from robust_amo.runtime import Amp, derive_seed, eval_mode


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
    norm: Norm = "linf"
    loss: AttackLoss = "ce"
    random_start: bool = True
    seed: int = 0
    early_exit: bool = True

    def __post_init__(self) -> None:
        check_threat_model(self.eps, self.step_size, self.steps, self.norm, self.loss)
        if self.restarts < 1:
            raise ValueError(f"PGD evaluation needs restarts >= 1, got {self.restarts}")

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
        x_adv: (B, ...) the first misclassified iterate for broken examples, else the final
            iterate of highest loss (the clean input for examples misclassified clean).
    """

    clean: torch.Tensor
    robust: torch.Tensor
    after_restart: torch.Tensor
    x_adv: torch.Tensor


def example_seed(seed: int, index: int, restart: int) -> int:
    """The generator seed of example ``index`` in restart ``restart``."""
    return derive_seed(seed, "pgd-eval", index, restart)


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
    amp: Amp = contextlib.nullcontext,
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
    with eval_mode(model):
        with torch.no_grad(), amp():
            clean = model(x).argmax(1) == y
        attack = PGD(model, settings.eps, settings.step_size, settings.steps, settings.norm,
                     random_start=False, restarts=settings.restarts, loss=settings.loss,
                     early_stop=True)

        def start(active: torch.Tensor, r: int) -> torch.Tensor:
            return restart_starts(x[active], index[active.cpu()], settings, r)

        with amp():
            wc = attack.worst_case(x, y, start=start, attacked=clean,
                                   early_exit=settings.early_exit)
        return PGDResult(clean, clean & ~wc.fooled, clean & ~wc.after_restart, wc.x_adv)
