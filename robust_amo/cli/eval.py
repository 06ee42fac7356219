"""``robust-amo eval``: clean, PGD-K × R and AutoAttack accuracy of a checkpoint, with a report.

Example::

    robust-amo eval --checkpoint runs/quickstart --attack pgd50 --attack autoattack \\
        --n-examples 1000

writes ``runs/quickstart/eval/report.json`` and ``report.md`` (``--out`` to choose) and prints the
table. Under torchrun the chunks are sharded over the ranks. See docs/evaluation.md for the
protocol and every report field.
"""

from __future__ import annotations

import argparse

from robust_amo import distributed
from robust_amo.evaluation import EvalRequest, run_evaluation
from robust_amo.evaluation.attacks import attack_help
from robust_amo.evaluation.autoattack_adapter import ATTACKS as AA_ATTACKS
from robust_amo.evaluation.autoattack_adapter import BACKENDS as AA_BACKENDS
from robust_amo.evaluation.report import markdown
from robust_amo.runtime import resolve_device

from .common import add_checkpoint_options, checkpoint_fields

NAME = "eval"
HELP = "evaluate robustness of a checkpoint (PGD-50 x 10, AutoAttack)"
PARAM_FLAGS = {"attacks": "--attack", "sanity": "--no-sanity", "progress": "--no-progress"}
""":class:`EvalRequest` fields whose flag is spelt otherwise (errors name the flag)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint options (shared with ``margins``), the attacks and the report."""
    add_checkpoint_options(p, n_examples=None, batch_size=256)
    p.add_argument("--attack", type=str, action="append", default=[],
                   help=f"{attack_help()}. Repeat or comma-separate for several (default: "
                        "pgd50)")
    p.add_argument("--step-size", type=str, help="PGD step size, e.g. 2/255 (default: eps/4)")
    p.add_argument("--restarts", type=int,
                   help="PGD restarts (default: 10 for pgd50, else 1)")
    p.add_argument("--loss", type=str, choices=["ce", "cw"], default="ce",
                   help="PGD loss: ce (cross-entropy) or cw (Carlini-Wagner margin) "
                        "(default: ce)")
    p.add_argument("--aa-attacks", type=str, default="",
                   help=f"attacks of autoattack-custom, comma-separated, from "
                        f"{', '.join(AA_ATTACKS)}, e.g. apgd-ce,square (default: none; "
                        "autoattack-custom needs it)")
    p.add_argument("--aa-backend", type=str, choices=list(AA_BACKENDS),
                   help="AutoAttack package: autoattack (fra31's repository) or pyautoattack "
                        "(default: autoattack if installed, else pyautoattack)")
    p.add_argument("--out", type=str,
                   help="report .json path (default: RUN/eval/report.json); the .md, the "
                        "pictures and the state file go beside it")
    p.add_argument("--bf16", action="store_true",
                   help="PGD forward passes in bf16 autocast on CUDA, flagged in the report "
                        "(default: off, float32)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from its state file REPORT.state.pt "
                        "(default: off: start afresh, replacing that file)")
    p.add_argument("--tolerance", type=str, default="0.03",
                   help="PGD/AutoAttack disagreement flagged above this (default 0.03)")
    p.add_argument("--format", type=str, choices=["robust-amo", "robustbench"],
                   default="robust-amo",
                   help="robust-amo (default): report.json and report.md; robustbench: also "
                        "write REPORT.robustbench.json, the fields of a RobustBench model-info "
                        "entry (needs --attack autoattack)")
    p.add_argument("--individual", action="store_true",
                   help="AutoAttack also runs each of its attacks on every clean-correct "
                        "example and the report gives each one's robust accuracy alone, beside "
                        "the cumulative one (AutoAttack's run_standard_evaluation_individual; "
                        "default: off, the cascade only)")
    p.add_argument("--save-adv", type=str, metavar="FILE",
                   help="write the worst-case adversarial examples and the attack that found "
                        "each to FILE, an .npz of plain arrays (numpy.load(FILE, "
                        "allow_pickle=False)); an existing FILE is refused unless --overwrite "
                        "(default: not written)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the large-eps gradient-masking check (default: it runs; the "
                        "other checks always run)")


def request(args: argparse.Namespace) -> EvalRequest:
    """The :class:`EvalRequest` of the parsed flags (comma-separated lists split)."""
    return EvalRequest(
        **checkpoint_fields(args),
        attacks=[a for v in args.attack for a in v.split(",")], restarts=args.restarts,
        loss=args.loss, aa_attacks=[a for a in args.aa_attacks.split(",") if a.strip()],
        aa_backend=args.aa_backend, out=args.out, resume=args.resume, bf16=args.bf16,
        tolerance=args.tolerance, format=args.format, sanity=not args.no_sanity,
        individual=args.individual, save_adv=args.save_adv)


def run(args: argparse.Namespace) -> int:
    """Evaluate (:func:`robust_amo.evaluation.run_evaluation`, sharded over ranks under
    torchrun) and print the report's table on rank 0."""
    req = request(args)
    with distributed.session(resolve_device(req.device)) as (ctx, device):
        report = run_evaluation(req, ctx, device)
        if ctx.is_main:
            print(markdown(report))
    return 0
