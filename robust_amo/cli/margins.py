"""``robust-amo margins``: per-example margins of a trained checkpoint, as CSV, JSON and plots.

For N examples of the checkpoint's dataset it computes what :mod:`robust_amo.margins` defines
(output, all-layer, adversarial all-layer and L2 input margins, κ and κ_adv per perturbation
point) and writes ``margins.csv``, ``summary.json`` and three PNG plots to ``--out``
(:func:`robust_amo.evaluation.measure_checkpoint`, built on :func:`robust_amo.margins.measure`).
docs/margins.md explains each quantity.
"""

from __future__ import annotations

import argparse

from robust_amo.evaluation import MarginsRequest, measure_checkpoint

from .common import add_checkpoint_options, checkpoint_fields

NAME = "margins"
HELP = "per-example output, all-layer, adversarial and input margins, kappa"

PARAM_FLAGS = {"adv": "--no-adv", "input_margin": "--no-input-margin", "plots": "--no-plots",
               "progress": "--no-progress"}
""":class:`MarginsRequest` fields whose flag is spelt otherwise (errors name the flag)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint options (shared with ``eval``), the neighbourhood and the searches."""
    add_checkpoint_options(p, n_examples=256, batch_size=128)
    p.add_argument("--step-size", type=str, help="PGD step (default: the training attack's)")
    p.add_argument("--pgd-steps", type=int, default=10,
                   help="PGD iterations defining the neighbourhood (default 10)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (default 1)")
    p.add_argument("--no-adv", action="store_true",
                   help="skip the adversarial all-layer margin and kappa_adv")
    p.add_argument("--no-input-margin", action="store_true", help="skip the L2 input margin")
    p.add_argument("--attack-steps", type=int, default=20,
                   help="attack steps per radius of the margin searches (default 20)")
    p.add_argument("--rounds", type=int, default=10,
                   help="bisection rounds of the margin searches (default 10)")
    p.add_argument("--rtol", type=str, default="0.01",
                   help="relative gap at which a bisection stops (default 0.01)")
    p.add_argument("--out", type=str,
                   help="output folder (default: <run folder>/margins)")
    p.add_argument("--no-plots", action="store_true", help="write CSV and JSON only")
    p.add_argument("--points", type=str, nargs="+", metavar="MODULE",
                   help="--model: names of modules (model.named_modules()) whose outputs are "
                        "perturbation points (default: the model's perturbation_points(), else "
                        "every Conv2d and Linear but the last Linear); a name the model does "
                        "not have is refused, listing its modules")


def request(args: argparse.Namespace) -> MarginsRequest:
    """The :class:`MarginsRequest` of the parsed flags."""
    return MarginsRequest(
        **checkpoint_fields(args),
        pgd_steps=args.pgd_steps, restarts=args.restarts, adv=not args.no_adv,
        input_margin=not args.no_input_margin, attack_steps=args.attack_steps,
        rounds=args.rounds, rtol=args.rtol, points=args.points, out=args.out,
        plots=not args.no_plots)


def run(args: argparse.Namespace) -> int:
    """Measure and write (:func:`robust_amo.evaluation.measure_checkpoint`)."""
    measure_checkpoint(request(args))
    return 0
