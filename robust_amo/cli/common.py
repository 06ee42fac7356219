"""Option types and checks shared by the commands."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

from robust_amo.checkpoint import UNSAFE_FLAG
from robust_amo.config import SplitName, choices, parse_float
from robust_amo.data import dataset_names
from robust_amo.errors import ConfigError, RobustAmoError

DEVICE_HELP = "auto|cpu|cuda[:N]; auto is cuda when a CUDA device is available, else cpu"
"""What ``--device`` takes, said the same way by every command."""


def device(text: str) -> str:
    """argparse type for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (e.g. cuda:1), "
                                         f"got {text!r}")
    return text


def refuse_renamed(args: argparse.Namespace, old: str, new: str) -> None:
    """ConfigError naming ``new`` when the renamed flag ``old`` (its dest) was given."""
    if getattr(args, old, None) is not None:
        flag = "--" + old.replace("_", "-")
        raise ConfigError(f"{flag} was renamed {new}; pass {new} N")


def input_shape(text: str) -> list[int]:
    """argparse type for ``C,H,W`` such as ``3,32,32``."""
    try:
        shape = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers C,H,W, got {text!r}")
    return shape


def floats(text: str) -> list[float]:
    """argparse type for comma-separated numbers such as ``0.5,0.5,0.5``."""
    try:
        return [parse_float(t, "value") for t in text.split(",")]
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.5,0.5,0.5, got "
                                         f"{text!r}") from None


def flags_of(parser: argparse.ArgumentParser, aliases: Mapping[str, str] | None = None
             ) -> dict[str, str]:
    """Parameter name -> flag for the library parameters a command's flags set.

    Every option's ``dest`` maps to its long flag (``step_size`` -> ``--step-size``);
    ``aliases`` adds parameters spelt otherwise (``attacks`` -> ``--attack``).
    """
    out = {a.dest: a.option_strings[-1] for a in parser._actions
           if a.option_strings and a.option_strings[-1].startswith("--")}
    out.update(aliases or {})
    return out


def flag_message(error: RobustAmoError, flags: Mapping[str, str]) -> str:
    """The one-line message of a library error with each parameter it names said as its flag.

    The first whole-word occurrence of each of ``error.params`` that ``flags`` knows is
    replaced (``eps must be >= 0`` -> ``--eps must be >= 0``); everything else is kept. A word
    inside a path (``runs/out/x``) or a dotted key (``data.out``) is not a parameter.
    """
    text = str(error)
    for param in getattr(error, "params", ()):
        flag = flags.get(param)
        if flag is not None:
            text = re.sub(rf"(?<![\w./\\-]){re.escape(param)}(?![\w/\\-])", flag, text,
                          count=1)
    return text


def checkpoint_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of :class:`robust_amo.evaluation.CheckpointRequest` from the flags that
    ``eval`` and ``margins`` share (:func:`add_checkpoint_options`, ``--step-size``,
    ``--overwrite``), by name."""
    return {
        "checkpoint": args.checkpoint, "model": args.model, "weights": args.weights,
        "mean": args.mean, "std": args.std, "input_shape": args.input_shape,
        "which": args.which, "arch": args.arch, "dataset": args.dataset,
        "data_dir": args.data_dir, "split": args.split, "n_examples": args.n_examples,
        "eps": args.eps, "norm": args.norm, "step_size": args.step_size,
        "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
        "progress": not args.no_progress, "unsafe_load": args.unsafe_load,
        "overwrite": args.overwrite,
    }


def add_checkpoint_options(p: argparse.ArgumentParser, *, n_examples: int | None,
                           batch_size: int) -> None:
    """The options of commands that analyse a checkpoint (``eval``, ``margins``), spelt alike.

    They set the fields of :class:`robust_amo.evaluation.CheckpointRequest`.
    """
    p.add_argument("--checkpoint", type=str,
                   help="run folder of `robust-amo train` or of robustness's train_model, or a "
                        ".pt file; required unless --model is given (no default)")
    own = p.add_argument_group("your own model (instead of --checkpoint)")
    own.add_argument("--model", type=str, metavar="FILE.py:FN|package.module:FN",
                     help="a function returning your nn.Module (called with num_classes= when "
                          "it accepts it), instead of --checkpoint (default: none); THIS RUNS "
                          "THE CODE IN THAT FILE OR MODULE")
    own.add_argument("--weights", type=str, metavar="FILE|none",
                     help="weights for --model, required with it (no default): a state dict or "
                          "a checkpoint file (read safely), or none to use the module as FN "
                          "returns it (random initial weights unless FN loads its own; "
                          "recorded in the report)")
    own.add_argument("--mean", type=floats, help="per-channel mean the model expects, e.g. "
                     "0.4914,0.4822,0.4465 (we normalise inside; inputs stay in [0, 1]; "
                     "default: none, the model gets [0, 1] inputs)")
    own.add_argument("--std", type=floats, help="per-channel std the model expects, positive "
                     "(default: none; give both or neither)")
    own.add_argument("--input-shape", type=input_shape,
                     help="C,H,W of the model's inputs (default: the dataset's)")
    p.add_argument("--which", type=str, choices=["last", "best"], default="last",
                   help="checkpoint of a run folder: last (checkpoint.pt, default) or best "
                        "(best.pt)")
    p.add_argument("--arch", type=str,
                   help="architecture of a robustness-library checkpoint, one of `robust-amo "
                        "archs` (default: the one the checkpoint records)")
    p.add_argument("--dataset", type=str,
                   help=f"dataset: {', '.join(dataset_names())} (default: the checkpoint's)")
    p.add_argument("--data-dir", type=str, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", type=str, choices=choices(SplitName), default="test",
                   help="test split, the run's held-out val split, or the training split "
                        "(default: test)")
    shown = "all" if n_examples is None else str(n_examples)
    p.add_argument("--n-examples", type=int, default=n_examples,
                   metavar="N", help=f"use the first N examples of the split (default: {shown})")
    p.add_argument("--eps", type=str,
                   help="radius, e.g. 8/255 (default: the checkpoint's training attack)")
    p.add_argument("--norm", type=str, choices=["linf", "l2"],
                   help="threat model (default: the checkpoint's training norm)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"examples per batch (default {batch_size})")
    p.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                   help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the attacks' random starts (default 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the log lines of each step stay)")
    add_unsafe_load(p)
    add_overwrite(p, "report")


UNSAFE_HELP = ("unpickle a checkpoint that holds objects other than tensors and plain containers;"
               " this RUNS CODE FROM THE FILE: only for files from a source you trust")


def add_unsafe_load(p: argparse.ArgumentParser) -> None:
    """``--unsafe-load``: the one way to read a file that needs full unpickling."""
    p.add_argument(UNSAFE_FLAG, action="store_true", help=UNSAFE_HELP)


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace the results an earlier run left in the output folder."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an earlier {what} in the output folder (refused without it)")
