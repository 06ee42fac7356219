"""A study's results: the state of every run, the per-cell selection, results.csv, table.md and
the plot.

Numbers are percentages. A run's *score* is its selection metric at its best epoch (the epoch
best.pt holds); a table cell's grid point is the one with the largest mean score over its seeds
(ties: the first in grid order), and the cell reports the mean ± sample standard deviation over
the seeds of that point.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robust_amo.config import TrainConfig
from robust_amo.curves import png_bytes, pyplot
from robust_amo.errors import ConfigError, OutputError
from robust_amo.evaluation.report import Report
from robust_amo.outputs import atomic_write
from robust_amo.runs import RunDir, epochs_done

from .spec import MetricSpec, Run, StudySpec

log = logging.getLogger(__name__)

REPORT = Path("eval") / "study.json"
"""Where the study's eval step writes a run's report, inside the run folder."""


@dataclass
class RunState:
    """What a run folder says about one run of a study."""

    run: Run
    folder: Path
    cfg: TrainConfig
    epochs_done: int = 0
    score: float = math.nan
    best: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, float] = field(default_factory=dict)
    failed: str = ""
    train_s: float = math.nan

    @property
    def finished(self) -> bool:
        """All epochs are done (and logged)."""
        return self.epochs_done >= self.cfg.epochs

    @property
    def evaluated(self) -> bool:
        """The study's eval report exists."""
        return (self.folder / REPORT).is_file()


def refresh(state: RunState, by: str) -> RunState:
    """Re-read ``state``'s run folder: epochs done, best epoch by ``by``, eval report."""
    rows = RunDir(state.folder).read_metrics()
    state.epochs_done = epochs_done(rows)
    times = [r.get("train_time_s") for r in rows]
    state.train_s = sum(t for t in times if isinstance(t, (int, float))) if rows else math.nan
    best, best_row = -math.inf, {}
    for r in rows:
        v = r.get(by)
        if isinstance(v, (int, float)) and math.isfinite(v) and v > best:
            best, best_row = float(v), r  # strict >: the first best epoch, as train's best.pt
    state.score = 100 * best if best_row else math.nan
    state.best = best_row
    state.evals = {}
    report_path = state.folder / REPORT
    if report_path.is_file():
        try:
            report = Report.read(report_path)
        except OutputError as e:
            log.warning("unreadable report %s (%s): its numbers are left out", report_path, e)
        else:
            state.evals["clean"] = 100 * float(report.clean_accuracy)
            for name, a in report.attacks.items():
                if name != "clean":
                    state.evals[name] = 100 * float(a.robust_accuracy)
    return state


def metric_source(metric: MetricSpec, select_split: str) -> str:
    """The source of ``metric`` under the selection split: with ``val``, the per-epoch check
    ran on held-out training examples, so ``best.clean_acc`` comes from the eval step on test."""
    if select_split == "val" and metric.source.startswith("best."):
        if metric.source != "best.clean_acc":
            raise ConfigError(f"metric {metric.name}: {metric.source} is measured on the "
                              "selection split under select val; report an eval.ATTACK "
                              "instead", params=("select",))
        return "eval.clean"
    return metric.source


def metric_value(state: RunState, source: str, kind: str = "accuracy") -> float:
    """The value (percent) of ``source`` for one run, as an error rate for ``kind="error"``;
    NaN when not (yet) measured."""
    where, _, key = source.partition(".")
    if where == "best":
        v = state.best.get(key)
        value = 100 * float(v) if isinstance(v, (int, float)) else math.nan
    else:
        value = state.evals.get(key, math.nan)
    return 100 - value if kind == "error" else value


@dataclass
class Selection:
    """A table cell's chosen grid point and its runs (one per seed)."""

    cell: str
    point: str
    runs: list[RunState]
    complete: bool
    means: dict[str, float]


def select(states: list[RunState]) -> dict[str, Selection]:
    """Per table cell: the grid point with the largest mean score over its finished seeds."""
    cells: dict[str, dict[str, list[RunState]]] = {}
    for s in states:
        cells.setdefault(s.run.cell_key, {}).setdefault(s.run.point_label, []).append(s)
    out = {}
    for cell, points in cells.items():
        means = {}
        for label, runs in points.items():
            scores = [r.score for r in runs if r.finished and math.isfinite(r.score)]
            means[label] = statistics.fmean(scores) if scores else math.nan
        scored = [p for p in points if math.isfinite(means[p])]
        best = max(scored, key=lambda p: means[p]) if scored else next(iter(points))
        complete = all(r.finished for runs in points.values() for r in runs)
        out[cell] = Selection(cell, best, points[best], complete, means)
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def results_csv(spec: StudySpec, states: list[RunState], chosen: dict[str, Selection],
                select_split: str, root: Path | None = None) -> str:
    """One row per run: its cell, grid point, seed, progress, score and every metric; run
    folders relative to ``root`` (the study folder) when they lie inside it."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = [a.name for a in spec.axes]
    metrics = spec.metrics
    w.writerow([*axes, "point", "seed", "epochs_done", "epochs", "finished",
                f"score_{spec.select.by}", "selected", "best_epoch", "train_s",
                *[m.name for m in metrics], "run_dir"])
    for s in states:
        sel = chosen.get(s.run.cell_key)
        is_sel = sel is not None and sel.point == s.run.point_label
        w.writerow([*s.run.cell, s.run.point_label, s.run.seed, s.epochs_done, s.cfg.epochs,
                    s.finished, _fmt(s.score, 3), is_sel, s.best.get("epoch", ""),
                    _fmt(s.train_s, 1),
                    *[_fmt(metric_value(s, metric_source(m, select_split), m.kind), 3)
                      for m in metrics], _relative(s.folder, root)])
    return buf.getvalue()


def _relative(folder: Path, root: Path | None) -> str:
    if root is not None and folder.is_relative_to(root):
        return folder.relative_to(root).as_posix()
    return folder.as_posix()


def _cell_key(spec: StudySpec, labels: dict[str, str]) -> str:
    return "/".join(labels[a.name] for a in spec.axes)


def _combos(spec: StudySpec, names: list[str], present: set[str]) -> list[dict[str, str]]:
    """The label combinations of axes ``names`` (in axis order) that occur in ``present``."""
    out: list[dict[str, str]] = [{}]
    for n in names:
        axis = next(a for a in spec.axes if a.name == n)
        out = [{**c, n: lv.label} for c in out for lv in axis.levels]
    return [c for c in out if any(all(p.split("/")[i] == c[a.name] for i, a in
                                      enumerate(spec.axes) if a.name in c) for p in present)]


def table_md(spec: StudySpec, chosen: dict[str, Selection], select_split: str,
             header: str) -> str:
    """The paper's table layout, per metric: ours (mean ± std over seeds, n) · paper · Δ."""
    lines = [f"# {spec.title}", "", header, ""]
    if select_split == "test":
        lines += ["Hyperparameters are selected on the **test set** (largest mean over seeds of "
                  f"the best-epoch `{spec.select.by}`), as the paper did: optimistic; "
                  "`--select val` selects on held-out training examples instead.", ""]
    else:
        lines += [f"Hyperparameters are selected on {spec.select.val_size} held-out training "
                  f"examples (best-epoch `{spec.select.by}`); the numbers are measured on the "
                  "test split by `robust-amo eval`.", ""]
    present = set(chosen)
    rows = _combos(spec, spec.table.rows, present)
    cols = _combos(spec, spec.table.columns, present)
    col_titles = [" ".join(c.values()) or "value" for c in cols]
    for m in spec.metrics:
        src = metric_source(m, select_split)
        paper_text = " · the paper's value · ours − paper" if m.paper else ""
        lines += [f"## {m.name} (%)", "",
                  f"Each entry: ours, mean ± std over seeds (n seeds){paper_text}. `…` marks a "
                  "cell whose runs are not all finished.", ""]
        lines.append("| " + " | ".join([*spec.table.rows, *col_titles]) + " |")
        lines.append("|" + "---|" * (len(spec.table.rows) + len(cols)))
        for r in rows:
            entries = []
            for c in cols:
                key = _cell_key(spec, {**r, **c})
                sel = chosen.get(key)
                if sel is None:
                    entries.append("")
                    continue
                mean, std, n = mean_std([metric_value(s, src, m.kind) for s in sel.runs])
                paper = m.paper.get(key, math.nan)
                text = f"{_fmt(mean)} ± {_fmt(std)} (n={n})" if n else "not run yet"
                if math.isfinite(paper):
                    text += f" · {_fmt(paper)} · {mean - paper:+.2f}" if n else f" · {_fmt(paper)}"
                entries.append(text + ("" if sel.complete or not n else " …"))
            lines.append("| " + " | ".join([*r.values(), *entries]) + " |")
        lines.append("")
    lines += ["## Selected grid point per cell", "",
              "| cell | selected | mean score per grid point |", "|---|---|---|"]
    for key, sel in chosen.items():
        scores = ", ".join(f"{p}: {_fmt(v)}" for p, v in sel.means.items())
        lines.append(f"| {key} | {sel.point} | {scores} |")
    lines.append("")
    return "\n".join(lines)


CellValues = dict[str, dict[str, list[float]]]
"""Per table cell (labels joined by ``/``): each metric's values, one per seed of the cell's
selected grid point (NaN where not measured)."""


def cell_values(spec: StudySpec, chosen: dict[str, Selection], select_split: str) -> CellValues:
    """The metric values of every cell's selected runs (what the plot shows)."""
    return {cell: {m.name: [metric_value(s, metric_source(m, select_split), m.kind)
                            for s in sel.runs] for m in spec.metrics}
            for cell, sel in chosen.items()}


def csv_values(spec: StudySpec, text: str) -> CellValues:
    """:func:`cell_values` read back from a results.csv (its selected rows), so a study's plot
    can be redrawn without its run folders (:func:`replot`).

    Raises:
        OutputError: the file lacks a column of the study (another study's results).
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    need = [a.name for a in spec.axes] + ["selected"] + [m.name for m in spec.metrics]
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise OutputError(f"results.csv has no column {missing[0]!r}: it holds another "
                          f"study's results than {spec.name!r}")
    out: CellValues = {}
    for r in rows:
        if r["selected"] != "True":
            continue
        cell = "/".join(r[a.name] for a in spec.axes)
        for m in spec.metrics:
            out.setdefault(cell, {}).setdefault(m.name, []).append(_float(r[m.name]))
    return out


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "—": not measured
        return math.nan


def _seeds_text(counts: set[int]) -> str:
    lo, hi = min(counts, default=0), max(counts, default=0)
    return f"n = {lo} seeds" if lo == hi else f"n = {lo} to {hi} seeds"


def plot_figure(spec: StudySpec, values: CellValues):
    """One panel per metric: per table row (x) and method (colour: a column of the table, or
    each row when the table has no columns), the mean over the seeds of the cell's selected
    grid point as a dot with whiskers of ± one sample standard deviation, and the paper's value
    as a black x. The y axis is the metric in percent; the caption under the panels says what
    dots and whiskers are and over how many seeds. Returns the matplotlib Figure."""
    plt = pyplot()
    present = set(values)
    rows = _combos(spec, spec.table.rows, present)
    cols = _combos(spec, spec.table.columns, present)
    # without column axes each row is a method of its own: its own colour and legend entry
    series = cols if spec.table.columns else [{}]
    fig, axs = plt.subplots(len(spec.metrics), 1, squeeze=False,
                            figsize=(max(6.0, 1.2 * len(rows) * max(1, len(series)) ** 0.5 + 3),
                                     3.2 * len(spec.metrics) + 0.5))
    width = 0.8 / max(1, len(series))
    counts: set[int] = set()
    any_paper = False
    for ax, m in zip(axs[:, 0], spec.metrics, strict=True):
        shown: list[float] = []
        labelled: set[str] = set()
        for j, c in enumerate(series):
            for i, r in enumerate(rows):
                key = _cell_key(spec, {**r, **c})
                if key not in values:
                    continue
                mean, std, n = mean_std(values[key].get(m.name, []))
                counts.add(n)
                x = i + (j - (len(series) - 1) / 2) * width
                colour = f"C{j if spec.table.columns else i}"
                label = " ".join((c if spec.table.columns else r).values()) or spec.name
                ax.errorbar([x], [mean], yerr=[std], fmt="o", color=colour, capsize=4,
                            markersize=6, label=None if label in labelled else label)
                labelled.add(label)
                paper = m.paper.get(key, math.nan)
                if math.isfinite(paper):
                    ax.plot([x], [paper], "kx", markersize=8,
                            label=None if "paper" in labelled else "paper")
                    labelled.add("paper")
                    any_paper = True
                shown += [mean - std, mean + std, paper]
        ax.set_xticks(range(len(rows)), [" ".join(r.values()) for r in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel(f"{m.name} (%)")
        finite = [v for v in shown if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(1.0, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.legend(fontsize=7, ncol=min(4, len(series) + 1), loc="best")
        ax.grid(axis="y", alpha=0.3)
    axs[0, 0].set_title(spec.title, fontsize=9)
    caption = textwrap.wrap(
        f"Dots: mean over seeds of each cell's selected grid point; whiskers: ± 1 sample "
        f"standard deviation ({_seeds_text(counts)}; none with 1 seed)"
        + ("; x: the paper's value." if any_paper else "."),
        width=int(14 * fig.get_figwidth()))
    height = fig.get_figheight()
    fig.text(0.5, 0.1 / height, "\n".join(caption), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, (0.2 + 0.13 * len(caption)) / height, 1, 1))
    return fig


def plot_png(spec: StudySpec, chosen: dict[str, Selection], select_split: str) -> bytes:
    """:func:`plot_figure` of the selected runs as PNG bytes."""
    return png_bytes(plot_figure(spec, cell_values(spec, chosen, select_split)))


def replot(folder: str | Path, spec: StudySpec) -> Path:
    """Redraw FOLDER/NAME.png from FOLDER/results.csv (a study folder, or its copy in
    docs/reproductions/), without the run folders; returns the picture's path.

    Raises:
        OutputError: no results.csv there, or another study's.
    """
    d = Path(folder)
    path = d / "results.csv"
    if not path.is_file():
        raise OutputError(f"{path} does not exist; give a study folder (it holds results.csv)",
                          params=("folder",))
    return atomic_write(d / f"{spec.name}.png",
                        png_bytes(plot_figure(spec, csv_values(spec, path.read_text()))))


def write_results(out: Path, spec: StudySpec, states: list[RunState], select_split: str,
                  header: str) -> dict[str, Selection]:
    """results.csv, table.md and NAME.png in ``out`` (each written atomically)."""
    chosen = select(states)
    atomic_write(out / "results.csv", results_csv(spec, states, chosen, select_split, out))
    atomic_write(out / "table.md", table_md(spec, chosen, select_split, header))
    atomic_write(out / f"{spec.name}.png", plot_png(spec, chosen, select_split))
    return chosen
