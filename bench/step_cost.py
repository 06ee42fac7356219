"""Cost of one training step of every method on the same model and batch, measured in one run.

For each method (standard, pgd, robust-amo, amo, jacobian-lm with both ways of computing the
C vector-Jacobian products, and its random-class variant) a step is objective + backward + SGD
update, exactly as in ``robust_amo.train``. Methods are timed round-robin (each round runs every
method ``--steps`` times) so that a busy machine slows them alike; the median over rounds is
reported, with ratios to ``pgd`` and to ``standard``. The model's forward and backward passes
per step are counted.

Memory: the largest autograd graph that any one forward of the step builds (bytes of the distinct
storages saved for backward, double-backward graphs included, weights included; deterministic,
any device), and on CUDA also the real peak, ``torch.cuda.max_memory_allocated``, of each method
built by itself after the timed ones are freed, counted over what was allocated before it
(:func:`own_peak_bytes`: model, gradients, optimiser state, inputs and graphs). For the methods
with all-layer δ's, the bytes of one δ per point and the graph ratio they make by themselves
(``floor``): every point's backward needs its δ, so no way of saving tensors goes below it.

Examples::

    python -m bench.step_cost                                  # tiny-wrn, CIFAR-shaped, CPU
    python -m bench.step_cost --arch wrn28-10 --batch 128      # the issue's GPU target (bf16)
    python -m bench.step_cost --arch mnist-cnn2 --shape 1,28,28 \\
        --methods standard,jacobian-lm,jacobian-lm-batched,jacobian-lm-random
    python -m bench.step_cost --threads 1 --cpu-bf16 --methods pgd,robust-amo --hook compiled

``--hook compiled`` adds the rows ``robust-amo-compiled`` and ``amo-compiled``: the same methods
with ``torch.compile`` kernels at the perturbation points (``robust_amo.perturb.compiled_hook``;
compiled in the untimed warm-up step). The diagnostic row ``robust-amo-noarith`` (on request)
is ``robust-amo-compiled`` with the points' arithmetic replaced by the identity: its time over
pgd's is what robust AMO costs outside the point formulas.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.common import sync, timed
from robust_amo import perturb as perturb_mod
from robust_amo.attacks import PGD
from robust_amo.config import TrainConfig
from robust_amo.methods import build_objective
from robust_amo.models import create_model
from robust_amo.perturb import DeltaDtype, compiled_hook, fused_hook, perturb
from robust_amo.runtime import autocast, resolve_device

# name -> (trainer method, method_args, perturbation kernel: fused (default) or reference)
METHODS: dict[str, tuple[str, dict, bool]] = {
    "standard": ("standard", {}, True),
    "pgd": ("pgd", {}, True),
    "robust-amo": ("robust-amo", {}, True),
    "amo": ("amo", {}, True),
    "jacobian-lm": ("jacobian-lm", {}, True),  # variant all, vjp loop (the defaults)
    "jacobian-lm-batched": ("jacobian-lm", {"vjp": "batched"}, True),
    "jacobian-lm-random": ("jacobian-lm", {"variant": "random"}, True),
}
# the same methods with the reference ops at the perturbation points (--hook both)
REFERENCE_HOOK = {
    "robust-amo-refhook": ("robust-amo", {}, False),
    "amo-refhook": ("amo", {}, False),
}
# robust AMO with float32 δ's under bf16 (as before δ followed its bf16 activation), for the
# before/after of docs/benchmarks.md "Robust AMO's memory" in one run
WIDE_DELTA = {"robust-amo-f32delta": ("robust-amo", {}, True)}
# the fused points with torch.compile kernels (perturb.compiled_hook; compiled in the untimed
# warm-up step), against the eager fused rows of the same run
COMPILED_HOOK = {
    "robust-amo-compiled": ("robust-amo", {}, True),
    "amo-compiled": ("amo", {}, True),
}
# diagnostic: the compiled row with the points' arithmetic replaced by the identity (forward
# h, ∇h = g, ∇δ = δ): the same passes, calls and δ updates, so its time over pgd's is what robust
# AMO costs outside the point formulas (docs/benchmarks.md, "Where the extra time goes")
NO_ARITHMETIC = {"robust-amo-noarith": ("robust-amo", {}, True)}
# the baselines of issue 22, on request (--methods), not in the default set
BASELINES = {
    "trades": ("trades", {}, True),
    "mart": ("mart", {}, True),
    "awp": ("awp", {}, True),
    "fgsm-rs": ("fgsm-rs", {}, True),
    "n-fgsm": ("n-fgsm", {}, True),
    "trades-all-layer": ("trades", {"all_layer": {}}, True),
}
ALL_METHODS = {**METHODS, **REFERENCE_HOOK, **WIDE_DELTA, **COMPILED_HOOK, **NO_ARITHMETIC,
               **BASELINES}


@dataclass
class Settings:
    """One step-cost run (the command-line options; ``bench.device_suite`` builds one too)."""

    arch: str = "tiny-wrn"
    shape: tuple[int, ...] = (3, 32, 32)
    classes: int = 10
    batch: int = 32
    pgd_steps: int = 10
    steps: int = 3
    rounds: int = 3
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    device: str = "auto"
    bf16: bool = True
    cpu_bf16: bool = False
    # torch.compile backend of the -compiled and -noarith rows' points (aot_eager: quick, tests)
    hook_backend: str = "inductor"


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
                   help="comma-separated subset of " + ", ".join(ALL_METHODS))
    p.add_argument("--hook", type=str, default="fused", choices=["fused", "both", "compiled"],
                   help="fused (default): the methods as named; both: also time robust-amo and "
                        "amo with the reference (unfused) perturbation ops, interleaved, and "
                        "print the fused/reference ratio; compiled: also time them with "
                        "torch.compile kernels at the points (perturb.compiled_hook)")
    p.add_argument("--hook-backend", type=str, default="inductor",
                   help="torch.compile backend of the compiled points (-compiled and -noarith "
                        "rows; default inductor)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="device")
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on the CPU too (slow; for the graph sizes of bf16)")
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


class StepMode(NamedTuple):
    """How a method's step runs: its autocast context, fused or reference points, the compile
    backend of the points (None: eager ops) and whether their arithmetic is the identity."""

    amp: Any
    fused: bool
    hook_backend: str | None
    no_arithmetic: bool


def _setup(args: Settings, name: str):
    device = resolve_device(args.device)
    shape = args.shape
    torch.manual_seed(0)
    model = create_model(args.arch, args.classes, input_shape=shape).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, *shape, generator=g).to(device)
    y = torch.randint(args.classes, (args.batch,), generator=g).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    method, margs, fused = ALL_METHODS[name]
    cfg = TrainConfig(arch=args.arch, method=method, method_args=dict(margs))
    cfg.attack = cfg.attack.replace(steps=args.pgd_steps)
    attack = PGD.from_threat(model, cfg.attack, generator=torch.Generator().manual_seed(2))
    objective = build_objective(cfg, attack)
    if name in WIDE_DELTA:
        objective.adversary.joint.delta_dtype = "wide"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if device.type == "cpu" and args.cpu_bf16
           else autocast(device, args.bf16))
    compiled = args.hook_backend if name in COMPILED_HOOK or name in NO_ARITHMETIC else None
    return device, model, x, y, objective, opt, StepMode(amp, fused, compiled,
                                                         name in NO_ARITHMETIC)


@contextlib.contextmanager
def identity_points(enabled: bool = True) -> Iterator[None]:
    """Within the block the fused points do no arithmetic: the output is h, ∇h = g and ∇δ = δ
    (the ``-noarith`` row; a diagnostic, the results are not robust AMO's)."""
    if not enabled:
        yield
        return
    saved = perturb_mod._forward, perturb_mod._point_backward

    def forward(h, d, backend):
        return h.view_as(h), torch.ones(h.shape[0], device=h.device)

    def backward(needs, g, g_s, out, d, s, from_output, backend=None):
        return (g if needs[0] else None), (d if needs[1] else None)

    perturb_mod._forward, perturb_mod._point_backward = forward, backward
    try:
        yield
    finally:
        perturb_mod._forward, perturb_mod._point_backward = saved


def _make_step(model, x, y, objective, opt, mode: StepMode):
    backend = mode.hook_backend

    def step() -> None:
        with mode.amp, fused_hook(mode.fused), \
                compiled_hook(backend is not None, backend or "inductor"), \
                identity_points(mode.no_arithmetic):
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


def delta_kind(name: str) -> DeltaDtype | None:
    """The dtype kind of the δ's a method keeps at every perturbation point, None for none:
    robust AMO's joint attack (and any method with ``all_layer``) stores them like their
    activations, clean AMO and the ``-f32delta`` row in float32."""
    method, margs, _ = ALL_METHODS[name]
    if name in WIDE_DELTA or method == "amo":
        return "wide"
    if method == "robust-amo" or "all_layer" in margs:
        return "activation"
    return None


def delta_bytes(model: torch.nn.Module, x: torch.Tensor, amp: Any, kind: DeltaDtype) -> int:
    """Bytes of one δ_j per perturbation point for the batch ``x`` under ``amp`` (an autocast
    context or a null one): what the graph of a perturbed forward must hold besides the plain
    forward's tensors, since every point's backward needs its δ_j (⟨g, δ_j⟩)."""
    was = model.training
    model.eval()  # the same shapes; no BatchNorm statistics moved by a measurement
    with torch.no_grad(), amp, perturb(model, delta_dtype=kind, requires_grad=False) as p:
        model(x)
    model.train(was)
    return sum(d.numel() * d.element_size() for d in p.deltas if d is not None)


def _prepare(args: Settings, name: str) -> dict:
    """One method built and stepped twice: its step (which alone holds its model), device, pass
    counts and graph size.

    The first step warms up (and compiles, for the ``-compiled`` rows); the passes and the
    graph are those of the second. Neither step measures what an all-layer δ does: only the
    trainer arms that (``EpochAware.log_next``, every ``log_every`` steps).
    """
    device, model, x, y, objective, opt, mode = _setup(args, name)
    step = _make_step(model, x, y, objective, opt, mode)
    step()
    kind = delta_kind(name)
    deltas = delta_bytes(model, x, mode.amp, kind) if kind is not None else None
    counter, saved = Counter(model), SavedBytes(model)
    with saved.hooks():
        step()  # pass count and graph size of one step
    saved.close()
    sync(device)
    return {"step": step, "device": device, "times": [], "saved": saved.peak,
            "forward": counter.forward, "backward": counter.backward, "deltas": deltas}


def own_peak_bytes(make: Callable[[], Callable[[], None]], device: torch.device,
                   mem: Any = torch.cuda) -> float:
    """Peak device bytes one method needs by itself: its model, gradients, optimiser state,
    inputs and the graphs of a step, over what was allocated before it was built.

    ``make`` builds the method and returns its step; the step runs once to create the gradients
    and optimiser state, then once measured. Whatever else is still allocated (other methods'
    models, a caller's tensors) is the baseline and not counted, so ratios between methods are
    not pulled towards 1. ``mem``: ``torch.cuda`` (a stand-in in the tests).
    """
    gc.collect()
    mem.empty_cache()
    before = mem.memory_allocated()
    step = make()
    step()
    sync(device)
    mem.reset_peak_memory_stats()
    step()
    sync(device)
    peak = mem.max_memory_allocated() - before
    del step
    gc.collect()
    mem.empty_cache()
    return float(peak)


def measure(args: Settings) -> dict:
    """Time, count and size one step of every method in ``args.methods`` (round-robin).

    Returns:
        ``{"header": str, "results": [one dict per method]}`` with the keys ``method``,
        ``forward``, ``backward``, ``s_per_step``, ``vs_pgd``, ``vs_standard``, ``graph_mib``,
        ``graph_vs_pgd``, ``cuda_peak_mib`` (NaN off CUDA), ``cuda_peak_vs_pgd``, and for
        the methods with δ's ``delta_mib`` (:func:`delta_bytes`) and ``floor_vs_pgd``, the
        graph × pgd that the δ's alone make: (pgd's graph + δ's) / pgd's graph (else NaN).

    Raises:
        ValueError: an unknown method name.
    """
    names = list(args.methods)
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")

    runs = {n: _prepare(args, n) for n in names}
    for _ in range(args.rounds):
        for n in names:
            r = runs[n]
            r["times"].append(timed(r["step"], r["device"], args.steps, warmup=0))

    device = runs[names[0]]["device"]
    cuda_peak: dict[str, float] = {}
    if device.type == "cuda":
        for r in runs.values():  # the timed models, gradients and optimiser states
            r.pop("step")
        for n in names:
            cuda_peak[n] = own_peak_bytes(lambda n=n: _make_step(*_setup(args, n)[1:]), device)

    med = {n: statistics.median(runs[n]["times"]) for n in names}
    dev_name = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads, {os.cpu_count()} cores visible")
    bf16 = args.bf16 if device.type == "cuda" else args.cpu_bf16
    shape = ",".join(str(s) for s in args.shape)
    header = (f"# step_cost: {args.arch} input {shape} batch {args.batch}, "
              f"PGD-{args.pgd_steps}, {'bf16' if bf16 else 'fp32'}; {dev_name}; "
              f"torch {torch.__version__}; {time.strftime('%Y-%m-%d', time.gmtime())}")
    nan = float("nan")
    results = []
    for n in names:
        r = runs[n]
        peak = cuda_peak.get(n, nan) / 2**20
        results.append({
            "method": n, "forward": r["forward"], "backward": r["backward"],
            "s_per_step": med[n], "vs_pgd": med[n] / med["pgd"] if "pgd" in med else nan,
            "vs_standard": med[n] / med["standard"] if "standard" in med else nan,
            "graph_mib": r["saved"] / 2**20,
            "graph_vs_pgd": r["saved"] / runs["pgd"]["saved"] if "pgd" in runs else nan,
            "cuda_peak_mib": peak,
            "cuda_peak_vs_pgd": cuda_peak.get(n, nan) / cuda_peak.get("pgd", nan),
            "delta_mib": nan if r["deltas"] is None else r["deltas"] / 2**20,
            "floor_vs_pgd": (nan if r["deltas"] is None or "pgd" not in runs
                             else (runs["pgd"]["saved"] + r["deltas"]) / runs["pgd"]["saved"]),
        })
    return {"header": header, "results": results}


def hook_ratios(results: list[dict]) -> dict[str, float]:
    """``method -> s/step with the fused hook / s/step with the reference ops`` (--hook both)."""
    by = {r["method"]: r for r in results}
    return {m: by[m]["s_per_step"] / by[ref]["s_per_step"]
            for ref in REFERENCE_HOOK if ref in by
            for m in [ref.removesuffix("-refhook")] if m in by}


def main() -> None:
    a = _parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    if a.hook == "both":
        names += [r for r, (m, _, _) in REFERENCE_HOOK.items() if m in names and r not in names]
    if a.hook == "compiled":
        names += [r for r, (m, _, _) in COMPILED_HOOK.items() if m in names and r not in names]
    args = Settings(arch=a.arch, shape=tuple(int(s) for s in a.shape.split(",")),
                    classes=a.classes, batch=a.batch, pgd_steps=a.pgd_steps, steps=a.steps,
                    rounds=a.rounds, methods=names, device=a.device, bf16=not a.no_bf16,
                    cpu_bf16=a.cpu_bf16, hook_backend=a.hook_backend)
    try:
        out = measure(args)
    except ValueError as e:
        sys.exit(f"step_cost.py: {e}")
    print(out["header"])
    print(f"{'method':20s} {'fwd':>4s} {'bwd':>4s} {'s/step':>9s} {'x pgd':>7s} "
          f"{'x std':>7s} {'graph MiB':>10s} {'x pgd':>7s} {'δ MiB':>6s} {'floor':>6s} "
          f"{'CUDA peak MiB':>14s}")
    for r in out["results"]:
        print(f"{r['method']:20s} {r['forward']:4d} {r['backward']:4d} {r['s_per_step']:9.4f} "
              f"{r['vs_pgd']:7.2f} {r['vs_standard']:7.2f} {r['graph_mib']:10.1f} "
              f"{r['graph_vs_pgd']:7.2f} {r['delta_mib']:6.2f} {r['floor_vs_pgd']:6.2f} "
              f"{r['cuda_peak_mib']:14.1f}")
    for m, ratio in hook_ratios(out["results"]).items():
        print(f"{m}: fused hook / reference hook time: {ratio:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
