"""``robust-amo convert-checkpoint SRC DST``: between robust-amo and robustness, either way."""

from __future__ import annotations

import argparse
from pathlib import Path

from robust_amo.checkpoint.robustness_layout import ROBUST_AMO, ROBUSTNESS, convert_checkpoint
from robust_amo.data import dataset_names
from robust_amo.outputs import refuse_overwrite, writable_dir

from .common import add_overwrite, add_unsafe_load, input_shape

NAME = "convert-checkpoint"
HELP = "convert a checkpoint between robust-amo and MadryLab's robustness"

PARAM_FLAGS = {"dst": "DST"}
""":func:`convert_checkpoint`'s parameters as this command says them (errors name them; the
options' dests map to their flags)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SRC, DST, the target format and what a robustness checkpoint does not record."""
    p.add_argument("src", type=str, help="checkpoint file (or robust-amo run folder)")
    p.add_argument("dst", type=str, help="where to write the converted checkpoint")
    p.add_argument("--to", type=str, choices=[ROBUSTNESS, ROBUST_AMO],
                   help=f"target format, {ROBUSTNESS} or {ROBUST_AMO} (default: the other one "
                        "than SRC's)")
    p.add_argument("--arch", type=str,
                   help="architecture of a robustness checkpoint, which does not record it; "
                        "robust-amo archs lists them (default: the one SRC records)")
    p.add_argument("--dataset", type=str,
                   help=f"dataset of a robustness checkpoint: {', '.join(dataset_names())} "
                        "(default: the one SRC records)")
    p.add_argument("--input-shape", type=input_shape,
                   help="C,H,W of the inputs, e.g. 3,32,32 (default: the dataset's)")
    add_unsafe_load(p)
    add_overwrite(p, "file at DST")


def run(args: argparse.Namespace) -> int:
    """Auto-detect the direction, convert, write atomically."""
    dst = Path(args.dst)
    writable_dir(dst.parent, "dst")
    refuse_overwrite(dst.parent, [dst.name], "file", overwrite=args.overwrite,
                     ways="replace it (overwrite) or choose another dst",
                     params=("overwrite", "dst"))
    target = convert_checkpoint(args.src, args.dst, to=args.to, arch=args.arch,
                                dataset=args.dataset, input_shape=args.input_shape,
                                unsafe_load=args.unsafe_load)
    print(f"wrote {target} checkpoint {args.dst}")
    return 0
