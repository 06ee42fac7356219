"""The fast evaluation (``--attack fast``) against AutoAttack standard, model by model.

For each checkpoint: the same first N test examples, AutoAttack standard through its official
code (``robust_amo.evaluation.autoattack_robust``) and ours (``fast_robust``), each counted by
the same :class:`~robust_amo.evaluation.runner.PassCounter` (forward and backward passes in
example units) and timed in the same run. It prints per model: clean and robust accuracy of
both, the examples AutoAttack breaks that ours does not (the issue's budget: at most 0.1 points
of the examples), and the ratio of passes (forward + backward) and of wall time. Usage::

    python -m bench.fast_eval --checkpoint RUN1 RUN2 ... --n-examples 1000 --data-dir DIR \\
        --variants t3 t3-malt t9 --cache DIR --out docs/benchmarks/fast-eval.json

Not part of the test suite. Results: docs/benchmarks.md ("A faster evaluation").
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import re
import time
from collections import Counter
from pathlib import Path

import torch

from robust_amo.evaluation.autoattack_adapter import (
    AutoAttackSettings,
    autoattack_backend,
    autoattack_robust,
    backend_version,
)
from robust_amo.evaluation.fast_eval import FastSettings, fast_robust
from robust_amo.evaluation.loading import load_eval_data, load_model
from robust_amo.evaluation.runner import PassCounter


def parse_variant(spec: str, eps: float) -> FastSettings:
    """``tN[-malt][-x0]`` (the ``--attack fast-tN[-malt][-x0]`` suffixes) as settings."""
    m = re.fullmatch(r"t(\d+)(-malt)?(-x0)?", spec)
    if not m:
        raise SystemExit(f"bench.fast_eval: variant {spec!r} is not tN[-malt][-x0] "
                         "(e.g. t3-malt-x0)")
    return FastSettings(eps, targets=int(m.group(1)), rank="malt" if m.group(2) else "logits",
                        clean_start=bool(m.group(3)))


def first_breaker(after_attack: dict[str, torch.Tensor], clean: torch.Tensor) -> list[str]:
    """Per example, the AutoAttack attack that broke it first ("" if robust or clean-wrong)."""
    names = [""] * len(clean)
    standing = clean.clone()
    for name, mask in after_attack.items():
        for i in (standing & ~mask).nonzero().squeeze(1).tolist():
            names[i] = name
        standing &= mask
    return names


def autoattack_masks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                     batch: int, cache: Path | None) -> dict:
    """AutoAttack standard on the examples: masks, first breakers, passes and seconds; read from
    (and written to) ``cache`` when given, so several fast variants meet one AutoAttack run."""
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=True)
    clean, robust, breaker, t0 = [], [], [], time.perf_counter()
    with PassCounter(model) as count:
        for i in range(0, len(y), batch):
            r = autoattack_robust(model, x[i:i + batch], y[i:i + batch],
                                  AutoAttackSettings(eps, "linf"))
            clean.append(r.clean.cpu())
            robust.append(r.robust.cpu())
            breaker += first_breaker({k: v.cpu() for k, v in r.after_attack.items()},
                                     r.clean.cpu())
    out = {"clean": torch.cat(clean), "robust": torch.cat(robust), "breaker": breaker,
           "forward": count.forward, "backward": count.backward,
           "s": round(time.perf_counter() - t0, 1)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(cache)
    return out


def compare(checkpoint: str, n: int, data_dir: str | None, eps: float | None,
            variants: list[str], batch: int, cache_dir: Path | None) -> dict:
    """One model: AutoAttack standard and each fast variant on the same examples."""
    model, meta = load_model(checkpoint, which="best")
    data = load_eval_data(meta, n_examples=n, data_dir=data_dir)
    eps = eps if eps is not None else float(meta["config"]["attack"]["eps"])
    n = len(data.y)
    key = hashlib.sha256(f"{Path(checkpoint).resolve()}|{n}|{eps}".encode()).hexdigest()[:16]
    cache = cache_dir / f"aa-{key}.pt" if cache_dir is not None else None
    aa = autoattack_masks(model, data.x, data.y, eps, batch, cache)
    row: dict = {"checkpoint": checkpoint, "n": n, "eps": eps,
                 "clean_acc": aa["clean"].float().mean().item(),
                 "autoattack": {"robust_acc": aa["robust"].float().mean().item(),
                                "robust": int(aa["robust"].sum()), "forward": aa["forward"],
                                "backward": aa["backward"], "s": aa["s"]},
                 "fast": {}}
    aa_passes = aa["forward"] + aa["backward"]
    for spec in variants:
        settings = parse_variant(spec, eps)
        robust, t0 = [], time.perf_counter()
        with PassCounter(model) as count:
            for i in range(0, n, batch):
                index = torch.arange(i, min(i + batch, n))
                robust.append(fast_robust(model, data.x[i:i + batch], data.y[i:i + batch],
                                          index, settings).robust.cpu())
        mask = torch.cat(robust)
        missed = (~aa["robust"] & mask).nonzero().squeeze(1).tolist()
        passes = count.forward + count.backward
        row["fast"][spec] = {
            "robust_acc": mask.float().mean().item(), "robust": int(mask.sum()),
            "forward": count.forward, "backward": count.backward,
            "s": round(time.perf_counter() - t0, 1),
            "aa_only": len(missed), "aa_only_by": [aa["breaker"][i] for i in missed],
            "aa_only_examples": missed,
            "fast_only": int((aa["robust"] & ~mask).sum()),
            "passes_ratio": aa_passes / max(1, passes)}
    return row


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="run folders (best.pt)")
    p.add_argument("--n-examples", type=int, default=1000, help="first N test examples (1000)")
    p.add_argument("--data-dir", type=str, default=None, help="dataset folder (the run's)")
    p.add_argument("--eps", type=float, default=None, help="L-inf radius (the run's)")
    p.add_argument("--variants", nargs="+", type=str, default=["t3", "t3-malt", "t9"],
                   help="fast variants, tN[-malt][-x0] as in --attack fast-tN[-malt][-x0] "
                   "(t3 t3-malt t9)")
    p.add_argument("--batch-size", type=int, default=500, help="examples per batch (500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for AutoAttack's per-example results, reused when present")
    p.add_argument("--out", type=str, default=None, help="JSON file for the rows (none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | n | clean | AutoAttack | variant | fast | AA breaks, fast not (by) "
          "| fast breaks, AA not | passes AA / fast | time AA / fast (s) |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|")
    for ck in args.checkpoint:
        r = compare(ck, args.n_examples, args.data_dir, args.eps, args.variants,
                    args.batch_size, args.cache)
        rows.append(r)
        aa = r["autoattack"]
        for spec, f in r["fast"].items():
            by = ", ".join(f"{k} {v}" for k, v in sorted(Counter(f["aa_only_by"]).items()))
            print(f"| {ck} | {r['n']} | {r['clean_acc']:.2%} | {aa['robust_acc']:.2%} | {spec} | "
                  f"{f['robust_acc']:.2%} | {f['aa_only']}{f' ({by})' if by else ''} | "
                  f"{f['fast_only']} | {aa['forward'] + aa['backward']:,} / "
                  f"{f['forward'] + f['backward']:,} ({f['passes_ratio']:.1f} x) | "
                  f"{aa['s']:.0f} / {f['s']:.0f} |", flush=True)
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__,
                "autoattack": backend_version(*autoattack_backend(None)), "rows": rows}
        Path(args.out).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
