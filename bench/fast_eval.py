"""The fast evaluation (``--attack fast``) against AutoAttack standard, model by model.

For each checkpoint: the same first N test examples, AutoAttack standard through its official
code (``robust_amo.evaluation.autoattack_robust``) and ours (``fast_robust``), each counted by
the same :class:`~robust_amo.evaluation.runner.PassCounter` (forward and backward passes in
example units) and timed in the same run. It prints per model: clean and robust accuracy of
both, the examples AutoAttack breaks that ours does not (the issue's budget: at most 0.1 points
of the examples), and the ratio of passes (forward + backward) and of wall time. Usage::

    python -m bench.fast_eval --checkpoint RUN1 RUN2 ... --n-examples 500 --data-dir DIR \\
        --out docs/benchmarks/fast-eval.json

Not part of the test suite. Results: docs/benchmarks.md ("A faster evaluation").
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
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


def compare(checkpoint: str, n: int, data_dir: str | None, eps: float | None, targets: int,
            batch: int) -> dict:
    """One model: AutoAttack standard and the fast evaluation on the same examples."""
    model, meta = load_model(checkpoint, which="best")
    data = load_eval_data(meta, n_examples=n, data_dir=data_dir)
    eps = eps if eps is not None else float(meta["config"]["attack"]["eps"])
    row: dict = {"checkpoint": checkpoint, "n": len(data.y), "eps": eps}
    robust = {}
    for name in ("autoattack", "fast"):
        masks, t0 = [], time.perf_counter()
        with PassCounter(model) as count:
            for i in range(0, len(data.y), batch):
                x, y = data.x[i:i + batch], data.y[i:i + batch]
                index = torch.arange(i, i + len(y))
                if name == "autoattack":
                    r = autoattack_robust(model, x, y, AutoAttackSettings(eps, "linf"))
                    masks.append((r.clean, r.robust))
                else:
                    f = fast_robust(model, x, y, index, FastSettings(eps, targets=targets))
                    masks.append((f.clean, f.robust))
        clean = torch.cat([m[0].cpu() for m in masks])
        robust[name] = torch.cat([m[1].cpu() for m in masks])
        row[name] = {"robust_acc": robust[name].float().mean().item(),
                     "forward": count.forward, "backward": count.backward,
                     "s": round(time.perf_counter() - t0, 1)}
        row["clean_acc"] = clean.float().mean().item()
    aa, fast = row["autoattack"], row["fast"]
    row["aa_only"] = int((~robust["autoattack"] & robust["fast"]).sum())
    row["fast_only"] = int((robust["autoattack"] & ~robust["fast"]).sum())
    row["passes_ratio"] = (aa["forward"] + aa["backward"]) / max(1, fast["forward"]
                                                                  + fast["backward"])
    row["time_ratio"] = aa["s"] / max(fast["s"], 1e-9)
    return row


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="run folders (best.pt)")
    p.add_argument("--n-examples", type=int, default=500, help="first N test examples (500)")
    p.add_argument("--data-dir", type=str, default=None, help="dataset folder (the run's)")
    p.add_argument("--eps", type=float, default=None, help="L-inf radius (the run's)")
    p.add_argument("--targets", type=int, default=3, help="APGD-T targets of fast (3)")
    p.add_argument("--batch-size", type=int, default=500, help="examples per batch (500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--out", type=str, default=None, help="JSON file for the rows (none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | n | clean | AutoAttack | fast | AA breaks, fast not | fast breaks, AA not "
          "| passes AA / fast | time AA / fast (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ck in args.checkpoint:
        r = compare(ck, args.n_examples, args.data_dir, args.eps, args.targets, args.batch_size)
        rows.append(r)
        aa, fast = r["autoattack"], r["fast"]
        print(f"| {ck} | {r['n']} | {r['clean_acc']:.2%} | {aa['robust_acc']:.2%} | "
              f"{fast['robust_acc']:.2%} | {r['aa_only']} | {r['fast_only']} | "
              f"{aa['forward'] + aa['backward']:,} / {fast['forward'] + fast['backward']:,} "
              f"({r['passes_ratio']:.1f} x) | {aa['s']:.0f} / {fast['s']:.0f} "
              f"({r['time_ratio']:.1f} x) |", flush=True)
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__,
                "autoattack": backend_version(*autoattack_backend(None)), "rows": rows}
        Path(args.out).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
