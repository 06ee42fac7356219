"""Every margin of a model on a set of examples, in one call: :func:`measure`.

What ``robust-amo margins`` computes, on tensors: batch by batch, :func:`margins_batch` (output,
all-layer and L2 input margins, κ per point) and, with a threat model, the adversarial all-layer
margin and κ_adv over the PGD neighbourhood of that threat model (docs/margins.md). The PGD's
random starts come from one generator seeded from ``seed``, so a call gives the same columns as
the command with the same options.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robust_amo.attacks import PGD
from robust_amo.config import ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.outputs import disk_writes
from robust_amo.runtime import eval_mode, generator

from .estimators import SearchOptions, margins_batch
from .report import plot_margins, summarize, write_csv

log = logging.getLogger(__name__)

CSV = "margins.csv"
SUMMARY = "summary.json"


@dataclass
class MarginsResult:
    """Per-example margins of N examples and their summary.

    Attributes:
        columns: per-example tensors on the CPU, (N,) or (N, P): ``label``, ``pred``,
            ``output_margin``, ``all_layer_margin``, ... (:func:`margins_batch` lists them).
        points: the P perturbation points, in the order of the per-point columns.
        settings: how they were measured (threat model, searches, ...), for summary.json.
        summary: counts, coverage, means and quantiles of every quantity (summary.json).
    """

    columns: dict[str, torch.Tensor]
    points: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self, out: str | Path, *, plots: bool = True) -> Path:
        """Write ``margins.csv``, ``summary.json`` and (``plots``) the three PNGs to ``out``.

        Returns:
            The folder.
        """
        folder = Path(out)
        with disk_writes(folder):  # a full disk is one line, as for every write
            folder.mkdir(parents=True, exist_ok=True)
            write_csv(folder / CSV, self.columns, self.points)
            (folder / SUMMARY).write_text(json.dumps(self.summary, indent=2, allow_nan=False))
            if plots:
                plot_margins(self.columns, self.points, folder)
        return folder


def _check_finite(model: nn.Module, x: torch.Tensor, batch_size: int,
                  device: torch.device | str) -> None:
    """ConfigError unless the model's logits are finite on every example.

    Every margin is a difference of logits and κ a spectral norm; NaN or inf logits make them
    meaningless (and the eigen solver fail), so they are refused before any search starts.
    """
    bad: list[int] = []
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].to(device))
            rows = (~torch.isfinite(logits)).flatten(1).any(1).nonzero().flatten()
            bad += (rows + i).tolist()
    if bad:
        raise ConfigError(
            f"the model's logits are not finite (NaN or inf) on {len(bad)} of {len(x)} "
            f"examples (the first: example {bad[0]}); margins need finite logits: check the "
            "model and its weights (a run that diverged has NaN weights)")


def measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel | None = None,
    *,
    restarts: int = 1,
    seed: int = 0,
    search: SearchOptions | None = None,
    input_margin: bool = True,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> MarginsResult:
    """Every margin of ``model`` on (x, y) (Wei & Ma 2020; Sokolić et al. 2017; docs/margins.md).

    Args:
        model: a registered model or one with ``perturbation_points()`` (an
            :class:`~robust_amo.models.ExternalModel`), inputs in [0, 1].
        x: examples (N, C, H, W) in [0, 1]; y: labels (N,).
        threat: the PGD neighbourhood B_adv(x) of the adversarial all-layer margin and κ_adv
            (norm, eps, step size, steps, random start, loss); None skips them.
        restarts: PGD restarts of the neighbourhood (default 1).
        seed: seed of the PGD's random starts (default 0).
        search: the bisection searches of the attack-based estimates (default
            :class:`SearchOptions`).
        input_margin: also estimate the L2 input margin (default True).
        batch_size: examples per batch (default 128).
        device: where to compute (default: the model's).
        progress: a progress bar.
        settings: extra facts for the summary (checkpoint, dataset, ...).

    Returns:
        :class:`MarginsResult`, columns in the order of the examples.

    Raises:
        ConfigError: ``restarts`` or ``batch_size`` below 1, no examples, a model without
            perturbation points, or logits that are not finite (NaN or inf) on some example.
    """
    for key, v in (("restarts", restarts), ("batch_size", batch_size)):
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}", params=(key,))
    if len(y) == 0:
        raise ConfigError("no examples to measure: x and y are empty", params=("x",))
    search = search or SearchOptions()
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    if hasattr(model, "perturbation_points") and not model.perturbation_points():
        raise ConfigError("the model declares no perturbation point, so it has no all-layer "
                          "margin; give points: the modules whose outputs to perturb",
                          params=("points",))
    _check_finite(model, x, batch_size, device)
    attack = None
    if threat is not None:
        attack = PGD.from_threat(model, threat, restarts=restarts,
                                 generator=generator(seed, "margins-pgd"))
    parts: list[dict[str, torch.Tensor]] = []
    names: list[str] = []
    starts = range(0, len(y), batch_size)
    for i in tqdm(starts, desc="margins", unit="batch", disable=not progress):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        cols, names = margins_batch(model, xb, yb, attack, search, input_l2=input_margin)
        cols["label"] = yb
        parts.append({k: v.detach().cpu() for k, v in cols.items()})
    columns = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    pgd = None
    if threat is not None:
        pgd = {"eps": threat.eps, "step_size": threat.step_size, "steps": threat.steps,
               "restarts": restarts, "norm": threat.norm, "loss": threat.loss, "seed": seed}
    facts = dict(settings or {})
    facts.setdefault("n_examples", len(y))
    facts.update(pgd=pgd, search={"attack_steps": search.steps, "rounds": search.rounds,
                                  "rtol": search.rtol, "max_expand": search.max_expand,
                                  "step_scale": search.step_scale},
                 points=names)
    facts.setdefault("device", str(device))
    facts.setdefault("torch", torch.__version__)
    return MarginsResult(columns, names, facts, summarize(columns, names, facts))
