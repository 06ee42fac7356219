"""``robust-amo plot RUN [RUN ...]``: training curves of one or more runs in one picture.

Training loss, clean and robust accuracy of the per-epoch check, and learning rate per epoch,
several runs overlaid with their folder names. ``robust-amo train`` writes the same picture of
its own run as RUN/curves.png at the end.
"""

from __future__ import annotations

import argparse

from robust_amo.curves import plot_runs

from .common import add_overwrite

NAME = "plot"
HELP = "plot training curves (loss, accuracy, learning rate) of one or more runs"

PARAM_FLAGS = {"runs": "RUN"}
""":func:`robust_amo.curves.plot_runs`'s parameters as this command says them."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The runs and the picture."""
    p.add_argument("runs", type=str, nargs="+", metavar="RUN",
                   help="run folders of robust-amo train (or their metrics.jsonl)")
    p.add_argument("--out", type=str,
                   help="PNG file (default: RUN/curves.png for one run, curves.png here for "
                        "several)")
    add_overwrite(p, "picture")


def run(args: argparse.Namespace) -> int:
    """Draw and save (:func:`robust_amo.curves.plot_runs`)."""
    plot_runs(args.runs, args.out, overwrite=args.overwrite)
    return 0
