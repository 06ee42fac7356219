"""Cross-check of our PGD evaluation against MadryLab's robustness attacker and torchattacks.

Same model, same examples, same eps / step size / steps / restarts, timed in the same run:

- ours: ``robust_amo.evaluation.pgd_robust`` (robust only if no iterate of any restart is
  misclassified);
- robustness: ``AttackerModel(..., make_adv=True, random_start=True, random_restarts=R,
  use_best=True)`` (per restart the highest-loss iterate is checked). In robustness 1.2.1 its
  restart loop marks misclassified points with ``~corr`` on a uint8 tensor (254/255, never 0),
  so every restart overwrites the kept point and the result is the last restart's, not the
  worst case; the bench therefore also runs it with ``random_restarts=False`` R times on the
  examples still robust ("restarts looped here"). Its input normaliser starts with
  ``clamp(x, 0, 1)``, whose gradient is zero at pixels exactly 0 or 1 (torch 2.x), which stops
  PGD from moving saturated pixels (digits: most of the background); our models normalise
  themselves, so the attacker runs with ``should_normalize=False`` (no clamp, same model);
- torchattacks: ``torchattacks.PGD`` run R times on the examples still robust (its final iterate
  is checked; L∞ only, ``PGDL2`` for L2). torchattacks is optional: without it its row says
  "torchattacks: not installed".

Ours checks the most iterates, so its robust accuracy should be the lowest or equal; the three
should agree within a point or two on a sound model. Usage::

    python -m bench.eval_agreement --checkpoint runs/quickstart --n-examples 200 \\
        --steps 20 --restarts 5

Not part of the test suite. Results: docs/benchmarks.md ("Evaluation agreement").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import warnings
from pathlib import Path

import torch

from bench.common import ZeroOneDataset, best_time, chunks, cuda_noop_patch, fraction
from robust_amo.config import ThreatModel, parse_float
from robust_amo.evaluation import PGDSettings, load_eval_data, load_model, pgd_robust
from robust_amo.runtime import resolve_device


def run_ours(model, x, y, s: PGDSettings, bs: int) -> torch.Tensor:
    out = []
    for sl in chunks(len(y), bs):
        r = pgd_robust(model, x[sl], y[sl], torch.arange(sl.start, sl.stop), s)
        out.append(r.robust)
    return torch.cat(out)


def _attacker(model, x, s: PGDSettings, restarts):
    from robustness.attacker import AttackerModel

    # identity normaliser: our models normalise their input themselves
    am = AttackerModel(model, ZeroOneDataset(x.shape[1])).to(x.device).eval()
    t = s.threat
    kw = dict(constraint="inf" if t.norm == "linf" else "2", eps=t.eps, step_size=t.step_size,
              iterations=t.steps, random_start=True, random_restarts=restarts, use_best=True,
              should_normalize=False)
    return am, kw


def run_robustness(model, x, y, s: PGDSettings, bs: int, clean: torch.Tensor) -> torch.Tensor:
    am, kw = _attacker(model, x, s, s.restarts)
    out = []
    torch.manual_seed(s.seed)  # robustness draws its starts from the global RNG
    with cuda_noop_patch(x.device):
        for sl in chunks(len(y), bs):
            _, xa = am(x[sl], y[sl], make_adv=True, **kw)
            with torch.no_grad():
                out.append(model(xa).argmax(1) == y[sl])
    return torch.cat(out) & clean


def run_robustness_looped(model, x, y, s: PGDSettings, bs: int,
                          clean: torch.Tensor) -> torch.Tensor:
    am, kw = _attacker(model, x, s, False)
    torch.manual_seed(s.seed)
    robust = clean.clone()
    with cuda_noop_patch(x.device):
        for _ in range(s.restarts):
            idx = robust.nonzero().squeeze(1)
            for k in range(0, len(idx), bs):
                j = idx[k:k + bs]
                _, xa = am(x[j], y[j], make_adv=True, **kw)
                with torch.no_grad():
                    robust[j] &= model(xa).argmax(1) == y[j]
    return robust


def run_torchattacks(model, x, y, s: PGDSettings, bs: int, clean: torch.Tensor) -> torch.Tensor:
    import torchattacks

    t = s.threat
    if t.norm == "linf":
        atk = torchattacks.PGD(model, eps=t.eps, alpha=t.step_size, steps=t.steps,
                               random_start=True)
    else:
        atk = torchattacks.PGDL2(model, eps=t.eps, alpha=t.step_size, steps=t.steps,
                                 random_start=True)
    torch.manual_seed(s.seed)  # torchattacks draws its starts from the global RNG
    robust = clean.clone()
    for _ in range(s.restarts):
        idx = robust.nonzero().squeeze(1)
        for k in range(0, len(idx), bs):
            j = idx[k:k + bs]
            xa = atk(x[j], y[j])
            with torch.no_grad():
                robust[j] &= model(xa).argmax(1) == y[j]
    return robust


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=str, required=True, help="run folder or .pt file")
    p.add_argument("--n-examples", type=int, default=200, help="first N test examples")
    p.add_argument("--eps", type=fraction,
                   help="radius (default: the checkpoint's training eps)")
    p.add_argument("--norm", type=str, choices=["linf", "l2"], help="default: checkpoint's")
    p.add_argument("--step-size", type=fraction, help="default eps/4")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--restarts", type=int, default=5, help="random restarts (default 5)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times")
    p.add_argument("--json", type=str, help="also write the results here")
    a = p.parse_args()
    # robustness indexes with uint8 masks (the restart bug above); keep the table readable
    warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")

    device = resolve_device(a.device)
    model, meta = load_model(a.checkpoint, device)
    data = load_eval_data(meta, n_examples=a.n_examples)
    x, y = data.x.to(device), data.y.to(device)
    att = meta["config"].get("attack", {})
    eps = a.eps if a.eps is not None else parse_float(att.get("eps", 8 / 255), "attack.eps")
    norm = a.norm or att.get("norm", "linf")
    step = a.step_size if a.step_size is not None else eps / 4
    s = PGDSettings(ThreatModel(norm, eps, step, a.steps), a.restarts, seed=a.seed)
    with torch.no_grad():
        clean = model(x).argmax(1) == y

    # name -> (package it needs, run); a peer that is not installed gets a row saying so
    methods = {
        "robust-amo (ours)": ("robust_amo", lambda: run_ours(model, x, y, s, a.batch_size)),
        "robustness AttackerModel": ("robustness", lambda: run_robustness(
            model, x, y, s, a.batch_size, clean)),
        "robustness, restarts looped here": ("robustness", lambda: run_robustness_looped(
            model, x, y, s, a.batch_size, clean)),
        "torchattacks PGD": ("torchattacks", lambda: run_torchattacks(
            model, x, y, s, a.batch_size, clean)),
    }
    results, missing = {}, {}
    for name, (package, fn) in methods.items():
        if importlib.util.find_spec(package) is None:
            missing[name] = package
            continue
        t, mask = best_time(fn, device, a.repeats, warmup=1)
        results[name] = {"robust_accuracy": mask.float().mean().item(), "mask": mask,
                         "time_s": t}
    ours = results["robust-amo (ours)"]
    print(f"# {meta['arch']} on {data.dataset} test, {len(y)} examples, clean accuracy "
          f"{clean.float().mean().item():.2%}; {norm} eps {eps:.4g}, step {step:.4g}, "
          f"{a.steps} steps x {a.restarts} restarts")
    print(f"# device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}")
    print("| method | robust accuracy | agrees with ours | time (s) | time / ours |")
    print("|---|---:|---:|---:|---:|")
    for name in methods:
        if name in missing:
            print(f"| {name} | {missing[name]}: not installed | – | – | – |")
            continue
        r = results[name]
        agree = (r["mask"] == ours["mask"]).float().mean().item()
        print(f"| {name} | {r['robust_accuracy']:.2%} | {agree:.1%} | {r['time_s']:.2f} | "
              f"{r['time_s'] / ours['time_s']:.2f} |")
    if a.json:
        rows = {k: {kk: vv for kk, vv in v.items() if kk != "mask"} for k, v in results.items()}
        rows.update({k: {"not_installed": v} for k, v in missing.items()})
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
