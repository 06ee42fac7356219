"""``robust-amo reproduce STUDY``: run a paper table or figure (a study file) cell by cell.

Example::

    robust-amo reproduce sokolic-table1 --only arch=cnn2 --only loss=hinge --seeds 0 1 \\
        --data-dir ../shared/data --workers 2

trains every run as ``robust-amo train`` in ``OUT/runs/CELL/POINT/seedS``, evaluates the
selected runs (the study's ``eval:``) and writes OUT/results.csv, OUT/table.md and OUT/STUDY.png
after every finished job. Rerun the same command to resume. The shipped studies are found by name
from any folder (``--list`` shows them). docs/reproductions.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from robust_amo.config import HeldOutSplit, check_at_least, choices, parse_override
from robust_amo.errors import ConfigError
from robust_amo.studies import (
    Options,
    estimate_s,
    find_study,
    list_study_files,
    load_study,
    parse_only,
    plan,
    run_study,
)
from robust_amo.studies.runner import check_data, eval_job, list_estimate, train_job
from robust_amo.studies.spec import base_config

from .common import DEVICE_HELP, device, refuse_renamed

NAME = "reproduce"
HELP = "reproduce a paper table or figure (a study): train, select, evaluate, tabulate"

log = logging.getLogger(__name__)

PARAM_FLAGS = {"override": "--set", "overrides": "--set", "progress": "--no-progress"}
"""Parameters whose flag is spelt otherwise (errors name the flag)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The study, what of it to run, and how many processes at once."""
    p.add_argument("study", type=str, nargs="?",
                   help="a study's name, e.g. sokolic-table1 (see --list), or a study .yaml file")
    p.add_argument("--list", action="store_true",
                   help="list the studies with the run count and estimated cost of each grid, "
                        "read from the study files alone (default: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the study and the data folder, then print the runs (and what "
                        "is done) without starting any (default: off)")
    p.add_argument("--studies-dir", type=str, metavar="DIR",
                   help="folder of your own study files (default: the studies shipped with "
                        "robust-amo, found from any folder)")
    p.add_argument("--grid", type=str, choices=["quick", "paper"], default="quick",
                   help="hyperparameter grid: quick (three values, default) or paper (the "
                        "paper's)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the study's)")
    p.add_argument("--only", type=str, action="append", default=[], metavar="AXIS=LABEL",
                   help="keep only these levels of an axis (repeat; e.g. --only arch=cnn2) "
                        "(default: every level)")
    p.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every run, e.g. --set epochs=30 (use a new "
                        "--out: the runs of another config are other runs) (default: none)")
    p.add_argument("--n-examples", type=int, metavar="N",
                   help="test images of the eval step (default: the study's eval.n_examples)")
    p.add_argument("--eval-examples", type=str, help=argparse.SUPPRESS)
    p.add_argument("--select", type=str, choices=choices(HeldOutSplit),
                   help="select hyperparameters on the test set (the papers' protocol) or on "
                        "held-out training examples (val) (default: the study's select.split)")
    p.add_argument("--out", type=str, help="study folder (default runs/studies/STUDY)")
    p.add_argument("--data-dir", type=str,
                   help="dataset folder passed to every run, checked before the first run "
                        "(default: each run's data.data_dir)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--threads", type=int,
                   help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                   help=f"device of every run: {DEVICE_HELP} (default auto)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar counting the jobs)")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _list(studies_dir: str | None) -> int:
    files = list_study_files(studies_dir)
    if not files:
        raise ConfigError(f"no study files in {studies_dir}; pass a folder of study .yaml "
                          "files, or leave out --studies-dir for the shipped studies")
    rows = []
    for f in files:
        spec = load_study(f)
        base = base_config(spec)
        counts = []
        for grid in ("quick", "paper"):
            n, seconds = list_estimate(spec, grid, base)
            counts.append(f"{grid}: {n} runs, ~{_hours(seconds)}")
        rows.append(f"{spec.name:28s} {'; '.join(counts)} on {spec.cost.device}\n"
                    f"{'':28s} {spec.title}")
    print("\n".join(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    """List, dry-run or run a study."""
    refuse_renamed(args, "eval_examples", "--n-examples")
    if args.list:
        return _list(args.studies_dir)
    if not args.study:
        raise ConfigError("name a study (robust-amo reproduce --list shows them)")
    # checked before any run trains, though only the evaluations read it
    check_at_least("n_examples", args.n_examples)
    spec = load_study(find_study(args.study, args.studies_dir))
    if args.n_examples is not None and spec.eval is not None:
        spec.eval.n_examples = args.n_examples
    opts = Options(out=Path(args.out or Path("runs/studies") / spec.name), grid=args.grid,
                   seeds=args.seeds, only=parse_only(args.only, spec), select=args.select,
                   sets=[parse_override(x) for x in args.set],
                   workers=args.workers, threads=args.threads, device=args.device,
                   data_dir=args.data_dir, progress=not args.no_progress)
    if args.dry_run:
        states = plan(spec, opts)
        check_data(states, opts.data_dir)
        for s in states:
            state = ("done" if s.finished else
                     f"resume at epoch {s.epochs_done}" if s.epochs_done else "to train")
            print(f"{s.run.cell_key:32s} {s.run.point_label:36s} seed {s.run.seed}  {state:20s}"
                  f" {train_job(s, opts).describe()}")
        left = sum(not s.finished for s in states)
        print(f"{len(states)} runs, {left} to train; then robust-amo eval of the selected runs"
              if spec.eval else f"{len(states)} runs, {left} to train")
        if spec.eval and states:
            print("eval of each selected run:", eval_job(states[0], spec, opts).describe())
        print(f"estimated {_hours(estimate_s(spec, states))} on {spec.cost.device}"
              f" ({os.cpu_count()} cores here)")
        return 0
    failed = run_study(spec, opts)
    print((opts.out / "table.md").read_text())
    if failed:
        log.error("%d jobs failed; their logs are in the run folders (train.log, eval.log); "
                  "rerun the same command to retry them", failed)
        return 1
    return 0
