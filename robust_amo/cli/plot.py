"""``robust-amo plot RUN [RUN ...]``: training curves of one or more runs in one picture.

Training loss, clean and robust accuracy of the per-epoch check, and learning rate per epoch,
several runs overlaid with their folder names. ``robust-amo train`` writes the same picture of
its own run as RUN/curves.png at the end.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from robust_amo.curves import curves_figure, run_names, save_figure
from robust_amo.errors import ConfigError, OutputError
from robust_amo.outputs import writable_dir
from robust_amo.runs import RunDir, read_metrics

from .common import add_overwrite

NAME = "plot"
HELP = "plot training curves (loss, accuracy, learning rate) of one or more runs"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The runs and the picture."""
    p.add_argument("runs", type=str, nargs="+", metavar="RUN",
                   help="run folders of robust-amo train (or their metrics.jsonl)")
    p.add_argument("--out", type=str,
                   help="PNG file (default: RUN/curves.png for one run, curves.png here for "
                        "several)")
    add_overwrite(p, "picture")


def run(args: argparse.Namespace) -> int:
    """Read every run's metrics.jsonl, draw, save."""
    runs = []
    for r in args.runs:
        rows = read_metrics(r)
        if not rows:
            raise ConfigError(f"{r} holds no metrics.jsonl with epochs; pass a run folder of "
                              "robust-amo train")
        runs.append(rows)
    one_run = len(args.runs) == 1 and Path(args.runs[0]).is_dir()
    default = RunDir(args.runs[0]).curves if one_run else Path("curves.png")
    out = Path(args.out) if args.out else default
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the picture is a PNG; name it FILE.png")
    writable_dir(out.parent if str(out.parent) else Path("."))
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it, or choose another "
                          "--out")
    fig = curves_figure(list(zip(run_names(args.runs), runs, strict=True)))
    save_figure(fig, out)
    log.info("curves of %d run(s) written to %s", len(runs), out)
    return 0
