"""``--attack fast``: APGD-CE, then APGD-T towards a few targets, each stage only on the
examples no earlier stage broke (docs/evaluation.md, "A faster evaluation").

The ingredients are AutoAttack's two gradient attacks (Croce & Hein 2020:
:class:`robust_amo.attacks.APGD`, 100 iterations each) with three economies and one addition:
an example leaves an attack at its first misclassified iterate (the attack needs nothing more
to count it broken); APGD-T runs on fewer targets (3 instead of AutoAttack's 9), optionally
ranked by MALT's linearised boundary distance (:func:`robust_amo.attacks.malt_targets`); FAB-T
and Square are not run; and optionally a last APGD-T towards the first target starts at the
clean input (``clean_start``), a second, non-random try. Plain ``fast`` is ``fast-t3``
(neither option: docs/benchmarks.md says why). How close this comes to AutoAttack standard,
and at how many fewer passes, is measured by ``python -m bench.fast_eval``
(docs/benchmarks.md). Randomness: the start of example ``i`` in stage ``s`` (0: CE, j: target
j) comes from a CPU generator seeded with ``derive_seed(seed, "fast-eval", i, s)``, so a result
does not depend on the batching.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from robust_amo.attacks import APGD, ce_then_targeted, malt_targets, top_targets
from robust_amo.config import check_choice, check_int
from robust_amo.runtime import Amp, derive_seed, eval_mode

from .pgd_eval import seeded_starts

TargetRank = Literal["logits", "malt"]
"""How APGD-T's targets are chosen: the highest clean logits but the label (AutoAttack's), or
MALT's linearised distance to each class's boundary (:func:`~robust_amo.attacks.malt_targets`)."""


@dataclass(frozen=True)
class FastSettings:
    """The fast evaluation's settings (L∞ only).

    Attributes:
        eps: the L∞ radius.
        steps: APGD iterations per stage (default 100, AutoAttack's).
        targets: how many targets APGD-T tries, in the order ``rank`` gives (default 3).
        seed: seed of the starts.
        rank: ``logits`` (the classes with the highest clean logits but the label, AutoAttack's
            order) or ``malt`` (nearest linearised boundary first, MALT's; one forward and C
            backward passes per example more). Default ``logits``.
        clean_start: after the targets, APGD-T towards the first target once more, started at
            the clean input instead of a random point, on the examples still standing (stage
            ``apgd-t1-x0``). Default False.
    """

    eps: float
    steps: int = 100
    targets: int = 3
    seed: int = 0
    rank: TargetRank = "logits"
    clean_start: bool = False

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_int("targets", self.targets)
        check_choice("rank", self.rank, TargetRank)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (report, state file)."""
        return asdict(self)

    def stage_names(self) -> list[str]:
        """The report's stages: ``apgd-ce`` and ``apgd-t1`` ... ``apgd-tK``."""
        return (["apgd-ce"] + [f"apgd-t{j + 1}" for j in range(self.targets)]
                + (["apgd-t1-x0"] if self.clean_start else []))


@dataclass
class FastResult:
    """Per-example masks of one chunk: clean-correct, robust, robust after each stage, the
    points (B, ...), and the messages of the checks (:func:`model_checks`)."""

    clean: torch.Tensor
    robust: torch.Tensor
    after_stage: list[torch.Tensor]
    x_adv: torch.Tensor
    warnings: list[str] = field(default_factory=list)


def model_checks(logits: torch.Tensor, again: torch.Tensor, y: torch.Tensor,
                 alpha: float = 1e-4) -> list[str]:
    """AutoAttack's checks of the model (Croce & Hein 2020, its ``checks`` module) that apply
    to gradient attacks, on two forward passes of the same clean batch (B, C).

    - randomized: the two passes differ (in correct predictions, or by more than ``alpha`` in
      the L2 distance of the L2-normalised logits): a randomized defense, which needs
      AutoAttack's ``rand`` version, not a fixed-start evaluation;
    - probabilities: the outputs lie in [0, 1] and sum to 1, so they are probabilities, not
      logits, and the losses saturate.
    """
    out = []
    a, b = logits.detach().float(), again.detach().float()
    unit = [t / (t.norm(dim=1, keepdim=True) + 1e-10) for t in (a, b)]
    same_right = int((a.argmax(1) == y).sum()) == int((b.argmax(1) == y).sum())
    diff = float((unit[0] - unit[1]).norm(dim=1).max()) if len(a) else 0.0
    if not same_right or diff > alpha:
        out.append("the model's outputs differ between two passes of the same inputs: a "
                   "randomized defense? evaluate it with autoattack-rand")
    if len(a) and float(a.max()) < 1 + 1e-5 and float(a.min()) > -1e-5 and bool(
            ((a.sum(1) - 1).abs() < 1e-5).all()):
        out.append("the model's outputs are a probability distribution: pass logits, or the "
                   "attacks' losses saturate")
    return out


def stage_starts(x: torch.Tensor, index: torch.Tensor, eps: float, seed: int,
                 stage: int) -> torch.Tensor:
    """Uniform starts in the L∞ ball, one generator per example (see the module docstring)."""
    seeds = [derive_seed(seed, "fast-eval", int(i), stage) for i in index.tolist()]
    return seeded_starts(x, seeds, eps, "linf")


def fast_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                settings: FastSettings, amp: Amp = contextlib.nullcontext) -> FastResult:
    """The fast evaluation of one batch (x (B, ...) in [0, 1], y (B,), global indices (B,)).

    Only clean-correct examples are attacked; the model runs in eval mode and its mode is
    restored.
    """
    x, y, index = x.detach(), y.detach(), index.to("cpu")
    with eval_mode(model):
        with torch.no_grad(), amp():
            logits = model(x)
            warnings = model_checks(logits, model(x), y)
        clean = logits.argmax(1) == y
        n_classes = logits.shape[1]
        if settings.targets > n_classes - 1:  # AutoAttack's check_n_classes
            warnings.append(f"{settings.targets} targets asked for, but the model has "
                            f"{n_classes} classes: APGD-T runs on {n_classes - 1}")
        pos = clean.nonzero().squeeze(1)
        x_adv = x.clone()
        after = [clean.clone() for _ in settings.stage_names()]
        if pos.numel() == 0:
            return FastResult(clean, clean.clone(), after, x_adv, warnings)
        xs, ys, ids = x[pos], y[pos], index[pos.cpu()]
        k = min(settings.targets, n_classes - 1)
        with amp():
            if settings.rank == "malt":
                targets = malt_targets(model, xs, ys, k)
            else:
                targets = top_targets(logits[pos], ys, k)
            ce = APGD(model, eps=settings.eps, steps=settings.steps)
            tt = APGD(model, eps=settings.eps, steps=settings.steps, loss="dlr-t")
            xa, fooled, stages = ce_then_targeted(
                ce, tt, xs, ys, targets,
                start=lambda ex, s: stage_starts(xs[ex], ids[ex.cpu()], settings.eps,
                                                 settings.seed, s))
            if ce.zero_gradients:  # AutoAttack's check_zero_gradients
                warnings.append(f"{ce.zero_gradients} examples have a zero gradient at APGD-CE's "
                                "start: gradient attacks may be unreliable on them")
            stages += [fooled.clone()] * (1 + settings.targets - len(stages))  # few classes
            if settings.clean_start:
                # a second try at the first target from a start no random draw can give
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() > 0:
                    tt.target, tt.x_init = targets[todo, 0], xs[todo]
                    xa[todo] = tt(xs[todo], ys[todo])
                    fooled[todo] |= tt.last_fooled
                    tt.x_init = None
                stages.append(fooled.clone())
        x_adv[pos] = xa.to(x_adv.dtype)
        robust = clean.clone()
        robust[pos] = ~fooled
        for j, f in enumerate(stages):
            after[j][pos] = ~f
        return FastResult(clean, robust, after, x_adv, warnings)
