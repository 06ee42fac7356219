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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .outputs import atomic_write, refuse_overwrite, writable_dir
from .runs import RunDir, read_metrics

log = logging.getLogger(__name__)

PANELS = (("train_loss", "training loss", "training loss (the method's objective)"),
          ("clean_acc", "clean accuracy", "accuracy (%)"),
          ("robust_acc", "robust accuracy", "accuracy (%)"),
          ("lr", "learning rate", "learning rate"))
"""The panels of a curves figure: metrics.jsonl key, title (the accuracies' titles add the
examples they were measured on and the attack) and y-axis label."""

PERCENT = frozenset({"clean_acc", "robust_acc"})
"""Keys logged as fractions and drawn in percent, as the reports give them."""

SPLIT_WORDS = {"val": "held-out training examples", "test": "test examples",
               "train": "training examples"}
"""How the per-epoch check's split (metrics ``check_split``) is said in a picture."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed), imported on first use."""
    import matplotlib  # noqa: PLC0415 - heavy, only for pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def eps_words(eps: Any) -> str:
    """``8/255`` when ``eps`` is a whole number of 255ths, else the number (``0.1``)."""
    try:
        x = float(eps)
    except (TypeError, ValueError):
        return str(eps)
    k = round(x * 255)
    return f"{k}/255" if k > 0 and abs(x * 255 - k) < 1e-6 else f"{x:g}"


def run_caption(config: Mapping[str, Any] | None) -> str:
    """``pgd, linf eps 8/255``: the method and the attack radius of a run's config.yaml ("" for
    none, as for a metrics file given alone)."""
    if not config:
        return ""
    attack = config.get("attack") or {}
    parts = [str(config.get("method", "?"))]
    if "eps" in attack:
        parts.append(f"{attack.get('norm', 'linf')} eps {eps_words(attack['eps'])}")
    return ", ".join(parts)


def check_words(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the per-epoch check measured on, from the metrics rows: ``200 held-out training
    examples`` from ``check_split``/``check_examples``; a run of an older version, which did not
    record its split, says ``held-out check`` and no more."""
    split = next((r["check_split"] for r in rows if r.get("check_split")), None)
    n = next((r.get("check_examples", r.get("n")) for r in reversed(rows)
              if isinstance(r.get("check_examples", r.get("n")), int)), None)
    if split is None:
        return f"held-out check ({n} examples)" if n else "held-out check"
    words = SPLIT_WORDS.get(str(split), f"{split} examples")
    return f"{n} {words}" if n else words


def _title(key: str, title: str, rows: Sequence[Sequence[Mapping[str, Any]]],
           configs: Sequence[Mapping[str, Any] | None]) -> str:
    if key not in PERCENT:
        return title
    where = sorted({check_words(r) for r in rows if r})
    text = f"{title}, {' / '.join(where)}" if where else title
    if key == "robust_acc":
        steps = sorted({(c.get("eval") or {}).get("steps") for c in configs if c} - {None})
        if len(steps) == 1:
            text += f", PGD-{steps[0]}"
    return text


def curves_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]],
                  configs: Sequence[Mapping[str, Any] | None] | None = None):
    """Training loss, clean and robust accuracy (%) and learning rate per epoch, one line per
    run.

    Args:
        runs: ``(name, metrics rows)`` per run; a run lacking a metric (no attack: no robust
            accuracy; the per-epoch check every k epochs) draws only the epochs it has.
        configs: each run's config (its config.yaml, None when unknown): the method and eps
            go in the title (one run) or the legend (several).

    Returns:
        the matplotlib Figure (2 x 2 panels, in :data:`PANELS` order). The accuracy axes span
        0-100 %, the learning rate's is linear for every run (schedules compare as drawn).
    """
    plt = pyplot()
    configs = list(configs) if configs is not None else [None] * len(runs)
    captions = [run_caption(c) for c in configs]
    one = len(runs) == 1
    fig, axs = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, ylabel) in zip(axs.flat, PANELS, strict=True):
        for (name, rows), caption in zip(runs, captions, strict=True):
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts, strict=True)
                if key in PERCENT:
                    ys = tuple(100 * y for y in ys)
                label = name if one or not caption else f"{name} ({caption})"
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=label)
        ax.set_title(_title(key, title, [r for _, r in runs], configs), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if key in PERCENT:
            ax.set_ylim(0, 100)
        if ax.get_lines():
            ax.legend(fontsize=7)
    # one scale for every run: a log axis for one schedule and linear for another misled
    axs.flat[3].set_yscale("linear")
    if one:
        name, caption = runs[0][0], captions[0]
        fig.suptitle(f"{name}: {caption}" if caption else name, fontsize=11)
    else:
        fig.suptitle(f"training curves of {len(runs)} runs", fontsize=11)
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
    fig = curves_figure([(Path(run_dir).name, rows)], [RunDir(run_dir).read_config()])
    return save_figure(fig, path or RunDir(run_dir).curves)


def plot_runs(runs: Sequence[str | Path], out: str | Path | None = None, *,
              overwrite: bool = False) -> Path:
    """``robust-amo plot``: the curves of one or more runs in one picture.

    Args:
        runs: run folders of ``robust-amo train``, or their metrics.jsonl files.
        out: the PNG (default: RUN/curves.png for one run folder, curves.png here for several).
        overwrite: replace an existing ``out``.

    Returns:
        the picture's path.

    Raises:
        ConfigError: a run holds no readable epochs, or ``out`` is not a .png.
        OutputError: ``out`` exists (without ``overwrite``) or cannot be written.
    """
    rows, configs = [], []
    for r in runs:
        got = read_metrics(r)
        if not got:
            raise ConfigError(f"{r} holds no metrics.jsonl with epochs; give runs as run "
                              "folders of robust-amo train", params=("runs",))
        rows.append(got)
        folder = Path(r) if Path(r).is_dir() else Path(r).parent
        configs.append(RunDir(folder).read_config())
    one_run = len(runs) == 1 and Path(runs[0]).is_dir()
    path = Path(out) if out else (RunDir(runs[0]).curves if one_run else Path("curves.png"))
    if path.suffix.lower() != ".png":
        raise ConfigError(f"out {path}: the picture is a PNG; name it FILE.png", params=("out",))
    writable_dir(path.parent, "out")
    refuse_overwrite(path.parent, [path.name], "picture", overwrite=overwrite)
    fig = curves_figure(list(zip(run_names(runs), rows, strict=True)), configs)
    save_figure(fig, path)
    log.info("curves of %d run(s) written to %s", len(runs), path)
    return path
