"""``robust-amo margins``: per-example margins of a trained checkpoint, as CSV, JSON and plots.

For N examples of the checkpoint's dataset it computes what :mod:`robust_amo.margins` defines
(output, all-layer, adversarial all-layer and L2 input margins, κ and κ_adv per perturbation
point) and writes ``margins.csv``, ``summary.json`` and three PNG plots to ``--out``
(:mod:`robust_amo.margins.report`). docs/margins.md explains each quantity.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from robust_amo.attacks import PGD
from robust_amo.config import check_int, parse_float
from robust_amo.errors import ConfigError
from robust_amo.evaluation import load_for_analysis
from robust_amo.margins import SearchOptions, margins_batch
from robust_amo.margins.report import plot_margins, summarize, write_csv
from robust_amo.outputs import refuse_overwrite, writable_dir
from robust_amo.runtime import generator, resolve_device

from .common import add_checkpoint_options, at_least, external_model

NAME = "margins"
HELP = "per-example output, all-layer, adversarial and input margins, kappa"

log = logging.getLogger(__name__)

CSV = "margins.csv"
SUMMARY = "summary.json"


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
                   help="--model: module names whose outputs are perturbation points (default: "
                        "the model's perturbation_points(), else every Conv2d and Linear but "
                        "the last Linear)")


def run(args: argparse.Namespace) -> int:
    """Load, compute every quantity batch by batch, write CSV, JSON and plots."""
    for name, v, lo in (("--n-examples", args.n_examples, 1), ("--batch-size", args.batch_size, 1),
                        ("--pgd-steps", args.pgd_steps, 1), ("--restarts", args.restarts, 1),
                        ("--attack-steps", args.attack_steps, 1), ("--rounds", args.rounds, 1)):
        at_least(name, v, lo)
    check_int("--seed", args.seed)
    rtol = parse_float(args.rtol, "--rtol")
    if rtol < 0:
        raise ConfigError(f"--rtol must be >= 0, got {rtol}")
    if args.points and args.model is None:
        raise ConfigError("--points belongs to --model; a checkpoint's model declares its own")
    external = external_model(args, args.points)
    out = writable_dir(args.out if args.out else _default_out(args.checkpoint or
                                                               args.weights or "."))
    refuse_overwrite(out, [CSV, SUMMARY], "margins report", overwrite=args.overwrite)
    device = resolve_device(args.device)
    a = load_for_analysis(args.checkpoint, device=device, which=args.which, arch=args.arch,
                          dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                          n_examples=args.n_examples, eps=args.eps, norm=args.norm,
                          step_size=args.step_size, unsafe_load=args.unsafe_load,
                          external=external)
    model, data, t = a.model, a.data, a.threat
    if len(data.y) < args.n_examples:
        log.warning("the %s split has only %d examples; using all of them", args.split,
                    len(data.y))

    attack_cfg = {"eps": t.eps, "step_size": t.step_size, "steps": args.pgd_steps,
                  "restarts": args.restarts, "norm": t.norm, "loss": t.loss, "seed": args.seed}
    attack = None
    if not args.no_adv:
        attack = PGD(model, t.eps, t.step_size, args.pgd_steps, t.norm, True, args.restarts,
                     t.loss, generator(args.seed, "margins-pgd"))
    opts = SearchOptions(steps=args.attack_steps, rounds=args.rounds, rtol=rtol)
    parts: list[dict[str, torch.Tensor]] = []
    names: list[str] = []
    starts = range(0, len(data.y), args.batch_size)
    for i in tqdm(starts, desc="margins", unit="batch", disable=args.no_progress):
        x = data.x[i:i + args.batch_size].to(device)
        y = data.y[i:i + args.batch_size].to(device)
        cols, names = margins_batch(model, x, y, attack, opts, input_l2=not args.no_input_margin)
        cols["label"] = y
        parts.append({k: v.detach().cpu() for k, v in cols.items()})
    cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    settings = {"checkpoint": str(args.checkpoint or args.weights), "model": args.model,
                "which": args.which, "arch": a.meta["arch"],
                "dataset": data.dataset, "split": args.split, "n_examples": len(data.y),
                "pgd": attack_cfg if attack is not None else None,
                "search": {"attack_steps": opts.steps, "rounds": opts.rounds, "rtol": opts.rtol,
                           "max_expand": opts.max_expand, "step_scale": opts.step_scale},
                "points": names, "device": str(device), "torch": torch.__version__}
    write_csv(out / CSV, cols, names)
    summary = summarize(cols, names, settings)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False))
    if not args.no_plots:
        plot_margins(cols, names, out)
    log.info("margins of %d examples written to %s (clean accuracy %.3f)", len(data.y), out,
             summary["clean_accuracy"])
    return 0


def _default_out(checkpoint: str) -> Path:
    p = Path(checkpoint).expanduser()
    return (p if p.is_dir() else p.parent) / "margins"


