"""Study files: one YAML file per paper table or figure, expanded into ordinary training runs.

A study names a base config, the axes of the table (each level a set of config overrides, some
with a hyperparameter grid that is searched and selected per table cell), the seeds, how a cell's
hyperparameter is selected, the metrics to report and the paper's values. docs/reproductions.md
describes the format key by key; configs/studies/ holds the shipped studies, found by name from
any folder (:func:`find_study`), and a study's ``base`` is a path or a shipped config's name.

Files are read with ``yaml.safe_load``; unknown keys, wrong types and names that are not safe as
folder names are one-line :class:`~robust_amo.errors.ConfigError`\\ s, as for configs.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from robust_amo import configs
from robust_amo.config import (
    HeldOutSplit,
    TrainConfig,
    check_keys,
    config_path,
    from_dict,
    load_yaml,
    parse_float,
    rename_deprecated,
)
from robust_amo.errors import ConfigError, RobustAmoError
from robust_amo.evaluation import parse_attack
from robust_amo.resolve import resolve

Grid = Literal["quick", "paper"]
MetricKind = Literal["accuracy", "error"]

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
"""Level labels name folders and table cells: letters, digits and ``._+-``."""

SELECT_METRICS = ("robust_acc", "clean_acc", "train_acc")
"""The per-epoch metrics of metrics.jsonl a cell can be selected by (the largest wins, so
accuracies only): the per-epoch check's ``clean_acc`` and ``robust_acc`` and the training
accuracy ``train_acc`` (written by :func:`robust_amo.train.train`)."""
EPOCH_METRICS = (*SELECT_METRICS, "train_loss", "lr", "epoch")
"""The per-epoch metrics a ``best.KEY`` metric can report."""


@dataclass
class LevelSpec:
    """One level of an axis: its label, config overrides, and per-grid hyperparameters.

    ``grid`` maps a grid name (``quick``, ``paper``) to ``{dotted.key: [values]}``; the runs of a
    table cell are the product of its levels' grids, selected per cell (:class:`SelectSpec`).
    ``cost`` multiplies the study's per-epoch cost estimate for runs of this level.
    """

    label: str
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    cost: float = 1.0


@dataclass
class AxisSpec:
    """A table axis: its name (for ``--only NAME=LABEL``) and its levels, in table order."""

    name: str
    levels: list[LevelSpec]


@dataclass
class SelectSpec:
    """How a table cell's grid point is chosen: the largest mean over seeds of ``by``.

    ``by`` is a per-epoch metric of metrics.jsonl (a run scores its best epoch, the one best.pt
    holds). ``split: test`` is the papers' protocol (optimistic: the test set picks the
    hyperparameter); ``val`` holds ``val_size`` training examples out, selects on them and
    reports test numbers from ``robust-amo eval`` of the selected runs.
    """

    by: str = "robust_acc"
    split: HeldOutSplit = "test"
    val_size: int = 1000


@dataclass
class MetricSpec:
    """A reported number, in percent: ``source`` is ``best.KEY`` (metrics.jsonl at the best
    epoch, on the per-epoch check's split) or ``eval.ATTACK`` (the study's eval step: ``clean``
    or an attack name of ``robust-amo eval``); ``paper`` maps a table cell (its labels joined by
    ``/`` in axis order) to the paper's value. ``kind: error`` reports 100 minus the accuracy
    (the papers' tables of error rates)."""

    name: str
    source: str
    kind: MetricKind = "accuracy"
    paper: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalSpec:
    """``robust-amo eval`` of every selected run's checkpoint (``which``) on the test split."""

    attacks: list[str] = field(default_factory=lambda: ["pgd50"])
    n_examples: int | None = 1000
    batch_size: int = 256
    which: Literal["best", "last"] = "best"


@dataclass
class TableSpec:
    """Which axes run down the rows and which across the columns (together: every axis)."""

    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


@dataclass
class CostSpec:
    """What ``--list`` estimates from: seconds per epoch of a run on ``device`` with
    ``reference_examples`` training examples (scaled by a run's ``data.train_subset``), and
    seconds per evaluated run."""

    device: str = "1 CPU thread"
    epoch_s: float = 1.0
    reference_examples: int | None = None
    eval_s: float = 0.0


@dataclass
class StudySpec:
    """A study file, checked (see the module docstring)."""

    name: str
    title: str
    axes: list[AxisSpec]
    metrics: list[MetricSpec]
    paper: str = ""
    notes: str = ""
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[str, list[int]] = field(default_factory=lambda: {"quick": [0], "paper": [0]})
    select: SelectSpec = field(default_factory=SelectSpec)
    eval: EvalSpec | None = None
    table: TableSpec = field(default_factory=TableSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    path: str = ""


@dataclass(frozen=True)
class Run:
    """One training run of a study: a table cell (one label per axis), a grid point, a seed.

    ``overrides`` are the config mappings applied, in order, after the base file.
    """

    cell: tuple[str, ...]
    point: tuple[tuple[str, Any], ...]
    seed: int
    overrides: tuple[dict[str, Any], ...]
    cost: float

    @property
    def cell_key(self) -> str:
        """The table cell as the paper values name it: labels joined by ``/``."""
        return "/".join(self.cell)

    @property
    def point_label(self) -> str:
        """The grid point as text (``lam_lm=0.1,weight_decay=0``), or ``default``."""
        return ",".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in self.point) \
            or "default"

    def folder(self, root: Path) -> Path:
        """The run folder under ``root``: ``CELL/POINT/seedS``."""
        return root / "-".join(self.cell) / self.point_label / f"seed{self.seed}"


def format_value(v: Any) -> str:
    """A grid value as it appears in folder names and tables (``1e-05``, ``0.1``, ``true``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def dotted(key: str, value: Any) -> dict[str, Any]:
    """``("optim.lr", 0.1)`` -> ``{"optim": {"lr": 0.1}}``."""
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _need(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key {key}")
    return data[key]


def _entries(raw: Any, where: str, keys: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``(where[i], item)`` of a non-empty list of mappings with only ``keys``."""
    shown = "{" + ", ".join(keys) + "}"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where} must be a non-empty list of {shown}")
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - set(keys):
            raise ConfigError(f"{where}[{i}]: expected {shown}, got {item!r}")
    return [(f"{where}[{i}]", item) for i, item in enumerate(raw)]


def _label(text: Any, where: str) -> str:
    if not isinstance(text, str) or not LABEL.match(text):
        raise ConfigError(f"{where}: label {text!r} must be letters, digits and ._+- (it names "
                          "a folder), e.g. cnn2 or 1024")
    return text


def _grid(raw: Any, where: str) -> dict[str, dict[str, list[Any]]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.grid: expected a mapping of grid names (quick, paper) to "
                          f"{{key: [values]}}, got {raw!r}")
    out: dict[str, dict[str, list[Any]]] = {}
    for name, keys in raw.items():
        if name not in ("quick", "paper"):
            raise ConfigError(f"{where}.grid: {name!r} is not one of quick, paper")
        if not isinstance(keys, dict) or not keys:
            raise ConfigError(f"{where}.grid.{name}: expected {{key: [values]}}, got {keys!r}")
        for k, vals in keys.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{where}.grid.{name}.{k}: expected a non-empty list of "
                                  f"values, got {vals!r}")
        out[name] = {k: list(v) for k, v in keys.items()}
    return out


def parse_study(data: dict[str, Any], source: str) -> StudySpec:
    """Check a study mapping (from :func:`load_study`) and build its :class:`StudySpec`."""
    check_keys(data, source=source)
    known = {"name", "title", "paper", "notes", "base", "config", "cells", "axes", "seeds",
             "select", "metrics", "eval", "table", "cost"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown study key {unknown[0]}; valid keys: "
                          f"{', '.join(sorted(known))}")
    name = _label(_need(data, "name", source), f"{source}: name")
    axes = []
    for where, a in _entries(_need(data, "axes", source), f"{source}: axes", ("name", "levels")):
        aname = _label(_need(a, "name", where), where)
        levels = []
        for lw, lv in _entries(_need(a, "levels", where), f"{where}.levels",
                               ("label", "set", "grid", "cost")):
            lset = lv.get("set", {})
            if not isinstance(lset, dict):
                raise ConfigError(f"{lw}.set: expected a mapping of config overrides")
            levels.append(LevelSpec(label=_label(_need(lv, "label", lw), lw), set=lset,
                                    grid=_grid(lv.get("grid", {}), lw),
                                    cost=parse_float(lv.get("cost", 1.0), f"{lw}.cost")))
        labels = [lv.label for lv in levels]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: level labels repeat: {labels}")
        axes.append(AxisSpec(aname, levels))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: axis names repeat: {names}")

    raw_metrics = _need(data, "metrics", source)
    if not isinstance(raw_metrics, list) or not raw_metrics:
        raise ConfigError(f"{source}: metrics must be a non-empty list of {{name, source}}")
    metrics = []
    for i, m in enumerate(raw_metrics):
        if not isinstance(m, dict):
            raise ConfigError(f"{source}: metrics[{i}]: expected a mapping, got {m!r}")
        metrics.append(from_dict(MetricSpec, m, prefix=f"metrics[{i}]."))
    for m in metrics:
        kind, _, key = m.source.partition(".")
        if kind not in ("best", "eval") or not key:
            raise ConfigError(f"{source}: metric {m.name}: source {m.source!r} must be best.KEY "
                              "(e.g. best.clean_acc) or eval.ATTACK (e.g. eval.pgd50)")
        m.paper = {k: parse_float(v, f"metric {m.name}: paper[{k}]") for k, v in m.paper.items()}

    seeds = data.get("seeds", {"quick": [0], "paper": [0]})
    if not isinstance(seeds, dict) or set(seeds) - {"quick", "paper"} or not all(
            isinstance(s, list) and s and all(isinstance(x, int) and not isinstance(x, bool)
                                              and x >= 0 for x in s) for s in seeds.values()):
        raise ConfigError(f"{source}: seeds must map quick and paper to lists of seeds >= 0, "
                          f"got {seeds!r}")
    spec = StudySpec(
        name=name, title=str(_need(data, "title", source)), axes=axes, metrics=metrics,
        paper=str(data.get("paper", "")), notes=str(data.get("notes", "")),
        base=data.get("base"), config=data.get("config") or {},
        cells=data.get("cells") or {}, seeds=seeds,
        select=from_dict(SelectSpec, data.get("select") or {}, prefix="select."),
        eval=from_dict(EvalSpec, data["eval"], prefix="eval.") if data.get("eval") else None,
        table=from_dict(TableSpec, data.get("table") or {}, prefix="table."),
        cost=from_dict(CostSpec, data.get("cost") or {}, prefix="cost."),
        path=source,
    )
    if spec.base is not None and not isinstance(spec.base, str):
        raise ConfigError(f"{source}: base must be a config file path or a shipped config's "
                          f"name, got {spec.base!r}")
    if not isinstance(spec.config, dict):
        raise ConfigError(f"{source}: config must be a mapping of config overrides")
    if not spec.table.rows and not spec.table.columns:
        spec.table = TableSpec(rows=names[:-1], columns=names[-1:])
    placed = spec.table.rows + spec.table.columns
    if sorted(placed) != sorted(names):
        raise ConfigError(f"{source}: table.rows and table.columns must name every axis once "
                          f"({', '.join(names)}), got rows {spec.table.rows} and columns "
                          f"{spec.table.columns}")
    if spec.select.val_size < 1:
        raise ConfigError(f"{source}: select.val_size must be >= 1")
    if spec.select.by not in SELECT_METRICS:
        raise ConfigError(f"{source}: select.by {spec.select.by!r} is no per-epoch accuracy of "
                          f"metrics.jsonl; use one of {', '.join(SELECT_METRICS)}")
    _check_eval(spec)
    cells = {"/".join(c) for c in itertools.product(*[[lv.label for lv in a.levels]
                                                      for a in axes])}
    if not isinstance(spec.cells, dict) or not all(isinstance(v, dict)
                                                   for v in spec.cells.values()):
        raise ConfigError(f"{source}: cells must map a table cell (labels joined by /) to "
                          "config overrides")
    stray_cells = sorted(set(spec.cells) - cells)
    if stray_cells:
        raise ConfigError(f"{source}: cells: {stray_cells[0]!r} is no table cell (cells are "
                          f"labels joined by /, e.g. {sorted(cells)[0]})")
    for m in metrics:
        stray = sorted(set(m.paper) - cells)
        if stray:
            raise ConfigError(f"{source}: metric {m.name}: paper value for {stray[0]!r}, which "
                              f"is no table cell (cells are labels joined by /, e.g. "
                              f"{sorted(cells)[0]})")
    return spec


def _check_eval(spec: StudySpec) -> None:
    """The eval step's attacks exist and its counts are >= 1; every metric names something
    the runs measure: a per-epoch metric (``best.KEY``) or ``clean`` or an attack of the eval
    step (``eval.ATTACK``)."""
    source = spec.path
    ev = spec.eval
    names: list[str] = ["clean"]
    if ev is not None:
        if not isinstance(ev.attacks, list) or not ev.attacks:
            raise ConfigError(f"{source}: eval.attacks must be a non-empty list of attack "
                              "names, e.g. [pgd50, autoattack]")
        names = [a.strip().lower() for v in ev.attacks for a in str(v).split(",") if a.strip()]
        for name in names:
            try:
                # eps does not decide whether a name exists; the checkpoint's eps is used later
                parse_attack(name, eps=0.1)
            except ConfigError as e:
                raise ConfigError(f"{source}: eval.attacks: {e}") from None
        for key, value in (("n_examples", ev.n_examples), ("batch_size", ev.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{source}: eval.{key} must be >= 1, got {value} (leave "
                                  "n_examples out for the whole test split)")
        names = ["clean", *(n for n in names if n != "clean")]
    for m in spec.metrics:
        kind, _, key = m.source.partition(".")
        if kind == "best" and key not in EPOCH_METRICS:
            raise ConfigError(f"{source}: metric {m.name}: {m.source} is no per-epoch metric "
                              f"of metrics.jsonl; use best. with one of "
                              f"{', '.join(EPOCH_METRICS)}")
        if kind == "eval" and key.lower() not in names:
            raise ConfigError(f"{source}: metric {m.name}: {m.source} names no attack of the "
                              f"eval step (eval.attacks: {', '.join(names[1:]) or 'none'}); "
                              f"use eval. with one of {', '.join(names)}, or add the attack")


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file (one-line ConfigErrors, as for configs)."""
    p = Path(path)
    return parse_study(load_yaml(p), str(p))


def find_study(name_or_path: str, studies_dir: str | Path | None = None) -> Path:
    """The study file for ``name_or_path``: an existing file, else a study of that name.

    Args:
        name_or_path: a study file's path (an existing path wins), or a name such as
            ``sokolic-table1`` (``.yaml`` optional).
        studies_dir: the folder whose studies the names are; None: the studies shipped with
            the package, found from any folder.

    Raises:
        ConfigError: no such file or study; the message lists the known names.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    if studies_dir is None:
        found = configs.find_study(name_or_path)
        where = "the shipped studies"
    else:
        d = Path(studies_dir)
        found = next((c for c in (d / name_or_path, d / f"{name_or_path}.yaml",
                                  d / f"{name_or_path}.yml") if c.suffix in configs.SUFFIXES
                      and c.is_file()), None)
        where = str(d)
    if found is not None:
        return found
    known = ", ".join(s.stem for s in list_study_files(studies_dir)) or "none"
    raise ConfigError(f"no study {name_or_path!r}: no such file, nor a study in {where} "
                      f"(known: {known}); pass a study file or studies_dir",
                      params=("studies_dir",))


def list_study_files(studies_dir: str | Path | None = None) -> list[Path]:
    """The study files of a folder (None: the shipped studies), sorted by name."""
    d = configs.root() / configs.STUDIES if studies_dir is None else Path(studies_dir)
    return sorted(f for f in d.iterdir() if f.suffix in configs.SUFFIXES and f.is_file()) \
        if d.is_dir() else []


def parse_only(items: list[str], spec: StudySpec) -> dict[str, set[str]]:
    """``["samples=256", "samples=512", "arch=cnn2"]`` -> ``{"samples": {...}, "arch": {...}}``,
    each name and label checked against the study's axes."""
    axes = {a.name: {lv.label for lv in a.levels} for a in spec.axes}
    out: dict[str, set[str]] = {}
    for item in items:
        name, sep, label = item.partition("=")
        if not sep or name not in axes:
            raise ConfigError(f"only {item!r}: expected AXIS=LABEL with AXIS one of "
                              f"{', '.join(axes)}", params=("only",))
        if label not in axes[name]:
            raise ConfigError(f"only {item!r}: {name} has no level {label!r} (levels: "
                              f"{', '.join(sorted(axes[name]))})", params=("only",))
        out.setdefault(name, set()).add(label)
    return out


def expand(spec: StudySpec, grid: Grid = "quick", seeds: list[int] | None = None,
           only: dict[str, set[str]] | None = None, select: HeldOutSplit | None = None,
           sets: list[dict[str, Any]] | None = None) -> list[Run]:
    """Every run of the study: the product of the axes' levels, of each cell's grid, of seeds.

    A level without the requested ``grid`` uses its ``quick`` grid (if any), so a level whose
    hyperparameters the paper fixed has one point. ``only`` keeps the levels named per axis.
    ``select`` (default: the study's) adds the held-out split to every run under ``val``.
    ``sets`` (``--set``) override every run's config after the study's own settings.
    """
    seeds = seeds if seeds else spec.seeds.get(grid) or spec.seeds.get("quick") or [0]
    select = select or spec.select.split
    extra: dict[str, Any] = {}
    if select == "val":
        extra = {"data": {"val_size": spec.select.val_size}, "eval": {"split": "val"}}
    levels = [[lv for lv in a.levels if not only or a.name not in only
               or lv.label in only[a.name]] for a in spec.axes]
    runs = []
    for combo in itertools.product(*levels):
        keys: dict[str, list[Any]] = {}
        for lv in combo:
            keys.update(lv.grid.get(grid) or lv.grid.get("quick") or {})
        cost = math.prod(lv.cost for lv in combo)
        for values in itertools.product(*keys.values()):
            point = tuple(zip(keys, values, strict=True))
            for seed in seeds:
                cell = "/".join(lv.label for lv in combo)
                overrides = [spec.config, *(lv.set for lv in combo), spec.cells.get(cell, {}),
                             *(dotted(k, v) for k, v in point), extra, *(sets or []),
                             {"seed": seed}]
                runs.append(Run(tuple(lv.label for lv in combo), point, seed,
                                tuple(o for o in overrides if o), cost))
    return runs


def base_path(spec: StudySpec) -> Path | None:
    """The study's base config file: a path (absolute, or relative to the study file) when it
    exists, else a shipped config's name (:func:`robust_amo.config.config_path`).

    Raises:
        ConfigError: neither; the message lists the shipped configs.
    """
    if spec.base is None:
        return None
    p = Path(spec.base)
    beside = p if p.is_absolute() else Path(spec.path).parent / p
    return beside if beside.exists() else config_path(spec.base)


def base_config(spec: StudySpec) -> dict[str, Any]:
    """The study's base config file as a mapping (read once; ``{}`` without a base)."""
    path = base_path(spec)
    if path is None:
        return {}
    return rename_deprecated(load_yaml(path), f"config file {path}")


def resolve_run(spec: StudySpec, run: Run, out: Path,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """The run's resolved training config (registries checked), written to ``out``.

    Args:
        base: the study's :func:`base_config`, when the caller has read it already (a study of
            thousands of runs reads its base file once, not once per run).

    Raises:
        RobustAmoError: the config error of the run (an unknown key, value or architecture),
            naming the study file, the table cell and the grid point.
    """
    overrides = [base if base is not None else base_config(spec), *run.overrides,
                 {"out": str(out)}]
    try:
        return resolve(None, overrides)
    except RobustAmoError as e:
        raise type(e)(f"{spec.path}: cell {run.cell_key} ({run.point_label}, seed "
                      f"{run.seed}): {e}", params=e.params) from None


def train_numbers(base: dict[str, Any], run: Run) -> tuple[int, int | None]:
    """The run's ``epochs`` and ``data.train_subset`` from its mappings alone, without
    resolving its config (what ``--list`` needs for its estimate; an unreadable value counts
    as the default)."""
    default = TrainConfig()
    epochs, subset = default.epochs, default.data.train_subset
    for o in (base, *run.overrides):
        if isinstance(o.get("epochs"), int):
            epochs = o["epochs"]
        data = o.get("data")
        if isinstance(data, dict) and "train_subset" in data:
            v = data["train_subset"]
            subset = v if isinstance(v, int) or v is None else subset
    return epochs, subset

