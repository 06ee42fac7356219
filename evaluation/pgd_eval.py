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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robust_amo.attacks import PGD, TargetedPGD, TargetLoss, random_start
from robust_amo.config import Norm, ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.runtime import Amp, derive_seed, eval_mode


@dataclass(frozen=True)
class PGDSettings:
    """Hyperparameters of one PGD evaluation: a threat model plus restarts and seed.

    Attributes:
        threat: norm, eps (8/255 for CIFAR-10), step size (the evaluation's default:
            :func:`robust_amo.evaluation.attacks.eval_step_size`), steps (50 for PGD-50), random
            start and loss (``"ce"`` or ``"cw"``).
        restarts: random restarts (10 for PGD-50 × 10; default 1).
        seed: base seed of the per-example starts (default 0).
        early_exit: run restart r only on the examples still robust (default True); False runs
            every restart on every clean-correct example (same result, more work; for checks).
        targets: 0 (default) for untargeted PGD with the threat model's loss; k > 0 for
            targeted PGD (:class:`~robust_amo.attacks.TargetedPGD`) towards each of the k
            classes the clean logits rank next, ``restarts`` per target, the worst case over
            all of them (the threat model's loss is then not used).
        target_loss: the targeted loss, ``"cw"`` (z_t − z_y, default) or ``"dlr"``.
    """

    threat: ThreatModel
    restarts: int = 1
    seed: int = 0
    early_exit: bool = True
    targets: int = 0
    target_loss: TargetLoss = "cw"

    def __post_init__(self) -> None:
        if self.restarts < 1:
            raise ConfigError(f"restarts must be >= 1 for a PGD evaluation, got {self.restarts}",
                              params=("restarts",))
        if self.targets < 0:
            raise ConfigError(f"targets must be >= 0 (0: untargeted), got {self.targets}",
                              params=("targets",))

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of reports and state files (keys of robust-amo-eval/1; ``targets``
        and ``target_loss`` only for targeted PGD, whose ``loss`` is its target loss)."""
        t = self.threat
        out: dict[str, Any] = {
            "eps": t.eps, "step_size": t.step_size, "steps": t.steps,
            "restarts": self.restarts, "norm": t.norm, "loss": t.loss,
            "random_start": t.random_start, "seed": self.seed, "early_exit": self.early_exit}
        if self.targets:
            out.update(loss=f"{self.target_loss}-targeted", targets=self.targets,
                       target_loss=self.target_loss)
        return out

    @property
    def runs(self) -> int:
        """Restarts in all: ``restarts`` per target (targets × restarts when targeted)."""
        return self.restarts * max(self.targets, 1)

    def step_names(self) -> list[str]:
        """The curve's point names, one per run: ``restart r``, or ``target t restart r``
        (``target t`` with one restart)."""
        if not self.targets:
            return [f"restart {r + 1}" for r in range(self.restarts)]
        if self.restarts == 1:
            return [f"target {t + 1}" for t in range(self.targets)]
        return [f"target {t + 1} restart {r + 1}" for t in range(self.targets)
                for r in range(self.restarts)]


@dataclass
class PGDResult:
    """Per-example outcome of :func:`pgd_robust` on a batch of B examples.

    Attributes:
        clean: (B,) bool, classified correctly without attack.
        robust: (B,) bool, correct at every iterate of every restart.
        after_restart: (R, B) bool, ``robust`` after restarts 1..r (non-increasing in r); for
            targeted PGD one row per (target, restart), targets outer.
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
    if not settings.threat.random_start:
        return x.clone()
    seeds = [example_seed(settings.seed, int(i), restart) for i in index.tolist()]
    return seeded_starts(x, seeds, settings.threat.eps, settings.threat.norm)


def seeded_starts(x: torch.Tensor, seeds: list[int], eps: float, norm: Norm) -> torch.Tensor:
    """A uniform start in the eps-ball for each example of x (B, ...), example k's from a CPU
    generator seeded with ``seeds[k]``; drawn on the CPU, moved to x's device in one transfer."""
    xc = x.detach().float().cpu()
    g = torch.Generator()
    out = torch.empty_like(xc)
    for k, seed in enumerate(seeds):
        g.manual_seed(seed)
        out[k] = random_start(xc[k : k + 1], eps, norm, g)[0]
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
        # the random starts are drawn per example by `start` below, not by the attack
        threat = settings.threat.replace(random_start=False)
        if settings.targets:
            attack: PGD = TargetedPGD.from_threat(
                model, threat, restarts=settings.restarts, early_stop=True,
                targets=settings.targets, target_loss=settings.target_loss)
        else:
            attack = PGD.from_threat(model, threat, restarts=settings.restarts,
                                     early_stop=True)

        def start(active: torch.Tensor, r: int) -> torch.Tensor:
            return restart_starts(x[active], index[active.cpu()], settings, r)

        with amp():
            wc = attack.worst_case(x, y, start=start, attacked=clean,
                                   early_exit=settings.early_exit)
        return PGDResult(clean, clean & ~wc.fooled, clean & ~wc.after_restart, wc.x_adv)
