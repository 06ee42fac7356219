"""The ``robust-amo`` command line: ``train``, ``eval``, ``margins``, ``plot``, ``reproduce``,
``archs``, ``convert-checkpoint``.

One module per command, each with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit status``, listed in :data:`COMMANDS` (no registration by import side effect).
Every option has a type; errors the user can fix print one line and exit with status 2.
Flags are never abbreviated (``allow_abbrev=False``): ``--un`` is an error, not
``--unsafe-load``, so no flag that runs code is enabled by a prefix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from robust_amo.errors import RobustAmoError
from robust_amo.outputs import DISK_FULL, write_error
from robust_amo.version import __version__

from . import archs, convert, margins, plot, reproduce, train
from . import eval as evaluate
from .common import flag_message, flags_of

COMMANDS = (train, evaluate, margins, plot, reproduce, archs, convert)

DESCRIPTION = ("Adversarial training (PGD, TRADES, MART, AWP, fast AT, robust AMO, clean AMO,\n"
               "Jacobian large-margin), trustworthy robustness evaluation and margin analysis\n"
               "for PyTorch.")
"""What ``robust-amo --help`` says first (the module docstring is for developers)."""

EPILOG = """examples:
  robust-amo train --config quickstart --out runs/quickstart
  robust-amo eval --checkpoint runs/quickstart --attack pgd50 --attack autoattack
  robust-amo reproduce --list

robust-amo COMMAND --help lists a command's options; the shipped configs and studies
(quickstart, sokolic-table1, ...) are found by name from any folder."""

log = logging.getLogger("robust_amo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="robust-amo", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"robust-amo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for command in COMMANDS:
        # no prefixes of flags: --un must not mean --unsafe-load (which runs a file's code)
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP,
                           allow_abbrev=False)
        command.add_arguments(p)
        # the library names its parameters; every command says them as its flags
        flags = flags_of(p, getattr(command, "PARAM_FLAGS", None))
        p.set_defaults(handler=command.run, param_flags=flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robust-amo`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("robust_amo").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.handler(args)
    except RobustAmoError as e:
        print(f"robust-amo: error: {flag_message(e, args.param_flags)}", file=sys.stderr)
        return 2
    except OSError as e:
        # the library turns a full disk into OutputError where it writes; this catches a write
        # elsewhere (a package's cache, TensorBoard's events) the same way
        if e.errno not in DISK_FULL:
            raise
        error = write_error(e.filename or "the output", e)
        print(f"robust-amo: error: {flag_message(error, args.param_flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = ("rerun the same command to continue" if args.command == "reproduce" else
                 "continue with the same command and --resume")
        print(f"robust-amo: interrupted; {again}", file=sys.stderr)
        return 130
