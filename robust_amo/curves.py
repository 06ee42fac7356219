"""Pictures of runs: training curves from metrics.jsonl (``robust-amo plot``, RUN/curves.png),
and the pyplot helpers the evaluation's restart picture uses
(:func:`robust_amo.evaluation.report.restarts_figure`).

The figures are built and returned before they are saved, so tests can inspect them (how many
lines, which labels). matplotlib is imported when a picture is drawn (it is heavy), with the
Agg backend: no screen is needed.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outputs import atomic_write
from .runs import RunDir, read_metrics

log = logging.getLogger(__name__)

PANELS = (("train_loss", "training loss"), ("clean_acc", "clean accuracy (check split)"),
          ("robust_acc", "robust accuracy (check split, PGD)"), ("lr", "learning rate"))
"""The panels of a curves figure: metrics.jsonl key and title."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed), imported on first use."""
    import matplotlib  # noqa: PLC0415 - heavy, only for pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def curves_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]]):
    """Training loss, clean and robust accuracy and learning rate per epoch, one line per run.

    Args:
        runs: ``(name, metrics rows)`` per run; a run lacking a metric (no attack: no robust
            accuracy; the per-epoch check every k epochs) draws only the epochs it has.

    Returns:
        the matplotlib Figure (2 x 2 panels, in :data:`PANELS` order).
    """
    plt = pyplot()
    fig, axs = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (key, title) in zip(axs.flat, PANELS, strict=True):
        for name, rows in runs:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None,
                        label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    lr = axs.flat[3]
    if lr.get_lines() and all(y > 0 for ln in lr.get_lines() for y in ln.get_ydata()):
        lr.set_yscale("log")  # step schedules span decades
    fig.tight_layout()
    return fig


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short distinct names: each folder's name, with its parent when two names collide."""
    paths = [Path(p).resolve() for p in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return names


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG, atomically (:func:`robust_amo.outputs.atomic_write`); closes it."""
    return atomic_write(path, png_bytes(fig))


def write_curves(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """RUN/curves.png of one run (None when it has no metrics yet)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig = curves_figure([(Path(run_dir).name, rows)])
    return save_figure(fig, path or RunDir(run_dir).curves)
