"""Every GPU figure in one prepared run: ``python -m bench.device_suite --out DIR``.

Nine steps, in this order, each guarded so that one failure (or a missing peer library) loses
nothing else; DIR/figures.json and DIR/figures.md are rewritten atomically after every step, so
a run killed at its time limit still returns what it measured:

1. ``environment``: GPU, memory, driver, torch/CUDA/cuDNN, the peers installed, a bf16 matmul
   TFLOP/s probe (the ceiling the MFU is judged against, beside the datasheet peak);
2. ``gpu_tests``: ``pytest -m gpu`` on the gpu-marked test files in a subprocess, pass/fail per
   test (junit XML), among them the no-host-sync tests of the training step and the PGD loop;
   files that fail to import are reported apart;
3. ``step_cost``: s/step and peak memory (each method's own) of every method on WRN-28-10,
   batch 128, bf16, channels_last (:func:`bench.step_cost.measure`), ratios to pgd, robust AMO
   with the fused and the reference perturbation ops; one guarded run per Jacobian-LM variant;
4. ``mfu``: model FLOP utilisation of the native PGD-10 step (:func:`bench.mfu.measure`,
   analytic FLOPs) and the CIFAR-10 epoch time it implies;
5. ``pgd_train``: native PGD-10 training (bf16 and float32) vs ``robustness.train.train_model``
   (``use_best`` 1 and 0), images/s;
6. ``eval``: PGD-50 × 10 of ``robust-amo eval`` vs robustness's attacker with
   ``random_restarts=10`` and with its restarts looped here, on a model PGD-trained here for a
   minute or two on CIFAR-10;
7. ``autoattack``: AutoAttack standard on that model, time and survivors per attack,
   extrapolated per attack to WRN-28-10 on the 10,000 CIFAR-10 test images;
8. ``data``: the share of a PGD-10 epoch the device waits on data loading;
9. ``compiled_points``: robust AMO as ``compile: true`` trains it, with the δ points'
   arithmetic compiled (``robust-amo-compiled``), and with that arithmetic replaced by the
   identity (``robust-amo-noarith``), against pgd in the same run; last, so that its compiling
   spends only what the other steps left of the budget.

Each step runs with ``torch.backends.cudnn.benchmark`` set as its :class:`Step` says (restored
after), recorded per step. ``--smoke`` runs the same code on the CPU with tiny models and
synthetic data in well under a minute (tests/bench/test_device_suite.py). Targets are judged
(``pass``) only on CUDA, except correctness figures (failed tests and collection errors, robust
accuracy not above the looped peer's); on the CPU their
``pass`` is null. Steps that would start past ``--budget-s`` are skipped with a reason; a
``SIGTERM`` (``timeout``) records the step it interrupted. Exit status 1 when a step failed.
The command, the wheels for the peers and the data it needs: docs/benchmarks.md, "How to produce
every GPU figure".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata as metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import data_pipeline, eval_vs_robustness, mfu, step_cost
from bench.common import (
    NativeTrainer,
    base_parser,
    chunks,
    cudnn_benchmark,
    matmul_tflops,
    sync,
)
from bench.pgd_train_vs_robustness import robustness_images_per_s
from robust_amo.data import Examples, dataset_info, load_dataset
from robust_amo.errors import RobustAmoError
from robust_amo.evaluation import AutoAttackSettings, autoattack_robust
from robust_amo.models import create_model
from robust_amo.runtime import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("robustness", "pyautoattack", "autoattack", "torchattacks")
CIFAR_FILES = ("cifar10_jpegq75_test.npz", "cifar10.npz")
CIFAR_TRAIN_IMAGES = 50_000  # for the epoch time of step 4
AA_FULL_TEST = 10_000  # CIFAR-10 test images, for the extrapolation of step 7
# the share of AA_FULL_TEST still robust after APGD-CE on a PGD-trained WRN-28-10 (its AutoAttack
# robust accuracy is about 0.5 at 8/255; the later attacks get about this many): an assumption
AA_ASSUMED_ROBUST = 0.55
AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack standard, in its order


# --- targets and figures ------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A figure's target: ``value op bound``; judged on CUDA only unless ``any_device``."""

    op: str  # "<=", ">=" or "=="
    bound: Any
    any_device: bool = False

    def text(self) -> str:
        sym = {"<=": "≤", ">=": "≥", "==": "="}[self.op]
        return f"{sym} {_fmt(self.bound)}"

    def judge(self, value: Any, on_cuda: bool) -> bool | None:
        """True/False against the bound; None when not judged (no value, or off the GPU)."""
        if value is None or not (on_cuda or self.any_device):
            return None
        if self.op == "<=":
            return bool(value <= self.bound)
        if self.op == ">=":
            return bool(value >= self.bound)
        return bool(value == self.bound)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy/torch scalars plain Python."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Step:
    """One guarded step: its figures are declared up front, so every one appears in the output
    (``value: null`` with a note) even when the step fails, is skipped, or never starts."""

    name: str
    title: str
    run: Callable[[Suite], None]
    figures: list[tuple[str, str, Target | None]]
    min_s: float  # do not start with less budget left (GPU sizes)
    min_s_smoke: float = 1.0
    # torch.backends.cudnn.benchmark while the step runs (restored after); None: left as is
    cudnn_benchmark: bool | None = None


@dataclass
class Sizes:
    """The problem sizes of a run: the GPU targets', or tiny ones for ``--smoke``."""

    arch: str = "wrn28-10"
    shape: tuple[int, int, int] = (3, 32, 32)
    batch: int = 128
    pgd_steps: int = 10
    step_cost_steps: int = 2
    step_cost_rounds: int = 3
    jlm_rounds: int = 2
    iters: int = 20
    warmup: int = 5
    peer_iters: int = 10
    peer_warmup: int = 3
    data_iters: int = 15
    data_rounds: int = 2
    matmul_n: int = 8192
    matmul_reps: int = 50
    robust_arch: str = "preact-resnet18"
    robust_batch: int = 256
    robust_train_pgd_steps: int = 7
    robust_train_s: float = 75.0
    robust_test: int = 1000
    robust_train_max: int | None = None  # cap on the training images (None: all)
    robust_lr: float = 0.1  # peak SGD lr (tiny-cnn has no BatchNorm: 0.1 does not train)
    eval_examples: int = 1000
    eval_batch: int = 500
    eval_steps: int = 50
    eval_restarts: int = 10
    aa_examples: int = 300
    gpu_tests_timeout_s: float = 180.0

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(arch="tiny-wrn", shape=(3, 8, 8), batch=8, pgd_steps=2, step_cost_steps=1,
                   step_cost_rounds=1, jlm_rounds=1, iters=2, warmup=1, peer_iters=3,
                   peer_warmup=1, data_iters=2, data_rounds=1, matmul_n=128, matmul_reps=3,
                   robust_arch="tiny-cnn", robust_batch=32, robust_train_pgd_steps=2,
                   robust_train_s=2.0, robust_test=64, robust_train_max=256, robust_lr=0.02,
                   eval_examples=32, eval_batch=32, eval_steps=3, eval_restarts=2,
                   aa_examples=16, gpu_tests_timeout_s=120.0)


# --- the suite: figures, output, budget ----------------------------------------------------------

class Killed(BaseException):
    """SIGTERM (e.g. from ``timeout``): not an ``Exception``, so no step swallows it."""


@dataclass
class Suite:
    """State of one run: the figures so far, the budget, what the steps share."""

    out: Path
    budget_s: float
    smoke: bool
    device: torch.device
    data_dir: Path | None
    sizes: Sizes
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)
    shared: dict[str, Any] = field(default_factory=dict)
    current: str = ""

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    # figures

    def declare(self, step: Step) -> None:
        for name, unit, target in step.figures:
            self.figures[name] = {"value": None, "unit": unit,
                                  "target": target.text() if target else None, "pass": None,
                                  "step": step.name, "note": "not run yet"}
            self.figures[name]["_target"] = target

    def record(self, name: str, value: Any, note: str = "", unit: str | None = None,
               target: Target | None = None) -> None:
        """Set a figure (declared, or new: per-test results) and judge it against its target."""
        fig = self.figures.get(name)
        if fig is None:
            fig = {"value": None, "unit": unit or "", "target": target.text() if target else None,
                   "pass": None, "step": self.current, "note": "", "_target": target}
            self.figures[name] = fig
        value = _clean(value)
        fig["value"] = value
        t = fig["_target"]
        fig["pass"] = t.judge(value, self.on_cuda) if t is not None else None
        if value is None and not note:
            note = "not measured on this device"
        elif t is not None and fig["pass"] is None and value is not None and not note:
            note = "target applies to the GPU; not judged here"
        fig["note"] = note

    def record_pass(self, name: str, value: Any, passed: bool | None, note: str = "",
                    unit: str = "") -> None:
        """A figure whose pass/fail is known directly (a test result)."""
        self.record(name, value, note, unit=unit)
        self.figures[name]["pass"] = passed

    def note_step(self, step: Step, note: str) -> None:
        """Every figure of ``step`` that got no value says why (error, skipped, killed)."""
        for name, _, _ in step.figures:
            fig = self.figures[name]
            if fig["value"] is None and fig["note"] in ("not run yet", ""):
                fig["note"] = note

    # output

    def header(self) -> dict[str, Any]:
        if self.on_cuda:
            dev = torch.cuda.get_device_name(self.device)
        else:
            dev = f"cpu ({platform.processor() or platform.machine()}, " \
                  f"{torch.get_num_threads()} threads)"
        return {"device": dev, "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"),
                "smoke": self.smoke, "budget_s": self.budget_s,
                "elapsed_s": round(self.elapsed(), 1)}

    def document(self) -> dict[str, Any]:
        figures = {k: {f: v for f, v in fig.items() if not f.startswith("_")}
                   for k, fig in self.figures.items()}
        return {**self.header(), "steps": self.steps, "figures": figures}

    def write(self) -> None:
        """DIR/figures.json and DIR/figures.md, each replaced atomically."""
        doc = self.document()
        _atomic_write(self.out / "figures.json", json.dumps(doc, indent=1, ensure_ascii=False))
        _atomic_write(self.out / "figures.md", markdown(doc))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(doc: dict[str, Any]) -> str:
    """figures.json as one table (plus a header line)."""
    lines = [f"Device: {doc['device']}; torch {doc['torch']}; {doc['date']}"
             + ("; smoke run (CPU, tiny models)" if doc.get("smoke") else "")
             + f"; {doc['elapsed_s']} s of a {doc['budget_s']:g} s budget", "",
             "| figure | value | unit | target | pass | note |", "|---|---:|---|---|---|---|"]
    for name, fig in doc["figures"].items():
        p = {True: "yes", False: "**no**", None: ""}[fig["pass"]]
        lines.append(f"| {name} | {_fmt(fig['value'])} | {fig['unit']} | "
                     f"{fig['target'] or ''} | {p} | {_fmt(fig['note']) if fig['note'] else ''} |")
    if doc.get("steps"):
        lines += ["", "| step | status | s | cudnn.benchmark | error |", "|---|---|---:|---|---|"]
        for name, st in doc["steps"].items():
            flag = {True: "on", False: "off", None: "as found"}[st.get("cudnn_benchmark")]
            lines.append(f"| {name} | {st['status']} | {_fmt(st['seconds'])} | {flag} | "
                         f"{_fmt(st['error'])[:200] if st['error'] else ''} |")
    return "\n".join(lines) + "\n"


# --- shared helpers ------------------------------------------------------------------------------

def _bench_args(s: Suite, arch: str | None = None, batch: int | None = None,
                iters: int | None = None, warmup: int | None = None) -> argparse.Namespace:
    """The options namespace the bench modules take (``bench.common.base_parser``)."""
    c, h, _ = s.sizes.shape
    args = base_parser("").parse_args([
        "--device", s.device.type, "--arch", arch or s.sizes.arch,
        "--batch-size", str(batch or s.sizes.batch), "--image-size", str(h), "--channels", str(c),
        "--iters", str(iters or s.sizes.iters), "--warmup", str(warmup or s.sizes.warmup)])
    args.eval_bf16 = False
    return args


def peer_version(name: str) -> str | None:
    """The installed version of a peer distribution, None when missing."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _missing(name: str) -> str:
    return f"peer missing: {name} is not installed (docs/benchmarks.md has the install line)"


def find_cifar(data_dir: Path | None) -> Path | None:
    """The CIFAR-10 .npz under ``data_dir`` (the test-set file suffices), or None."""
    if data_dir is None:
        return None
    if data_dir.is_file():
        return data_dir
    for name in CIFAR_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def cifar_splits(path: Path, n_test: int, seed: int = 0) -> tuple[Examples, Examples]:
    """(train, held-out test) from a CIFAR-10 .npz.

    With only ``x_test``/``y_test`` (the 28 MB JPEG-q75 test file the GPU machine can carry),
    a seeded permutation of the 10,000 images is split: the first ``n_test`` are held out, the
    rest train (the file is ordered by class, hence the permutation).
    """
    with np.load(path) as d:
        keys = set(d.files)
        x_te, y_te = d["x_test"], d["y_test"]
        x_tr, y_tr = (d["x_train"], d["y_train"]) if "x_train" in keys else (None, None)

    def split(x: np.ndarray, y: np.ndarray) -> Examples:
        t = torch.from_numpy(np.ascontiguousarray(x))
        return Examples(t.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long())

    test = split(x_te, y_te)
    if x_tr is not None:
        return split(x_tr, y_tr), test.subset(torch.arange(min(n_test, len(test))))
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    return test.subset(perm[n_test:]), test.subset(perm[:n_test])


def robust_model(s: Suite) -> tuple[nn.Module, Examples, str]:
    """The PGD-trained model of steps 6 and 7 (trained once, on first use), its held-out test
    split and a description."""
    if "robust" in s.shared:
        return s.shared["robust"]
    z = s.sizes
    path = find_cifar(s.data_dir)
    if path is not None:
        train, test = cifar_splits(path, z.robust_test)
        dataset, source = "cifar10", f"CIFAR-10 ({path.name}"
    else:  # digits ship with scikit-learn: no file needed
        train, test = load_dataset("digits")
        test = test.subset(torch.arange(min(z.robust_test, len(test))))
        dataset, source = "digits", "digits (no CIFAR-10 under --data-dir"
    if z.robust_train_max is not None:
        train = train.subset(torch.arange(min(z.robust_train_max, len(train))))
    source += f"; {len(train)} train, {len(test)} held out)"
    info = dataset_info(dataset)
    torch.manual_seed(0)
    net = create_model(z.robust_arch, info.num_classes, input_shape=info.input_shape,
                       mean=info.mean, std=info.std).to(s.device)
    c, h, _ = info.input_shape
    args = _bench_args(s, arch=z.robust_arch, batch=z.robust_batch)
    args.channels, args.image_size = c, h
    trainer = NativeTrainer(args, s.device, steps=z.robust_train_pgd_steps, model=net,
                            split=train, augment=dataset == "cifar10")
    seconds = max(1.0, min(z.robust_train_s, s.remaining() - (0 if s.smoke else 150)))
    lr0, t0, epochs, step, total = z.robust_lr, time.perf_counter(), 0, 0, None
    per_epoch, first_step_s = len(trainer.loader), 0.0
    # fixed shapes (drop_last): tuned kernels pay off, as in robust_amo.train
    with cudnn_benchmark(True):
        while True:
            trainer.loader.set_epoch(epochs)
            for x, y in trainer.batches():
                # linear decay to 0 over the planned steps, known after the first epoch
                frac = 0.0 if total is None else min(step / total, 1.0)
                for grp in trainer.optimizer.param_groups:
                    grp["lr"] = lr0 * (1 - frac)
                trainer.step(x, y)
                step += 1
                if step == 1:  # cuDNN tuning and lazy initialisation happen here
                    sync(s.device)
                    first_step_s = time.perf_counter() - t0
            epochs += 1
            if total is None:
                sync(s.device)
                total = planned_steps(seconds, time.perf_counter() - t0, first_step_s,
                                      per_epoch)
            if step >= total:
                break
        sync(s.device)
    train_s = time.perf_counter() - t0
    net.eval()
    desc = (f"{z.robust_arch} PGD-{z.robust_train_pgd_steps} trained {train_s:.0f} s "
            f"({epochs} epochs) on {source}")
    s.shared["robust"] = (net, test, desc)
    s.shared["robust_train_s"] = train_s
    s.shared["robust_dataset"] = dataset
    return s.shared["robust"]


def planned_steps(seconds: float, first_epoch_s: float, first_step_s: float,
                  per_epoch: int) -> int:
    """Training steps (whole epochs) that fill ``seconds``, planned after the first epoch.

    The first step carries cuDNN's tuning and lazy initialisation, so the epoch rate is taken
    from the steps after it (a warm epoch); the first epoch's real time is spent already.
    """
    if per_epoch > 1:
        warm_epoch_s = (first_epoch_s - first_step_s) * per_epoch / (per_epoch - 1)
    else:  # no warm step to time
        warm_epoch_s = first_epoch_s
    more = int(max(seconds - first_epoch_s, 0.0) / max(warm_epoch_s, 1e-6))
    return per_epoch * (1 + more)


def _xy(test: Examples, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(n, len(test))
    return test.x[:n].to(device).float() / 255, test.y[:n].to(device)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    correct = sum((model(x[sl]).argmax(1) == y[sl]).sum().item() for sl in chunks(len(y), bs))
    return correct / max(len(y), 1)


def fwd_bwd_s(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Seconds of one float32 forward + backward to the input (the unit of an attack's cost)."""
    model.eval()
    xi = x.clone().requires_grad_(True)

    def once() -> None:
        (g,) = torch.autograd.grad(model(xi).float().sum(), xi)

    once()
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    sync(x.device)
    return (time.perf_counter() - t0) / reps


# --- the steps -----------------------------------------------------------------------------------

def step_environment(s: Suite) -> None:
    if s.on_cuda:
        props = torch.cuda.get_device_properties(s.device)
        s.record("env.gpu", torch.cuda.get_device_name(s.device))
        s.record("env.gpu_memory_gib", props.total_memory / 2**30)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.strip().splitlines()
            s.record("env.driver", out[0] if out else None, "" if out else "nvidia-smi: empty")
        except (OSError, subprocess.SubprocessError) as e:
            s.record("env.driver", None, f"nvidia-smi failed: {e}")
    else:
        s.record("env.gpu", None, f"no CUDA device: {platform.processor() or platform.machine()}"
                                  f" CPU, {torch.get_num_threads()} threads")
        s.record("env.gpu_memory_gib", None, "no CUDA device")
        s.record("env.driver", None, "no CUDA device")
    s.record("env.torch", torch.__version__)
    s.record("env.cuda", torch.version.cuda, "" if torch.version.cuda else "CPU-only torch build")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    s.record("env.cudnn", cudnn, "" if cudnn else "cuDNN not available")
    for peer in PEERS:
        v = peer_version(peer)
        s.record(f"env.peer.{peer}", v or "missing", "" if v else _missing(peer))
    tflops, what = matmul_tflops(s.device, s.sizes.matmul_n, s.sizes.matmul_reps)
    s.shared["probe_tflops"] = tflops
    sheet = mfu.peak_tflops(s.device, None)
    s.record("env.matmul_tflops", tflops,
             f"{what}" + (f"; datasheet dense bf16 peak {sheet:g}" if sheet else ""))
    s.record("env.datasheet_bf16_tflops", sheet,
             "" if sheet else "no datasheet peak for this device")
    s.record("env.clamp_grad_at_0_1", clamp_grad_at_bounds(s.device),
             "d clamp(x, 0, 1)/dx at x = 0 and x = 1 with this torch (robustness's input "
             "normaliser clamps first: 0 means PGD cannot move saturated pixels through it)")


def clamp_grad_at_bounds(device: torch.device) -> str:
    """The gradient of ``clamp(x, 0, 1)`` at x = 0 and x = 1, as ``"g0,g1"``.

    It has changed between torch versions; it decides whether an attack through robustness's
    normaliser can move pixels that sit exactly at 0 or 1.
    """
    x = torch.tensor([0.0, 1.0], device=device, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp(x, 0, 1).sum(), x)
    return ",".join(f"{v:g}" for v in g.tolist())


def parse_junit(path: Path) -> list[tuple[str, str, str]]:
    """``(test id, outcome, message)`` per test case of a pytest junit XML file.

    Outcomes: ``passed``, ``failed``, ``error``, ``skipped``, and ``collection error`` for a file
    pytest could not import (its id is the file); the message is the first line of the failure,
    error or skip reason (for a collection error, the last line: the exception).
    """
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "")
        file = cls.replace(".", "/") + ".py" if cls else ""
        tid = f"{file}::{case.get('name', '')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                lines = (el.get("message") or el.text or "").strip().splitlines()
                msg = lines[0][:200] if lines else ""
                if tag == "error" and not cls and msg == "collection failure":
                    outcome = "collection error"
                    tid = case.get("name", "").replace(".", "/") + ".py"
                    text = (el.text or "").strip().splitlines()
                    msg = text[-1][:200] if text else msg
                break
        out.append((tid, outcome, msg))
    return out


GPU_MARK = re.compile(r"\bpytest\.mark\.gpu\b")


def gpu_test_files(root: Path) -> list[str]:
    """The test files under ``root/tests`` that use the ``gpu`` mark, relative to ``root``.

    Only these are collected: an import error in any other test file must not stop the GPU
    tests (pytest stops the whole session at a collection error).
    """
    return sorted(str(f.relative_to(root)) for f in (root / "tests").rglob("test_*.py")
                  if GPU_MARK.search(f.read_text(encoding="utf-8", errors="replace")))


def step_gpu_tests(s: Suite) -> None:
    xml = s.out / "gpu-tests.xml"
    timeout = max(30.0, min(s.sizes.gpu_tests_timeout_s, s.remaining() - 60))
    files = gpu_test_files(ROOT)
    if not files:
        raise RuntimeError(f"no test file under {ROOT / 'tests'} uses pytest.mark.gpu")
    # a file that fails to import is reported (gpu_tests.collection_errors), the others still run
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pytest -m gpu ran past {timeout:.0f} s") from e
    (s.out / "gpu-tests.log").write_text(proc.stdout + proc.stderr)
    if not xml.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode} without a report: "
                           + " / ".join(tail))
    cases = parse_junit(xml)
    counts = {k: sum(1 for _, o, _ in cases if o == k)
              for k in ("passed", "failed", "error", "skipped", "collection error")}
    for tid, outcome, msg in cases:
        passed = {"passed": True, "failed": False, "error": False, "skipped": None,
                  "collection error": False}[outcome]
        s.record_pass(f"gpu_test {tid}", outcome, passed, msg)
    broken = [tid for tid, o, _ in cases if o == "collection error"]
    s.record_pass("gpu_tests.collection_errors", len(broken), not broken,
                  f"{len(files)} gpu-marked files collected"
                  + (f"; not importable: {', '.join(broken)}" if broken else ""))
    ran = counts["passed"] + counts["failed"] + counts["error"]
    s.record_pass("gpu_tests.ran", ran, None, f"{counts['skipped']} skipped")
    s.record_pass("gpu_tests.failed", counts["failed"] + counts["error"],
                  (counts["failed"] + counts["error"] == 0) if ran else None,
                  "" if ran else "no GPU test ran (no CUDA device)")
    sync_tests = [o for tid, o, _ in cases if "test_gpu_speed.py" in tid]
    if not sync_tests:
        s.record_pass("gpu_tests.no_host_sync", "absent", False,
                      "tests/test_gpu_speed.py was not collected")
    elif all(o == "skipped" for o in sync_tests):
        s.record_pass("gpu_tests.no_host_sync", "skipped", None, "no CUDA device")
    else:
        ok = all(o == "passed" for o in sync_tests)
        s.record_pass("gpu_tests.no_host_sync", "passed" if ok else "failed", ok,
                      f"{len(sync_tests)} tests in tests/test_gpu_speed.py")


STEP_COST_MAIN = ["standard", "pgd", "robust-amo", "robust-amo-refhook", "amo"]
STEP_COST_JLM = ["jacobian-lm", "jacobian-lm-batched", "jacobian-lm-random"]
STEP_COST_ROWS = STEP_COST_MAIN + STEP_COST_JLM
# one guarded measurement each: the main methods, then every Jacobian-LM variant with its own
# pgd reference (ratios are measured in one run), so one that raises loses only its own rows
STEP_COST_GROUPS = [STEP_COST_MAIN] + [["pgd", m] for m in STEP_COST_JLM]


def _step_cost_figures() -> list[tuple[str, str, Target | None]]:
    figs: list[tuple[str, str, Target | None]] = []
    for m in STEP_COST_ROWS:
        figs += [(f"step_cost.{m}.s_per_step", "s", None),
                 (f"step_cost.{m}.x_pgd", "× pgd",
                  Target("<=", 1.10) if m == "robust-amo" else None),
                 (f"step_cost.{m}.peak_mib", "MiB", None),
                 (f"step_cost.{m}.peak_x_pgd", "× pgd",
                  Target("<=", 1.3) if m == "robust-amo" else None)]
    figs.append(("step_cost.robust-amo.fused_vs_reference_hook", "×", Target("<=", 1.0)))
    figs.append(("step_cost.robust-amo.delta_floor_x_pgd", "× pgd", None))
    return figs


def step_step_cost(s: Suite) -> None:
    z = s.sizes
    base = {"arch": z.arch, "shape": z.shape, "batch": z.batch, "pgd_steps": z.pgd_steps,
            "steps": z.step_cost_steps, "device": s.device.type, "bf16": True}
    errors = []
    for group in STEP_COST_GROUPS:
        main = group is STEP_COST_MAIN
        rounds = z.step_cost_rounds if main else z.jlm_rounds
        try:
            res = step_cost.measure(step_cost.Settings(**base, rounds=rounds, methods=group))
        except Exception as e:  # one group's failure (e.g. out of memory) keeps the others
            own = group if main else group[1:]
            errors.append(f"{', '.join(own)}: {type(e).__name__}: {e}")
            for m in own:
                s.record(f"step_cost.{m}.s_per_step", None,
                         f"error: {type(e).__name__}: {e}"[:300])
            if s.on_cuda:
                torch.cuda.empty_cache()
            continue
        by = {r["method"]: r for r in res["results"]}
        for m, r in by.items():
            if not main and m == "pgd":
                continue  # the main group's pgd row is the reference; this one gave the ratio
            graph = f"graph {r['graph_mib']:.1f} MiB = {r['graph_vs_pgd']:.2f}× pgd"
            s.record(f"step_cost.{m}.s_per_step", r["s_per_step"],
                     f"{r['forward']} fwd, {r['backward']} bwd per step")
            s.record(f"step_cost.{m}.x_pgd", r["vs_pgd"])
            peak_note = "" if s.on_cuda else f"CUDA only; {graph}"
            s.record(f"step_cost.{m}.peak_mib", r["cuda_peak_mib"], peak_note)
            s.record(f"step_cost.{m}.peak_x_pgd", r["cuda_peak_vs_pgd"],
                     graph if s.on_cuda else peak_note)
            if m == "robust-amo":
                s.record("step_cost.robust-amo.delta_floor_x_pgd", r["floor_vs_pgd"],
                         f"graph × pgd that one δ per point ({r['delta_mib']:.1f} MiB) makes by "
                         f"itself: (pgd graph + δ) / pgd graph; the method's: {graph}")
        ratios = step_cost.hook_ratios(res["results"])
        if "robust-amo" in ratios:
            s.record("step_cost.robust-amo.fused_vs_reference_hook", ratios["robust-amo"],
                     "s/step with the fused perturbation ops / with the reference ops")
    if errors:
        raise RuntimeError("; ".join(errors))


COMPILED_ROWS = ["pgd", "robust-amo-compiled", "robust-amo-noarith"]


def step_compiled_points(s: Suite) -> None:
    """Robust AMO as ``compile: true`` trains it: the δ points' arithmetic as compiled kernels,
    against pgd in the same run, and the same step with that arithmetic replaced by the
    identity (what the rest of the step costs). Last, so that its compiling (tens of seconds
    on the first use) only spends budget that the other steps left."""
    z = s.sizes
    t0 = time.monotonic()
    res = step_cost.measure(step_cost.Settings(
        arch=z.arch, shape=z.shape, batch=z.batch, pgd_steps=z.pgd_steps,
        steps=z.step_cost_steps, rounds=z.step_cost_rounds, methods=COMPILED_ROWS,
        device=s.device.type, bf16=True, hook_backend="aot_eager" if s.smoke else "inductor"))
    by = {r["method"]: r for r in res["results"]}
    c, n = by["robust-amo-compiled"], by["robust-amo-noarith"]
    pgd_s = by["pgd"]["s_per_step"]
    s.record("step_cost.robust-amo-compiled.s_per_step", c["s_per_step"],
             f"{c['forward']} fwd, {c['backward']} bwd per step; pgd {pgd_s:.4g} s")
    s.record("step_cost.robust-amo-compiled.x_pgd", c["vs_pgd"],
             "compiled δ points (perturb.compiled_hook), as training with compile: true runs")
    s.record("step_cost.robust-amo-noarith.x_pgd", n["vs_pgd"],
             "the compiled step with the points' arithmetic replaced by the identity")
    s.record("step_cost.compiled_points_s", time.monotonic() - t0,
             "the whole step, compiling the kernels included")


def step_mfu(s: Suite) -> None:
    args = _bench_args(s)
    m = mfu.measure(args, s.device, s.sizes.pgd_steps)
    s.record("mfu.forward_gflop_per_image", m["forward_gflop"], f"{s.sizes.arch}, analytic")
    s.record("mfu.step_gflop_per_image", m["step_gflop"], f"PGD-{s.sizes.pgd_steps} step")
    s.record("mfu.images_per_s", m["images_per_s"], f"batch {s.sizes.batch}")
    s.record("mfu.tflops", m["tflops"])
    probe = s.shared.get("probe_tflops")
    if probe is None:
        probe, _ = matmul_tflops(s.device, s.sizes.matmul_n, s.sizes.matmul_reps)
    s.record("mfu.vs_probe", m["tflops"] / probe,
             f"the MFU: against the measured matmul ceiling {probe:.4g} TFLOP/s")
    sheet = mfu.peak_tflops(s.device, None)
    s.record("mfu.vs_datasheet", m["tflops"] / sheet if sheet else None,
             f"second column: datasheet {sheet:g} TFLOP/s (by name; not judged)" if sheet
             else "no datasheet peak for this device")
    s.record("mfu.epoch_s", CIFAR_TRAIN_IMAGES / m["images_per_s"],
             f"{CIFAR_TRAIN_IMAGES} images at the measured rate (extrapolated)")


def step_pgd_train(s: Suite) -> None:
    z = s.sizes
    ips = {}
    for fmt in ("bf16", "fp32"):
        args = _bench_args(s)
        args.no_bf16 = fmt == "fp32"
        native = NativeTrainer(args, s.device, steps=z.pgd_steps)
        ips[fmt] = native.images_per_s(z.warmup)
        del native
    layout = "channels_last" if s.on_cuda else "contiguous"
    bf16 = "bf16 autocast" if s.on_cuda else "float32 (no autocast on the CPU)"
    s.record("pgd_train.native_images_per_s", ips["bf16"],
             f"{z.arch}, batch {z.batch}, {bf16}, {layout}")
    s.record("pgd_train.native_fp32_images_per_s", ips["fp32"],
             f"{z.arch}, batch {z.batch}, float32, {layout}")
    s.record("pgd_train.bf16_vs_fp32", ips["bf16"] / ips["fp32"],
             "native bf16 / native float32: what the number format buys")
    peer_figs = ("robustness_images_per_s", "robustness_use_best0_images_per_s", "ratio",
                 "native_fp32_ratio")
    if peer_version("robustness") is None:
        for k in peer_figs:
            s.record(f"pgd_train.{k}", None, _missing("robustness"))
        return
    peer_args = _bench_args(s, iters=z.peer_iters, warmup=z.peer_warmup)
    cpu = "" if s.on_cuda else "; CPU: .cuda() no-op"
    theirs = robustness_images_per_s(peer_args, s.device)
    s.record("pgd_train.robustness_images_per_s", theirs,
             "train_model, float32, its defaults (use_best=1)" + cpu)
    plain = robustness_images_per_s(peer_args, s.device, use_best=0)
    s.record("pgd_train.robustness_use_best0_images_per_s", plain,
             "train_model, float32, use_best=0 (no extra forward per attack step)" + cpu)
    s.record("pgd_train.ratio", ips["bf16"] / theirs,
             "native bf16 / robustness as its users run it")
    s.record("pgd_train.native_fp32_ratio", ips["fp32"] / plain,
             "native float32 / robustness use_best=0: the implementation alone")


def step_eval(s: Suite) -> None:
    z = s.sizes
    model, test, desc = robust_model(s)
    x, y = _xy(test, z.eval_examples, s.device)
    s.record("eval.model", desc)
    s.record("eval.clean_acc", _accuracy(model, x, y, z.eval_batch),
             f"{len(y)} held-out examples")
    args = _bench_args(s, batch=z.eval_batch)
    native, theirs = eval_vs_robustness.native, eval_vs_robustness.robustness
    native(model, x[: z.eval_batch], y[: z.eval_batch], args, s.device, 2, 2)  # warm-up
    acc_n, t_n = native(model, x, y, args, s.device, z.eval_steps, z.eval_restarts)
    what = f"PGD-{z.eval_steps} × {z.eval_restarts}, {len(y)} examples, eps 8/255"
    s.record("eval.native_s", t_n, what)
    s.record("eval.native_robust_acc", acc_n)
    if peer_version("robustness") is None:
        for k in ("robustness_s", "robustness_robust_acc", "speedup", "acc_not_above_peer",
                  "peer_looped_s", "peer_looped_robust_acc", "speedup_vs_peer_looped",
                  "acc_not_above_peer_looped"):
            s.record(f"eval.{k}", None, _missing("robustness"))
        return
    theirs(model, x[: z.eval_batch], y[: z.eval_batch], args, s.device, 2, 2)  # warm-up
    acc_r, t_r = theirs(model, x, y, args, s.device, z.eval_steps, z.eval_restarts)
    s.record("eval.robustness_s", t_r, "random_restarts, use_best, its defaults: in "
             "robustness 1.2.1 every example keeps its last restart (≈ PGD-50 × 1)")
    s.record("eval.robustness_robust_acc", acc_r)
    s.record("eval.speedup", t_r / t_n, "vs robustness as its users run it")
    s.record("eval.acc_not_above_peer", acc_n <= acc_r,
             f"{acc_n:.4f} vs {acc_r:.4f}; a weak peer: judge against the looped one")
    acc_l, t_l = eval_vs_robustness.robustness_looped(model, x, y, args, s.device,
                                                      z.eval_steps, z.eval_restarts)
    s.record("eval.peer_looped_s", t_l, f"robustness's attacker, {z.eval_restarts} restarts "
             "looped here on the examples still robust")
    s.record("eval.peer_looped_robust_acc", acc_l)
    s.record("eval.speedup_vs_peer_looped", t_l / t_n)
    s.record("eval.acc_not_above_peer_looped", acc_n <= acc_l, f"{acc_n:.4f} vs {acc_l:.4f}")


def aa_extrapolate(per_attack: list[dict[str, Any]], n: int, full: int, ratio: float,
                   survivors: float | None) -> float | None:
    """Seconds of AutoAttack on ``full`` examples of the big model, attack by attack.

    Each attack's time is scaled by the examples it would attack there over those it attacked
    here, and by ``ratio`` (big model's forward+backward / this model's). The first attack takes
    this run's share of examples (the clean-correct ones); the later ones take ``survivors`` ×
    ``full`` (a stated fraction left robust), or this run's shares when ``survivors`` is None.
    None when an attack that would run there had nothing to attack here (no rate to scale).

    Args:
        per_attack: ``{"attack", "s", "attacked"}`` in the order the attacks ran.
        n: the examples of this run.
    """
    total = 0.0
    for i, a in enumerate(per_attack):
        share = a["attacked"] / n if i == 0 or survivors is None else survivors
        if share == 0:
            continue
        if a["attacked"] == 0:
            return None
        total += a["s"] * ratio * full * share / a["attacked"]
    return total


def step_autoattack(s: Suite) -> None:
    z = s.sizes
    if peer_version("pyautoattack") is None and peer_version("autoattack") is None:
        for name, _, _ in STEPS_BY_NAME["autoattack"].figures:
            s.record(name, None, _missing("pyautoattack (or autoattack)"))
        return
    model, test, _ = robust_model(s)
    x, y = _xy(test, z.aa_examples, s.device)
    stamps: list[tuple[str, float, int]] = []  # (attack, end time, robust after it)

    def on_step(res) -> None:
        sync(s.device)
        stamps.append((res.done[-1], time.perf_counter(), int(res.robust.sum().item())))

    sync(s.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum().item())
    sync(s.device)
    t_clean = time.perf_counter()
    res = autoattack_robust(model, x, y, AutoAttackSettings(eps=8 / 255, version="standard"),
                            on_step=on_step)
    total = time.perf_counter() - t0
    if not stamps or stamps[0][0] != "apgd-ce":
        raise RuntimeError(f"AutoAttack ran {[a for a, _, _ in stamps]}, not APGD-CE first")
    n = len(y)
    s.record("aa.examples", n, f"{n} held-out examples, eps 8/255, Linf standard")
    s.record("aa.clean_correct", clean, "examples the first attack gets")
    per_attack, before, t_prev = [], clean, t_clean
    for attack, t_end, robust in stamps:
        per_attack.append({"attack": attack, "s": t_end - t_prev, "attacked": before})
        s.record(f"aa.{attack}_s", t_end - t_prev, f"{before} examples attacked",
                 unit="s")
        s.record(f"aa.{attack}_survivors", robust, f"of {before} attacked", unit="examples")
        before, t_prev = robust, t_end
    ce = per_attack[0]
    s.record("aa.apgd_ce_examples_per_s", ce["attacked"] / ce["s"] if ce["attacked"] else None,
             f"{ce['attacked']} examples attacked in {ce['s']:.2f} s")
    s.record("aa.standard_examples_per_s", n / total,
             f"{total:.2f} s for the whole run, clean pass included")
    s.record("aa.robust_acc", res.robust.float().mean().item(),
             "; ".join(res.warnings)[:200] if res.warnings else "")
    # cost per example scales with the forward+backward time of the network: time both at
    # AutoAttack's precision (float32), in the same memory layout, on one batch of the inputs
    c, h, w = x.shape[1:]
    big = create_model(z.arch, 10, input_shape=(c, h, w)).to(s.device).eval()
    xb = x[: min(n, 128)]
    if s.on_cuda:  # the robust model was trained channels_last (NativeTrainer)
        big = big.to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        xb = xb.contiguous(memory_format=torch.channels_last)
    reps = 3 if s.smoke else 10
    ratio = fwd_bwd_s(big, xb, reps) / fwd_bwd_s(model, xb, reps)
    del big
    layout = "channels_last" if s.on_cuda else "contiguous"
    s.record("aa.fwd_bwd_ratio", ratio, f"{z.arch} / {z.robust_arch}, float32, both {layout}")
    assumed = aa_extrapolate(per_attack, n, AA_FULL_TEST, ratio, AA_ASSUMED_ROBUST)
    measured = aa_extrapolate(per_attack, n, AA_FULL_TEST, ratio, None)
    why = "" if assumed is not None else "; an attack had no example left here to time"
    s.record("aa.wrn28_10_10k_minutes", assumed / 60 if assumed is not None else None,
             f"{z.arch}, {AA_FULL_TEST} examples: each attack's time here × the examples it "
             f"would attack there / here × the forward+backward ratio; after APGD-CE, "
             f"{AA_ASSUMED_ROBUST:.0%} assumed still robust (a PGD-trained WRN-28-10); "
             "Square scaled per example too, an upper bound (its query loop costs about the "
             "same for fewer examples)" + why)
    s.record("aa.wrn28_10_10k_minutes_measured_shares",
             measured / 60 if measured is not None else None,
             "the same with this run's own survivor shares after each attack instead of "
             f"the assumed {AA_ASSUMED_ROBUST:.0%}")


def step_data(s: Suite) -> None:
    args = _bench_args(s, iters=s.sizes.data_iters)
    m = data_pipeline.measure(args, s.device, s.sizes.pgd_steps, s.sizes.data_rounds)
    s.record("data.loader_images_per_s", m["loader"], "robust_amo.data.Loader alone")
    s.record("data.fed_images_per_s", m["fed"], "PGD training fed by the Loader")
    s.record("data.prefetched_images_per_s", m["prefetched"], "PGD training on one batch")
    s.record("data.idle_fraction", m["idle"], "1 − fed / prefetched")
    s.record("data.loader_share", m["loader_share"],
             "fed / loader alone: the share of the epoch's wall time spent making batches")


STEPS = [
    Step("environment", "environment and matmul probe", step_environment, [
        ("env.gpu", "", None), ("env.gpu_memory_gib", "GiB", None), ("env.driver", "", None),
        ("env.torch", "", None), ("env.cuda", "", None), ("env.cudnn", "", None),
        *[(f"env.peer.{p}", "version", None) for p in PEERS],
        ("env.matmul_tflops", "TFLOP/s", None), ("env.datasheet_bf16_tflops", "TFLOP/s", None),
        ("env.clamp_grad_at_0_1", "", None),
    ], min_s=10),
    Step("gpu_tests", "pytest -m gpu", step_gpu_tests, [
        ("gpu_tests.ran", "tests", None),
        ("gpu_tests.failed", "tests", Target("==", 0, any_device=True)),
        ("gpu_tests.no_host_sync", "", Target("==", "passed", any_device=True)),
        ("gpu_tests.collection_errors", "files", Target("==", 0, any_device=True)),
    ], min_s=40, min_s_smoke=5),
    Step("step_cost", "training step cost of every method", step_step_cost,
         _step_cost_figures(), min_s=60, cudnn_benchmark=True),
    Step("mfu", "MFU of the native PGD-10 step", step_mfu, [
        ("mfu.forward_gflop_per_image", "GFLOP", None),
        ("mfu.step_gflop_per_image", "GFLOP", None),
        ("mfu.images_per_s", "images/s", None), ("mfu.tflops", "TFLOP/s", None),
        ("mfu.vs_probe", "fraction", Target(">=", 0.40)),
        ("mfu.vs_datasheet", "fraction", None),
        ("mfu.epoch_s", "s", Target("<=", 30)),
    ], min_s=15, cudnn_benchmark=True),
    Step("pgd_train", "native PGD-10 training vs robustness.train_model", step_pgd_train, [
        ("pgd_train.native_images_per_s", "images/s", None),
        ("pgd_train.native_fp32_images_per_s", "images/s", None),
        ("pgd_train.bf16_vs_fp32", "×", None),
        ("pgd_train.robustness_images_per_s", "images/s", None),
        ("pgd_train.robustness_use_best0_images_per_s", "images/s", None),
        ("pgd_train.ratio", "×", Target(">=", 2)),
        ("pgd_train.native_fp32_ratio", "×", None),
    ], min_s=45, cudnn_benchmark=True),
    Step("eval", "PGD-50 × 10 vs robustness random_restarts=10", step_eval, [
        ("eval.model", "", None), ("eval.clean_acc", "fraction", None),
        ("eval.native_s", "s", None), ("eval.native_robust_acc", "fraction", None),
        ("eval.robustness_s", "s", None), ("eval.robustness_robust_acc", "fraction", None),
        ("eval.speedup", "×", Target(">=", 3)),
        ("eval.acc_not_above_peer", "", None),
        ("eval.peer_looped_s", "s", None), ("eval.peer_looped_robust_acc", "fraction", None),
        ("eval.speedup_vs_peer_looped", "×", None),
        ("eval.acc_not_above_peer_looped", "", Target("==", True, any_device=True)),
    ], min_s=90, min_s_smoke=3, cudnn_benchmark=False),
    Step("autoattack", "AutoAttack standard throughput", step_autoattack, [
        ("aa.examples", "examples", None), ("aa.clean_correct", "examples", None),
        *[f for a in AA_STANDARD for f in ((f"aa.{a}_s", "s", None),
                                            (f"aa.{a}_survivors", "examples", None))],
        ("aa.apgd_ce_examples_per_s", "examples/s", None),
        ("aa.standard_examples_per_s", "examples/s", None),
        ("aa.robust_acc", "fraction", None), ("aa.fwd_bwd_ratio", "×", None),
        ("aa.wrn28_10_10k_minutes", "min", Target("<=", 30)),
        ("aa.wrn28_10_10k_minutes_measured_shares", "min", None),
    ], min_s=30, min_s_smoke=2, cudnn_benchmark=False),
    Step("data", "data pipeline idle time", step_data, [
        ("data.loader_images_per_s", "images/s", None),
        ("data.fed_images_per_s", "images/s", None),
        ("data.prefetched_images_per_s", "images/s", None),
        ("data.idle_fraction", "fraction", Target("<=", 0.02)),
        ("data.loader_share", "fraction", Target("<=", 0.02)),
    ], min_s=15, cudnn_benchmark=True),
    Step("compiled_points", "robust AMO with compiled δ points (compile: true)",
         step_compiled_points, [
             ("step_cost.robust-amo-compiled.s_per_step", "s", None),
             ("step_cost.robust-amo-compiled.x_pgd", "× pgd", Target("<=", 1.10)),
             ("step_cost.robust-amo-noarith.x_pgd", "× pgd", None),
             ("step_cost.compiled_points_s", "s", None),
         ], min_s=90, cudnn_benchmark=True),
]
STEPS_BY_NAME = {st.name: st for st in STEPS}


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise Killed(f"killed by signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_suite(suite: Suite, steps: list[Step]) -> bool:
    """Run ``steps`` in order, writing the figures after each; True when none failed."""
    for st in steps:
        suite.declare(st)
        suite.steps[st.name] = {"title": st.title, "status": "pending", "seconds": None,
                                "error": None, "cudnn_benchmark": st.cudnn_benchmark}
    suite.write()
    ok = True
    with _sigterm_raises():
        for i, st in enumerate(steps):
            state = suite.steps[st.name]
            need = st.min_s_smoke if suite.smoke else st.min_s
            if suite.remaining() < need:
                reason = (f"skipped: over budget ({suite.elapsed():.0f} s of "
                          f"{suite.budget_s:g} s used; the step needs about {need:g} s)")
                state.update(status="skipped", error=reason)
                suite.note_step(st, reason)
                suite.write()
                continue
            suite.current = st.name
            state["status"] = "running"
            t0 = time.monotonic()
            flag = (cudnn_benchmark(st.cudnn_benchmark) if st.cudnn_benchmark is not None
                    else contextlib.nullcontext())
            try:
                with flag:
                    st.run(suite)
                state["status"] = "ok"
            except Killed as e:
                state.update(status="killed", error=str(e))
                suite.note_step(st, f"{e} during this step")
                for later in steps[i + 1:]:
                    suite.steps[later.name].update(status="not run", error=str(e))
                    suite.note_step(later, f"not run: {e}")
                state["seconds"] = round(time.monotonic() - t0, 2)
                suite.write()
                raise
            except Exception as e:  # guarded: the next steps still run
                ok = False
                msg = f"{type(e).__name__}: {e}"
                state.update(status="error", error=msg,
                             traceback=traceback.format_exc(limit=8))
                suite.note_step(st, f"error: {msg}"[:300])
            finally:
                # the next step starts with the device memory this one held (models, graphs)
                gc.collect()
                if suite.on_cuda:
                    torch.cuda.empty_cache()
            state["seconds"] = round(time.monotonic() - t0, 2)
            suite.write()
    return ok


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.device_suite",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True,
                   help="folder for figures.json, figures.md and the GPU tests' report")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="time budget in seconds: steps that would start past it are skipped "
                        "(default 480)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and synthetic data on the CPU (the CI check)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding cifar10_jpegq75_test.npz (or cifar10.npz) for the "
                        "robust model of steps 6-7 (default: digits, no file)")
    p.add_argument("--steps", type=str, default="",
                   help="comma-separated subset of " + ", ".join(STEPS_BY_NAME)
                        + " (default: all, in order)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="default: cuda when available (--smoke: cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 1 with --smoke, else torch's default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the figures of an earlier run in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    names = [n.strip() for n in a.steps.split(",") if n.strip()] or list(STEPS_BY_NAME)
    unknown = [n for n in names if n not in STEPS_BY_NAME]
    if unknown:
        print(f"device_suite: unknown step(s) {unknown}; choose from "
              f"{', '.join(STEPS_BY_NAME)}", file=sys.stderr)
        return 2
    if (a.out / "figures.json").exists() and not a.overwrite:
        print(f"device_suite: {a.out}/figures.json exists; pass --overwrite or another --out",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    if a.threads or a.smoke:
        torch.set_num_threads(a.threads or 1)
    device = resolve_device("cpu" if a.smoke and a.device == "auto" else a.device)
    suite = Suite(a.out, a.budget_s, a.smoke, device, a.data_dir,
                  Sizes.smoke() if a.smoke else Sizes())
    try:
        ok = run_suite(suite, [STEPS_BY_NAME[n] for n in names])
    except Killed:
        return 143
    except RobustAmoError as e:
        print(f"device_suite: {e}", file=sys.stderr)
        return 2
    for name, st in suite.steps.items():
        print(f"{name:12s} {st['status']:8s} {st['seconds'] or 0:7.1f} s  {st['error'] or ''}")
    print(f"figures: {a.out / 'figures.json'}, {a.out / 'figures.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
