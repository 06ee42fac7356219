"""The ``robust-amo`` command line: ``train``, ``eval``, ``archs``.

Every option has a type; ``--set KEY=VALUE`` reaches any config key (``--set attack.eps=8/255``).
Errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RobustAmoError

log = logging.getLogger("robust_amo")

Handler = Callable[[argparse.Namespace], int]
# subcommands added by other modules: name -> (add_arguments, handler, help)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``handler(args) -> exit status`` as ``robust-amo NAME``."""

    def deco(fn: Handler) -> Handler:
        SUBCOMMANDS[name] = (add_arguments, fn, help)
        return fn

    return deco


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=str, help="YAML config file (see configs/)")
    p.add_argument("--arch", type=str, help="architecture, e.g. wrn28-10 (robust-amo archs)")
    p.add_argument("--dataset", type=str,
                   help="cifar10, cifar100, mnist, fashion-mnist or digits")
    p.add_argument("--data-dir", type=str, help="folder with the dataset (.npz or torchvision)")
    p.add_argument("--method", type=str, help="standard, pgd, ... (docs/methods.md)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--lr", type=str, help="initial learning rate (e.g. 0.1)")
    p.add_argument("--eps", type=str, help="training attack radius, e.g. 8/255")
    p.add_argument("--out", type=str, help="run folder for checkpoints, config and metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset into --data-dir")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], help="device")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 on CUDA")
    p.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.milestones=[50,100]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_overrides(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .config import parse_override

    flat = {"arch": args.arch, "dataset": args.dataset, "method": args.method,
            "epochs": args.epochs, "batch_size": args.batch_size, "out": args.out,
            "device": args.device, "seed": args.seed}
    o: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
    if args.data_dir is not None:
        o.setdefault("data", {})["data_dir"] = args.data_dir
    if args.download:
        o.setdefault("data", {})["download"] = True
    if args.lr is not None:
        o.setdefault("optim", {})["lr"] = args.lr
    if args.eps is not None:
        o.setdefault("attack", {})["eps"] = args.eps
    if args.no_bf16:
        o["bf16"] = False
    return [o] + [parse_override(s) for s in args.set]


@subcommand("train", "train a model (standard, PGD, ...)", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    """``robust-amo train``: resolve the config, train, report where the run is."""
    from .config import resolve
    from .train import train

    cfg = resolve(args.config, _train_overrides(args))
    metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
    log.info("done: run folder %s; last epoch %s", cfg.out, metrics)
    return 0


@subcommand("archs", "list the registered architectures", lambda p: None)
def cmd_archs(args: argparse.Namespace) -> int:
    """``robust-amo archs``: one registered name per line."""
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand."""
    from evaluation import commands as _eval_commands  # noqa: F401  (registers `eval`)

    from . import __version__

    parser = argparse.ArgumentParser(prog="robust-amo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"robust-amo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, handler, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robust-amo`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("robust_amo", "attacks", "evaluation"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.handler(args)
    except RobustAmoError as e:
        print(f"robust-amo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robust-amo: interrupted; resume with the same command and --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run through the imported module so that subcommands registered by other modules (they
    # import robust_amo.cli, not __main__) are seen
    from robust_amo.cli import main as _main

    sys.exit(_main())
