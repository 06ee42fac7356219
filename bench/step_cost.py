"""Cost of one training step of every method on the same model and batch, measured in one run.

For each method (standard, pgd, robust-amo, amo, jacobian-lm with both ways of computing the
C vector-Jacobian products, and its random-class variant) a step is objective + backward + SGD
update, exactly as in ``robust_amo.train``. Methods are timed round-robin (each round runs every
method ``--steps`` times) so that a busy machine slows them alike; the median over rounds is
reported, with ratios to ``pgd`` and to ``standard``. The model's forward and backward passes
per step are counted.

Memory: the largest autograd graph that any one forward of the step builds (bytes of the distinct
storages saved for backward, double-backward graphs included, weights included; deterministic,
any device), and on CUDA also the real peak, ``torch.cuda.max_memory_allocated``.

Examples::

    python -m bench.step_cost                                  # tiny-wrn, CIFAR-shaped, CPU
    python -m bench.step_cost --arch wrn28-10 --batch 128      # the issue's GPU target (bf16)
    python -m bench.step_cost --arch mnist-cnn2 --shape 1,28,28 \\
        --methods standard,jacobian-lm,jacobian-lm-batched,jacobian-lm-random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import sync, timed
from robust_amo.attacks import PGD
from robust_amo.config import TrainConfig
from robust_amo.methods import build_objective
from robust_amo.models import create_model
from robust_amo.runtime import autocast, resolve_device

# name -> (trainer method, method_args)
METHODS: dict[str, tuple[str, dict]] = {
    "standard": ("standard", {}),
    "pgd": ("pgd", {}),
    "robust-amo": ("robust-amo", {}),
    "amo": ("amo", {}),
    "jacobian-lm": ("jacobian-lm", {}),  # variant all, vjp loop (the defaults)
    "jacobian-lm-batched": ("jacobian-lm", {"vjp": "batched"}),
    "jacobian-lm-random": ("jacobian-lm", {"variant": "random"}),
}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=str, default="tiny-wrn", help="registered architecture")
    p.add_argument("--shape", type=str, default="3,32,32", help="input C,H,W")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (robust AMO too)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (median reported)")
    p.add_argument("--methods", type=str, default=",".join(METHODS),
                   help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="device")
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", type=str, default="", help="also write the results here")
    return p.parse_args()


class Counter:
    """Forward calls of the model and backward passes through its classifier."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forward = self.backward = 0
        model.register_forward_pre_hook(self._fwd)
        model.classifier.register_full_backward_pre_hook(self._bwd)

    def _fwd(self, *_):
        self.forward += 1

    def _bwd(self, *_):
        self.backward += 1


def _setup(args: argparse.Namespace, name: str):
    device = resolve_device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = create_model(args.arch, args.classes, input_shape=shape).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, *shape, generator=g).to(device)
    y = torch.randint(args.classes, (args.batch,), generator=g).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    method, margs = METHODS[name]
    cfg = TrainConfig(arch=args.arch, method=method, method_args=dict(margs))
    cfg.attack.steps = args.pgd_steps
    a = cfg.attack
    attack = PGD(model, a.eps, a.step_size, a.steps, a.norm, a.random_start, 1, a.loss,
                 torch.Generator().manual_seed(2))
    objective = build_objective(cfg, attack)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp = autocast(device, not args.no_bf16)
    return device, model, x, y, objective, opt, amp


def _make_step(model, x, y, objective, opt, amp):
    def step() -> None:
        with amp:
            loss, _ = objective(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class SavedBytes:
    """Largest total of distinct storages saved for backward between two model forwards.

    Attack graphs are freed step by step, so this is the size of the biggest graph alive at
    once: a device-independent stand-in for peak activation memory.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.current: dict[int, int] = {}
        self.peak = 0
        model.register_forward_pre_hook(self._new_forward)

    def _new_forward(self, *_) -> None:
        self.close()
        self.current = {}

    def close(self) -> None:
        """Account for the graph of the latest forward."""
        self.peak = max(self.peak, sum(self.current.values()))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        self.current[st.data_ptr()] = st.nbytes()
        return t

    def hooks(self):
        """Context that records every tensor autograd saves."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"step_cost.py: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    runs = {}
    for n in names:
        device, model, x, y, objective, opt, amp = _setup(args, n)
        counter, saved = Counter(model), SavedBytes(model)
        step = _make_step(model, x, y, objective, opt, amp)
        with saved.hooks():
            step()  # warm-up, pass count and graph size of one step
        saved.close()
        sync(device)
        runs[n] = {"step": step, "device": device, "times": [], "saved": saved.peak,
                   "forward": counter.forward, "backward": counter.backward}
    for _ in range(args.rounds):
        for n in names:
            r = runs[n]
            r["times"].append(timed(r["step"], r["device"], args.steps, warmup=0))

    device = runs[names[0]]["device"]
    cuda_peak: dict[str, float] = {}
    if device.type == "cuda":
        for n in names:
            _, model, x, y, objective, opt, amp = _setup(args, n)
            step = _make_step(model, x, y, objective, opt, amp)
            step()
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(device)
            cuda_peak[n] = float(torch.cuda.max_memory_allocated())
            del model, objective, opt, step
            torch.cuda.empty_cache()

    med = {n: statistics.median(runs[n]["times"]) for n in names}
    dev_name = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads, {os.cpu_count()} cores visible")
    header = (f"# step_cost: {args.arch} input {args.shape} batch {args.batch}, "
              f"PGD-{args.pgd_steps}, "
              f"{'bf16' if device.type == 'cuda' and not args.no_bf16 else 'fp32'}; {dev_name}; "
              f"torch {torch.__version__}; {time.strftime('%Y-%m-%d', time.gmtime())}")
    print(header)
    print(f"{'method':20s} {'fwd':>4s} {'bwd':>4s} {'s/step':>9s} {'x pgd':>7s} "
          f"{'x std':>7s} {'graph MiB':>10s} {'x pgd':>7s} {'CUDA peak MiB':>14s}")
    results = []
    for n in names:
        r = runs[n]
        rp = med[n] / med["pgd"] if "pgd" in med else float("nan")
        rs = med[n] / med["standard"] if "standard" in med else float("nan")
        gp = r["saved"] / runs["pgd"]["saved"] if "pgd" in runs else float("nan")
        peak = cuda_peak.get(n, float("nan")) / 2**20
        print(f"{n:20s} {r['forward']:4d} {r['backward']:4d} {med[n]:9.4f} {rp:7.2f} {rs:7.2f} "
              f"{r['saved'] / 2**20:10.1f} {gp:7.2f} {peak:14.1f}")
        results.append({"method": n, "forward": r["forward"], "backward": r["backward"],
                        "s_per_step": med[n], "vs_pgd": rp, "vs_standard": rs,
                        "graph_mib": r["saved"] / 2**20, "graph_vs_pgd": gp,
                        "cuda_peak_mib": peak})
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1))


if __name__ == "__main__":
    main()
