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
import json
import logging
import time
from pathlib import Path

import torch

from robust_amo import distributed
from robust_amo.config import check_int, parse_float
from robust_amo.distributed import DistContext
from robust_amo.errors import ConfigError
from robust_amo.evaluation import (
    evaluate_attacks,
    large_eps_accuracy,
    load_for_analysis,
    model_digest,
    parse_attack,
    sharding,
)
from robust_amo.evaluation.attacks import attack_help
from robust_amo.evaluation.report import (
    build_report,
    markdown,
    robustbench_entry,
    robustbench_path,
    sanity_checks,
    write_report,
)
from robust_amo.outputs import refuse_overwrite, writable_dir
from robust_amo.runtime import resolve_device

from .common import add_checkpoint_options, at_least, external_model

NAME = "eval"
HELP = "evaluate robustness of a checkpoint (PGD-50 x 10, AutoAttack)"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint options (shared with ``margins``), the attacks and the report."""
    add_checkpoint_options(p, n_examples=None, batch_size=256)
    p.add_argument("--attack", type=str, action="append", default=[],
                   help=f"{attack_help()}. Repeat or comma-separate for several (default: "
                        "pgd50)")
    p.add_argument("--step-size", type=str, help="PGD step size (default: eps/4)")
    p.add_argument("--restarts", type=int,
                   help="PGD restarts (default: 10 for pgd50, else 1)")
    p.add_argument("--loss", type=str, choices=["ce", "cw"], default="ce",
                   help="PGD loss (default: ce)")
    p.add_argument("--aa-attacks", type=str, default="",
                   help="attacks of autoattack-custom, comma-separated, e.g. apgd-ce,square")
    p.add_argument("--aa-backend", type=str, choices=["autoattack", "pyautoattack"],
                   help="AutoAttack package (default: autoattack if installed, else "
                        "pyautoattack)")
    p.add_argument("--out", type=str,
                   help="report .json path (default: RUN/eval/report.json); .md beside it")
    p.add_argument("--bf16", action="store_true",
                   help="PGD forward passes in bf16 autocast on CUDA (flagged in the report)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from its state file")
    p.add_argument("--tolerance", type=str, default="0.03",
                   help="PGD/AutoAttack disagreement flagged above this (default 0.03)")
    p.add_argument("--format", type=str, choices=["robust-amo", "robustbench"],
                   default="robust-amo",
                   help="robust-amo (default): report.json and report.md; robustbench: also "
                        "write REPORT.robustbench.json, the fields of a RobustBench model-info "
                        "entry (needs --attack autoattack)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the large-eps gradient-masking check (other checks still run)")


def _attack_names(values: list[str]) -> list[str]:
    names = [a.strip() for v in values for a in v.split(",") if a.strip()]
    names = names or ["pgd50"]
    dup = {a for a in names if names.count(a) > 1}
    if dup:
        raise ConfigError(f"--attack {sorted(dup)[0]} given twice")
    return names


def run(args: argparse.Namespace) -> int:
    """Load, attack, check, report (sharded over ranks under torchrun)."""
    with distributed.session(resolve_device(args.device)) as (ctx, device):
        return _eval(args, ctx, device)


def _eval(args: argparse.Namespace, ctx: DistContext, device: torch.device) -> int:
    at_least("--batch-size", args.batch_size)
    at_least("--n-examples", args.n_examples)
    at_least("--restarts", args.restarts)
    check_int("--seed", args.seed)
    names = _attack_names(args.attack)
    if args.format == "robustbench" and "autoattack" not in names:
        raise ConfigError("--format robustbench needs the standard AutoAttack: add --attack "
                          "autoattack")
    tolerance = parse_float(args.tolerance, "--tolerance")
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0, got {tolerance}")
    t_start = time.perf_counter()
    a = load_for_analysis(args.checkpoint, device=device, which=args.which, arch=args.arch,
                          dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                          n_examples=args.n_examples, eps=args.eps, norm=args.norm,
                          step_size=args.step_size, unsafe_load=args.unsafe_load,
                          external=external_model(args))
    model, meta, data, eps, norm = a.model, a.meta, a.data, a.threat.eps, a.threat.norm
    meta["weights_sha256"] = model_digest(model)
    step = a.threat.step_size if args.step_size is not None else None  # default: eps / 4
    aa_attacks = tuple(x.strip() for x in args.aa_attacks.split(",") if x.strip())
    specs = [parse_attack(n, eps=eps, norm=norm, step_size=step, restarts=args.restarts,
                          loss=args.loss, seed=args.seed, aa_attacks=aa_attacks,
                          aa_backend=args.aa_backend) for n in names]
    if not any(s.kind == "clean" for s in specs):
        specs.insert(0, parse_attack("clean", eps=eps))
    if args.bf16 and device.type != "cuda":
        log.warning("--bf16 has no effect on %s: evaluating in float32", device)
    bf16 = args.bf16 and device.type == "cuda"

    ckpt_path = Path(meta["path"])
    out = Path(args.out) if args.out else ckpt_path.parent / "eval" / "report.json"
    if ctx.is_main:
        writable_dir(out.parent)
        refuse_overwrite(out.parent, [out.name, out.with_suffix(".md").name,
                                      robustbench_path(out).name], "report",
                         overwrite=args.overwrite)
    state_path = out.with_suffix(".state.pt")
    log.info("evaluating %s on %d %s examples of %s (%s eps %.6g) on %s: %s", meta["arch"],
             len(data.y), data.split, data.dataset, norm, eps, device,
             ", ".join(s.name for s in specs))
    outcomes = evaluate_attacks(
        model, data.x, data.y, specs, batch_size=args.batch_size, device=device,
        state_path=state_path, resume=args.resume, bf16=bf16, progress=not args.no_progress,
        fingerprint={"split": data.split, "dataset": data.dataset})
    clean_acc = int(outcomes[0].clean.sum()) / len(data.y)
    large = None
    if not args.no_sanity:
        large = large_eps_accuracy(model, data.x, data.y, norm, batch_size=args.batch_size,
                                   device=device, seed=args.seed)
    checks = sanity_checks(clean_acc, outcomes, large_eps=large, tolerance=tolerance)
    report = build_report(outcomes=outcomes, model_meta=meta, dataset=data.dataset,
                          split=data.split, norm=norm, eps=eps, seed=args.seed,
                          device=str(device), bf16=bf16,
                          wall_time_s=time.perf_counter() - t_start, checks=checks,
                          data_dir=data.data_dir)
    sharding.state_file(state_path).unlink(missing_ok=True)
    if not ctx.is_main:  # every rank holds the same report; rank 0 writes it
        return 0
    json_path, md_path = write_report(report, out)
    print(markdown(report))
    log.info("report written to %s and %s", json_path, md_path)
    if args.format == "robustbench":
        rb = robustbench_path(out)
        rb.write_text(json.dumps(robustbench_entry(report), indent=2) + "\n")
        log.info("RobustBench entry written to %s (fill link, name, authors, venue, reported, "
                 "additional_data)", rb)
    for c in checks:
        if not c["passed"]:
            log.warning("sanity check %s flagged: %s", c["name"], c["detail"])
    return 0
