"""Where and how computations run: device choice, bf16 autocast, eval mode, seeds, copies.

The bottom layer beside :mod:`robust_amo.errors` and :mod:`robust_amo.config`: everything above
(models, attacks, methods, the trainer, the evaluator) asks these helpers instead of writing its
own, so a rule such as "attacks run in eval mode and give the mode back" or "every seed comes
from the run's seed through :func:`derive_seed`" is written once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import RobustAmoError

_MASK63 = (1 << 63) - 1

Amp = Callable[[], contextlib.AbstractContextManager]
"""A factory of the context that forward passes run in (bf16 autocast or nothing)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error.

    Raises:
        RobustAmoError: CUDA was asked for and none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobustAmoError(f"device {name!r} needs CUDA, which is not available here; use "
                             "cpu", params=("device",))
    return dev


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def amp_factory(device: torch.device, enabled: bool) -> Amp:
    """``lambda: autocast(device, enabled)``: what the trainer and the evaluator pass around."""
    return lambda: autocast(device, enabled)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and give its previous mode back, also on error.

    Attacks, evaluators and margin estimates all run the model this way (BatchNorm running
    statistics, no dropout), whatever mode the caller left it in.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def derive_seed(seed: int, *keys: int | str) -> int:
    """The seed of one stream of randomness of a run: a 63-bit hash of ``(seed, *keys)``.

    Every generator of the project is seeded through this, with a name for its purpose first,
    e.g. ``derive_seed(cfg.seed, "train-attack", epoch, rank)`` or ``derive_seed(seed,
    "pgd-eval", index, restart)``. Distinct keys give unrelated streams (an arithmetic mix such
    as ``seed * 1_000_003 + epoch`` makes different streams collide), and the value is the same
    in every process and on every platform (no ``hash()`` randomisation).

    Args:
        seed: the user's seed (any int, also negative or beyond 64 bits).
        *keys: the purpose (a string) and the indices that tell streams apart (ints).

    Returns:
        an int in [0, 2**63), accepted by ``torch.Generator.manual_seed``.
    """
    text = repr((int(seed), *keys)).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream, which would stall the
    training loop once per batch; a pinned staging copy with ``non_blocking=True`` does not.
    A tensor already on a CUDA device is moved as it is (it cannot be pinned).
    """
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16 tensors (losses under autocast), unchanged for float32/float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


_STOP = threading.Event()


def check_stop() -> None:
    """Raise KeyboardInterrupt if a SIGTERM arrived inside :func:`sigterm_as_interrupt`.

    The handler raises at once, but an exception raised while Python runs a finalizer or a
    weakref callback is printed and dropped ("Exception ignored in ..."); a loop that calls
    this at each step stops at the next one instead of running on.
    """
    if _STOP.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so ``finally`` blocks
    close files and stop child processes (a study runner, a worker); outside it SIGTERM is back
    to what it was. The signal is also remembered for :func:`check_stop` until the block ends.
    Signal handlers belong to the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        _STOP.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STOP.clear()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM are held; when it ends they act as they would have
    (a KeyboardInterrupt raised there, ``check_stop`` set, or the default end of the process).

    For code that an exception raised halfway would break rather than stop: ``torch.save``
    turns an exception raised inside one of its writes into a RuntimeError ("unexpected pos")
    or, when the file closes first, aborts the process, so a Ctrl-C or SIGTERM during a
    checkpoint write ended a run with a traceback instead of as interrupted. Keep the block
    short (a checkpoint write). Signal handlers belong to the main thread: elsewhere nothing
    changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler installed outside Python, which signal cannot put back
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when the thread that started it exits."""


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child get SIGTERM when this
    process dies, however it dies (``kill -9`` too); None where Linux's ``prctl`` is missing.

    A study runner starts its jobs so: a job outliving its runner would keep its run folder
    locked and the rerun would fail that run. The C library is looked up here, in the parent,
    because the child between fork and exec must not load libraries; a parent that died before
    the child set the signal is caught by comparing the child's parent with this process.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: nobody waits
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def stop_group(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group ``pid`` leads (a child started with
    ``start_new_session=True``), so the child's own children stop with it; a group that is
    gone already is no error."""
    if not hasattr(os, "killpg"):  # Windows: no process groups
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
