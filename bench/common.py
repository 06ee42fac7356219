"""Shared pieces of the speed benchmarks: options, timing, the native PGD step, FLOP counting.

Every benchmark times both sides in the same process, on the same device, model and batch, and
prints the ratio on its last line. Run from the repository root, e.g.
``python -m bench.mfu --device cuda``; ``--help`` lists the size options (tiny values make a
CPU smoke run, see tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import TypeVar

import torch
from torch import nn

from robust_amo.attacks import PGD
from robust_amo.compiled import CompiledModel
from robust_amo.config import TrainConfig
from robust_amo.data import Examples, Loader
from robust_amo.methods import build_objective
from robust_amo.models import create_model
from robust_amo.runtime import amp_factory, resolve_device
from robust_amo.train import make_optimizer, train_step

T = TypeVar("T")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def fraction(s: str) -> float:
    """argparse type for numbers written as fractions (8/255) or decimals (0.03, 2e-4)."""
    try:
        return float(Fraction(s.strip()))
    except ZeroDivisionError as e:  # argparse reports ValueErrors as a usage error
        raise ValueError(s) from e


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: device, model, batch, image size, iterations."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run both sides (default: cuda when available)")
    p.add_argument("--arch", type=str, default="wrn28-10", help="architecture (default wrn28-10)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--image-size", type=int, default=32, help="square image side (default 32)")
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--eps", type=fraction, default=8 / 255, help="L-inf radius (default 8/255)")
    p.add_argument("--step-size", type=fraction, default=2 / 255,
                   help="PGD step size (default 2/255)")
    p.add_argument("--no-bf16", action="store_true", help="native side in float32")
    p.add_argument("--compile", action="store_true", help="native side with torch.compile")
    return p


def header(device: torch.device) -> str:
    """One line naming the machine, device, torch version and date (for docs/benchmarks.md)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (f"# device: {device.type} ({name or platform.machine()}), "
            f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def device_from(args: argparse.Namespace) -> torch.device:
    """The device asked for (``auto``: cuda when available)."""
    return resolve_device(args.device)


def sync(device: torch.device) -> None:
    """Wait for queued device work (timing boundaries only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)`` (the batches of a set)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def make_model(args: argparse.Namespace, device: torch.device, num_classes: int = 10) -> nn.Module:
    """The benchmark's model, freshly initialised (seed 0), in float32 on ``device``."""
    torch.manual_seed(0)
    shape = (args.channels, args.image_size, args.image_size)
    mean = CIFAR_MEAN[: args.channels] if args.channels <= 3 else (0.5,) * args.channels
    std = CIFAR_STD[: args.channels] if args.channels <= 3 else (0.25,) * args.channels
    return create_model(args.arch, num_classes, input_shape=shape, mean=mean, std=std).to(device)


def synthetic_split(args: argparse.Namespace, n: int, num_classes: int = 10) -> Examples:
    """n random uint8 images with random labels (throughput does not depend on the content)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, args.channels, args.image_size, args.image_size), generator=g,
                      dtype=torch.uint8)
    return Examples(x, torch.randint(0, num_classes, (n,), generator=g))


class NativeTrainer:
    """robust-amo's PGD training step exactly as ``robust_amo.train`` runs it.

    bf16 autocast and channels_last on CUDA, fused SGD, the uint8 set on the device with
    crop/flip done there, PGD from ``robust_amo.attacks`` (eval mode, random start), ``train_step``.
    ``split``: the training images (default: ``args.iters + args.warmup`` synthetic batches);
    ``augment``: crop/flip them (default True; not for 8×8 digits, which it destroys).
    """

    def __init__(self, args: argparse.Namespace, device: torch.device, steps: int = 10,
                 model: nn.Module | None = None, split: Examples | None = None,
                 augment: bool = True) -> None:
        self.device = device
        cfg = TrainConfig(arch=args.arch, method="pgd", batch_size=args.batch_size,
                          bf16=not args.no_bf16)
        cfg.attack = cfg.attack.replace(eps=args.eps, step_size=args.step_size, steps=steps)
        self.net = model if model is not None else make_model(args, device)
        self.channels_last = device.type == "cuda"
        # cudnn.benchmark is the caller's to set (cudnn_benchmark below): a global flag set here
        # would stay on for whatever the process times next
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.fwd = CompiledModel(self.net) if args.compile else self.net
        self.optimizer = make_optimizer(self.net, cfg, device)
        a = cfg.attack
        attack = PGD(self.fwd, a.eps, a.step_size, a.steps, a.norm, True, 1, a.loss,
                     torch.Generator().manual_seed(0))
        self.objective = build_objective(cfg, attack)
        self.amp = amp_factory(device, cfg.bf16)
        if split is None:  # synthetic: throughput does not depend on the content
            split = synthetic_split(args, args.batch_size * (args.iters + args.warmup))
        self.loader = Loader(split, args.batch_size, device, shuffle=True, augment=augment,
                             drop_last=True)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches as the trainer sees them (channels_last on CUDA)."""
        for x, y in self.loader:
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last
                   else x), y

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One PGD-k training step (no host sync)."""
        self.net.train()
        train_step(self.fwd, self.objective, self.optimizer, x, y, self.amp)

    def images_per_s(self, warmup: int) -> float:
        """Throughput over the batches after the first ``warmup`` (data loading included)."""
        t0, timed = 0.0, 0
        for i, (x, y) in enumerate(self.batches()):
            if i == warmup:
                sync(self.device)
                t0 = time.perf_counter()
            self.step(x, y)
            timed += len(y) if i >= warmup else 0
        sync(self.device)
        return timed / (time.perf_counter() - t0)


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = on`` inside, the previous setting restored after.

    On, cuDNN tunes every convolution for each new input shape the first time it sees it: right
    for fixed-shape training (``robust_amo.train`` turns it on), wrong where batches shrink
    (attacks that drop broken examples), which would re-tune inside the timed region.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def matmul_tflops(device: torch.device, n: int, reps: int) -> tuple[float, str]:
    """Dense matmul throughput: bf16 n×n on CUDA (tensor cores), float32 on the CPU.

    The measured ceiling the MFU is judged against first (a datasheet peak does not say which
    variant of a GPU, its clocks or its power limit).
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    return 2 * n**3 / dt / 1e12, f"{str(dtype).split('.')[1]} {n}x{n} matmul"


@contextlib.contextmanager
def cuda_noop_patch(device: torch.device) -> Iterator[None]:
    """BENCHMARK-ONLY PATCH, CPU SMOKE RUNS ONLY: make ``.cuda()`` a no-op for robustness.

    ``robustness`` hard-codes ``.cuda()`` in its training loop and attacker. On a machine
    without a GPU this patch lets its code run on the CPU so the benchmark script can be
    smoke-tested; its figures are then CPU figures of the same code. On CUDA nothing is patched.
    """
    if device.type == "cuda":
        yield
        return
    saved = (torch.Tensor.cuda, nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]


def patched_note(device: torch.device) -> str:
    """What a robustness row adds to its line when :func:`cuda_noop_patch` was in effect."""
    return "  (CPU: .cuda() patched to a no-op for this run)" if device.type != "cuda" else ""


class ZeroOneDataset:
    """What robustness's ``AttackerModel`` needs of a dataset: mean 0, std 1.

    robust-amo models normalise inside, so robustness's own normalisation must be the identity;
    both sides then run the very same network on the very same [0, 1] inputs.
    """

    def __init__(self, channels: int) -> None:
        self.mean = torch.zeros(channels)
        self.std = torch.ones(channels)


def forward_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Analytic FLOPs of one forward of ``x`` through the convolutions and linear layers.

    A multiply-add counts 2 FLOPs; normalisation, activations and pooling are not counted (the
    usual convention for model FLOP utilisation). Returns ``(total, first_layer)`` per batch;
    the first layer matters because the training backward needs no gradient of the input.
    """
    counts: list[int] = []

    def hook(m: nn.Module, inp, out) -> None:
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            counts.append(2 * out.numel() * k)
        else:
            counts.append(2 * out.numel() * m.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sum(counts), (counts[0] if counts else 0)


def pgd_step_flops(fwd: int, first: int, steps: int) -> int:
    """FLOPs of one PGD-k training step from the forward FLOPs (see docs/benchmarks.md).

    Each attack step is a forward plus the backward to the input (every layer's input gradient,
    about one forward); the weight update is a forward plus the backward to the weights (one
    forward) and to the inputs of all layers but the first.
    """
    return steps * 2 * fwd + 3 * fwd - first


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / max(iters, 1)


def best_time(fn: Callable[[], T], device: torch.device, repeats: int,
              warmup: int = 0) -> tuple[float, T]:
    """``(seconds, result)``: the fastest of ``repeats`` (at least one) calls of ``fn``.

    ``warmup`` untimed calls come first; the result is that of the last timed call.
    """
    for _ in range(warmup):
        fn()
    best, out = math.inf, None
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out  # type: ignore[return-value]
