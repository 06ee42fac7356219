"""``robust-amo eval``: clean, PGD-K × R and AutoAttack accuracy of a checkpoint, with a report.

Example::

    robust-amo eval --checkpoint runs/quickstart --attack pgd50 --attack autoattack \\
        --n-examples 1000

writes ``runs/quickstart/eval/report.json`` and ``report.md`` (``--out`` to choose) and prints the
table. See docs/evaluation.md for the protocol and every report field.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from robust_amo.cli import subcommand
from robust_amo.config import parse_float
from robust_amo.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from robust_amo.distributed import DistContext

log = logging.getLogger(__name__)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=str, required=True,
                   help="run folder of `robust-amo train` or a checkpoint .pt file")
    p.add_argument("--which", type=str, choices=["checkpoint.pt", "best.pt"],
                   default="checkpoint.pt", help="file inside a run folder (default: last)")
    p.add_argument("--attack", type=str, action="append", default=[],
                   help="clean, pgdK (pgd20, pgd50 = 50 steps x 10 restarts), autoattack, "
                        "autoattack-plus, autoattack-rand, autoattack-custom; repeat or "
                        "comma-separate for several (default: pgd50)")
    p.add_argument("--eps", type=str,
                   help="radius, e.g. 8/255 (default: the checkpoint's training eps)")
    p.add_argument("--norm", type=str, choices=["linf", "l2"],
                   help="threat model (default: the checkpoint's training norm)")
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
    p.add_argument("--n-examples", type=int, help="evaluate the first N examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--dataset", type=str, help="dataset (default: the checkpoint's)")
    p.add_argument("--arch", type=str,
                   help="architecture of a robustness-library checkpoint (robust-amo archs)")
    p.add_argument("--data-dir", type=str, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", type=str, choices=["test", "val"], default="test",
                   help="test split, or the run's held-out val split (default: test)")
    p.add_argument("--out", type=str,
                   help="report .json path (default: RUN/eval/report.json); .md beside it")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                   help="device (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--bf16", action="store_true",
                   help="PGD forward passes in bf16 autocast on CUDA (flagged in the report)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from its state file")
    p.add_argument("--tolerance", type=str, default="0.03",
                   help="PGD/AutoAttack disagreement flagged above this (default 0.03)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the large-eps gradient-masking check (other checks still run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _attack_names(values: list[str]) -> list[str]:
    names = [a.strip() for v in values for a in v.split(",") if a.strip()]
    names = names or ["pgd50"]
    dup = {a for a in names if names.count(a) > 1}
    if dup:
        raise ConfigError(f"--attack {sorted(dup)[0]} given twice")
    return names


@subcommand("eval", "evaluate robustness of a checkpoint (PGD-50 x 10, AutoAttack)", _eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    """``robust-amo eval``: load, attack, check, report (sharded over ranks under torchrun)."""
    from robust_amo import distributed
    from robust_amo.train import resolve_device

    with distributed.session(resolve_device(args.device)) as (ctx, device):
        return _eval(args, ctx, device)


def _eval(args: argparse.Namespace, ctx: DistContext, device: torch.device) -> int:
    from . import sharding
    from .loading import load_eval_data, load_model
    from .report import build_report, markdown, sanity_checks, write_report
    from .runner import evaluate_attacks, large_eps_accuracy, model_digest, parse_attack

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    names = _attack_names(args.attack)
    t_start = time.perf_counter()
    model, meta = load_model(args.checkpoint, device, which=args.which, arch=args.arch,
                             dataset=args.dataset)
    meta["weights_sha256"] = model_digest(model)
    data = load_eval_data(meta, split=args.split, n_examples=args.n_examples,
                          dataset=args.dataset, data_dir=args.data_dir)
    train_attack = (meta.get("config") or {}).get("attack") or {}
    eps = parse_float(args.eps if args.eps is not None else train_attack.get("eps", 8 / 255),
                      "--eps")
    norm = args.norm or train_attack.get("norm", "linf")
    if args.eps is None and norm != train_attack.get("norm", "linf"):
        raise ConfigError(f"--norm {norm} differs from the training norm "
                          f"{train_attack.get('norm', 'linf')}: give --eps for it too")
    step = parse_float(args.step_size, "--step-size") if args.step_size is not None else None
    tolerance = parse_float(args.tolerance, "--tolerance")
    if eps < 0 or (step is not None and step <= 0) or tolerance < 0:
        raise ConfigError("--eps and --tolerance must be >= 0 and --step-size > 0")
    if args.restarts is not None and args.restarts < 1:
        raise ConfigError(f"--restarts must be >= 1, got {args.restarts}")
    aa_attacks = tuple(a.strip() for a in args.aa_attacks.split(",") if a.strip())
    specs = [parse_attack(a, eps=eps, norm=norm, step_size=step, restarts=args.restarts,
                          loss=args.loss, seed=args.seed, aa_attacks=aa_attacks,
                          aa_backend=args.aa_backend) for a in names]
    if not any(s.kind == "clean" for s in specs):
        specs.insert(0, parse_attack("clean", eps=eps))
    if args.bf16 and device.type != "cuda":
        log.warning("--bf16 has no effect on %s: evaluating in float32", device)
    bf16 = args.bf16 and device.type == "cuda"

    ckpt_path = Path(meta["path"])
    out = Path(args.out) if args.out else ckpt_path.parent / "eval" / "report.json"
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
    for c in checks:
        if not c["passed"]:
            log.warning("sanity check %s flagged: %s", c["name"], c["detail"])
    return 0
