"""Cross-check of our PGD evaluation against MadryLab's robustness attacker and torchattacks.

Same model, same examples, same eps / step size / steps / restarts, timed in the same run:

- ours: ``evaluation.pgd_robust`` (robust only if no iterate of any restart is misclassified);
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
  is checked; L∞ only, ``PGDL2`` for L2).

Ours checks the most iterates, so its robust accuracy should be the lowest or equal; the three
should agree within a point or two on a sound model. Usage::

    python bench/eval_agreement.py --checkpoint runs/quickstart --n-examples 200 \\
        --steps 20 --restarts 5

Not part of the test suite. Results: docs/benchmarks.md ("Evaluation agreement").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import PGDSettings, load_eval_data, load_model, pgd_robust  # noqa: E402
from robust_amo.config import parse_float  # noqa: E402


@contextlib.contextmanager
def cuda_calls_are_noops_without_cuda():
    """BENCH-ONLY MONKEYPATCH: robustness's Attacker calls ``orig_input.cuda()`` unconditionally.

    Without a GPU that raises, so for the duration of the robustness run ``Tensor.cuda`` returns
    the tensor unchanged. Never used outside this script; a no-op when CUDA is available.
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def chunked(n: int, bs: int):
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def run_ours(model, x, y, s: PGDSettings, bs: int) -> torch.Tensor:
    out = []
    for sl in chunked(len(y), bs):
        r = pgd_robust(model, x[sl], y[sl], torch.arange(sl.start, sl.stop), s)
        out.append(r.robust)
    return torch.cat(out)


def _attacker(model, x, s: PGDSettings, restarts):
    from robustness.attacker import AttackerModel

    c = x.shape[1]
    # identity normaliser: our models normalise their input themselves
    ds = SimpleNamespace(mean=torch.zeros(c), std=torch.ones(c))
    am = AttackerModel(model, ds).to(x.device).eval()
    kw = dict(constraint="inf" if s.norm == "linf" else "2", eps=s.eps, step_size=s.step_size,
              iterations=s.steps, random_start=True, random_restarts=restarts, use_best=True,
              should_normalize=False)
    return am, kw


def run_robustness(model, x, y, s: PGDSettings, bs: int, clean: torch.Tensor) -> torch.Tensor:
    am, kw = _attacker(model, x, s, s.restarts)
    out = []
    torch.manual_seed(s.seed)  # robustness draws its starts from the global RNG
    with cuda_calls_are_noops_without_cuda():
        for sl in chunked(len(y), bs):
            _, xa = am(x[sl], y[sl], make_adv=True, **kw)
            with torch.no_grad():
                out.append(model(xa).argmax(1) == y[sl])
    return torch.cat(out) & clean


def run_robustness_looped(model, x, y, s: PGDSettings, bs: int,
                          clean: torch.Tensor) -> torch.Tensor:
    am, kw = _attacker(model, x, s, False)
    torch.manual_seed(s.seed)
    robust = clean.clone()
    with cuda_calls_are_noops_without_cuda():
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

    if s.norm == "linf":
        atk = torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps,
                               random_start=True)
    else:
        atk = torchattacks.PGDL2(model, eps=s.eps, alpha=s.step_size, steps=s.steps,
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
    p.add_argument("--eps", type=str, help="radius (default: the checkpoint's training eps)")
    p.add_argument("--norm", type=str, choices=["linf", "l2"], help="default: checkpoint's")
    p.add_argument("--step-size", type=str, help="default eps/4")
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

    device = torch.device(a.device)
    model, meta = load_model(a.checkpoint, device)
    data = load_eval_data(meta, n_examples=a.n_examples)
    x, y = data.x.to(device), data.y.to(device)
    att = meta["config"].get("attack", {})
    eps = parse_float(a.eps if a.eps is not None else att.get("eps", 8 / 255), "--eps")
    norm = a.norm or att.get("norm", "linf")
    step = parse_float(a.step_size, "--step-size") if a.step_size else eps / 4
    s = PGDSettings(eps, step, a.steps, a.restarts, norm, seed=a.seed)
    with torch.no_grad():
        clean = model(x).argmax(1) == y

    methods = {
        "robust-amo (ours)": lambda: run_ours(model, x, y, s, a.batch_size),
        "robustness AttackerModel": lambda: run_robustness(model, x, y, s, a.batch_size, clean),
        "robustness, restarts looped here": lambda: run_robustness_looped(
            model, x, y, s, a.batch_size, clean),
        "torchattacks PGD": lambda: run_torchattacks(model, x, y, s, a.batch_size, clean),
    }
    results = {}
    for name, fn in methods.items():
        fn()  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            mask = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = {"robust_accuracy": mask.float().mean().item(), "mask": mask,
                         "time_s": min(times)}
    ours = results["robust-amo (ours)"]
    print(f"# {meta['arch']} on {data.dataset} test, {len(y)} examples, clean accuracy "
          f"{clean.float().mean().item():.2%}; {norm} eps {eps:.4g}, step {step:.4g}, "
          f"{a.steps} steps x {a.restarts} restarts")
    print(f"# device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}")
    print("| method | robust accuracy | agrees with ours | time (s) | time / ours |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        agree = (r["mask"] == ours["mask"]).float().mean().item()
        print(f"| {name} | {r['robust_accuracy']:.2%} | {agree:.1%} | {r['time_s']:.2f} | "
              f"{r['time_s'] / ours['time_s']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "mask"} for k, v in results.items()},
            indent=2))


if __name__ == "__main__":
    main()
