"""Old code against new on the same inputs: a structural change must not change a single number.

    python -m bench.equivalence --ref 499604e       # a commit of this repository (checked out)
    python -m bench.equivalence --old ../old-tree   # or a checkout you made

Each side runs in a process of its own with its tree imported from source (no install needed:
``robust_amo``'s search path is the tree's ``robust_amo/`` and, for the folders pyproject.toml
maps into it, the tree itself). Through each tree's own command-line entry point, on the
built-in digits (CPU, under a minute on 2 cores) it compares:

- training: one epoch of every method from ``configs/quickstart.yaml`` (with a training subset,
  the held-out split and augmentation); the weights, optimiser state and metrics of the two
  checkpoints must be bit-identical;
- resuming: a run the old code stopped after epoch 1, resumed by the new code to epoch 2, must
  equal the old code's uninterrupted 2-epoch run bit for bit;
- evaluation: ``eval`` (clean, PGD-20 x 2, APGD-CE) of the old code's checkpoint by both trees:
  the per-example masks (read from the evaluation's state file, kept by stopping the evaluation
  just before it would be deleted) and the report's numbers must be identical;
- margins: ``margins`` of the same checkpoint by both: margins.csv byte for byte.

Prints one line per check and ``N passed, M failed`` last; the exit status is 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("standard", "pgd", "robust-amo", "amo", "jacobian-lm")
TRAIN_SETTINGS = ("optim.schedule=constant", "data.train_subset=512", "data.augment=true",
                  "eval.every=1")
EVAL_ATTACKS = ("clean", "pgd20", "autoattack-custom")
REPORT_VOLATILE = {"created", "wall_time_s", "versions", "device", "path", "checkpoint",
                   "data_dir", "weights"}


# ---- one side: runs inside a process of its own, with one tree imported -------------------------

def _import_tree(tree: Path) -> None:
    """Make ``import robust_amo`` load ``tree``'s sources (and its mapped folders)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "robust_amo", tree / "robust_amo" / "__init__.py",
        submodule_search_locations=[str(tree / "robust_amo"), str(tree)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["robust_amo"] = module
    spec.loader.exec_module(module)


def _cli(argv: list[str]) -> None:
    from robust_amo.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"robust-amo {' '.join(argv)} exited {rc}")


def _train(tree: Path, out: Path, method: str, epochs: int, resume: bool = False) -> None:
    argv = ["train", "--config", str(tree / "configs" / "quickstart.yaml"), "--out", str(out),
            "--method", method, "--epochs", str(epochs), "--device", "cpu", "--no-progress"]
    for s in TRAIN_SETTINGS:
        argv += ["--set", s]
    _cli([*argv, "--resume"] if resume else argv)


class _KeepState(Exception):
    """Raised instead of deleting the evaluation state file, so its masks can be read."""


def _eval_masks(run: Path, out: Path) -> None:
    """``eval`` of ``run`` into ``out``; the state file's masks are saved to ``out/masks.pt``."""
    import robust_amo.evaluation.sharding as sharding

    real = sharding.state_file
    masks: dict[str, Any] = {}

    def state_file(path):
        p = real(path)
        if p.exists():
            masks.update(torch.load(p, weights_only=True))
        return p

    sharding.state_file = state_file
    argv = ["eval", "--checkpoint", str(run), "--out", str(out / "report.json"), "--device",
            "cpu", "--n-examples", "60", "--restarts", "2", "--aa-attacks", "apgd-ce",
            "--no-progress"]
    for a in EVAL_ATTACKS:
        argv += ["--attack", a]
    try:
        _cli(argv)
    finally:
        sharding.state_file = real
    torch.save(masks.get("attacks", {}), out / "masks.pt")


def side(tree: Path, work: Path, phase: str) -> None:
    """One phase of one side (``--phase``): its outputs go under ``work``."""
    _import_tree(tree)
    if phase == "train":
        for m in METHODS:
            _train(tree, work / m, m, 1)
    elif phase == "train-old-extra":
        _train(tree, work / "two-epochs", "pgd", 2)
        _train(tree, work / "stopped", "pgd", 1)
    elif phase == "resume":
        _train(tree, work / "stopped", "pgd", 2, resume=True)
    else:  # analyse the old side's pgd run
        run = Path(phase.split("=", 1)[1])
        _eval_masks(run, work / "eval")
        _cli(["margins", "--checkpoint", str(run), "--out", str(work / "margins"), "--device",
              "cpu", "--n-examples", "24", "--no-plots", "--no-progress"])


# ---- the comparison ------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _checkpoint(path: Path) -> dict[str, Any]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    out = {k: ck[k] for k in ("model", "optimizer", "scheduler", "epoch", "best_robust_acc")}
    # the schedule's record of its plan (saved since the plan survives a resume; None before)
    # differs between a run resumed past its planned epochs and an uninterrupted one by
    # design: the rates it gives are compared, in the optimiser's param_groups
    out["scheduler"] = {k: v for k, v in ck["scheduler"].items() if k != "lr_lambdas"}
    return out


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k not in ("train_time_s", "images_per_s")}
            for r in rows]


def _masks(path: Path) -> dict[str, Any]:
    """Per attack and chunk, the masks of the state file (without timings and settings)."""
    attacks = torch.load(path, weights_only=True)
    return {name: {c: {k: v for k, v in chunk.items() if k != "time"}
                   for c, chunk in a["chunks"].items()} for name, a in attacks.items()}


def _report(path: Path) -> Any:
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in REPORT_VOLATILE}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(json.loads(path.read_text()))


def compare(work: Path) -> list[tuple[str, bool]]:
    """(check, passed) for every comparison of the two sides' outputs under ``work``."""
    old = new = work
    checks = []
    for m in METHODS:
        same = _same(_checkpoint(old / "old" / m / "checkpoint.pt"),
                     _checkpoint(new / "new" / m / "checkpoint.pt"))
        checks.append((f"train {m}: weights, optimiser, schedule bit-identical", same))
        checks.append((f"train {m}: metrics.jsonl identical (times aside)",
                       _metrics(old / "old" / m / "metrics.jsonl")
                       == _metrics(new / "new" / m / "metrics.jsonl")))
    checks.append(("old run resumed by new code equals the old uninterrupted run",
                   _same(_checkpoint(old / "old" / "two-epochs" / "checkpoint.pt"),
                         _checkpoint(old / "old" / "stopped" / "checkpoint.pt"))))
    o, n = old / "analysis-old", new / "analysis-new"
    om, nm = (_masks(p / "eval" / "masks.pt") for p in (o, n))
    checks.append((f"eval: per-example masks identical ({', '.join(sorted(om))})",
                   bool(om) and _same(om, nm)))
    checks.append(("eval: report numbers identical",
                   _report(o / "eval" / "report.json") == _report(n / "eval" / "report.json")))
    checks.append(("margins: margins.csv byte-identical",
                   (o / "margins" / "margins.csv").read_bytes()
                   == (n / "margins" / "margins.csv").read_bytes()))
    return checks


def _run_side(python: str, tree: Path, work: Path, phase: str) -> None:
    cmd = [python, "-m", "bench.equivalence", "--side", str(tree), "--work", str(work),
           "--phase", phase]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    """Run both sides and compare; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=str, help="git commit of this repository to compare against")
    p.add_argument("--old", type=str, help="a checkout of the old code (instead of --ref)")
    p.add_argument("--work", type=str, help="folder for the runs (default: a temporary one)")
    p.add_argument("--side", type=str, help=argparse.SUPPRESS)
    p.add_argument("--phase", type=str, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        side(Path(args.side), Path(args.work), args.phase)
        return 0
    if not (args.ref or args.old):
        p.error("give --ref COMMIT or --old CHECKOUT")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        old = Path(args.old) if args.old else work / "old-tree"
        if args.ref:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f",
                            str(old), args.ref], check=True, stdout=subprocess.DEVNULL)
        try:
            py = sys.executable
            _run_side(py, old, work / "old", "train")
            _run_side(py, old, work / "old", "train-old-extra")
            _run_side(py, ROOT, work / "new", "train")
            _run_side(py, ROOT, work / "old", "resume")
            run = work / "old" / "pgd"
            _run_side(py, old, work / "analysis-old", f"analyse={run}")
            _run_side(py, ROOT, work / "analysis-new", f"analyse={run}")
            checks = compare(work)
        finally:
            if args.ref:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(old)], check=False)
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    failed = sum(not ok for _, ok in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
