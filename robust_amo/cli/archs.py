"""``robust-amo archs``: one registered architecture name per line."""

from __future__ import annotations

import argparse

from robust_amo.models import list_models

NAME = "archs"
HELP = "list the registered architectures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    """Print the names."""
    print("\n".join(list_models()))
    return 0
