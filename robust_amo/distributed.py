"""Data-parallel plumbing for ``torchrun``: process group, DDP wrapping, sharding, reductions.

``torchrun --nproc-per-node N -m robust_amo.cli train ...`` starts N processes with the
environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/
``MASTER_PORT``); :func:`session` reads them, joins the process group (NCCL on CUDA, gloo on the
CPU) and leaves it afterwards. Without those variables everything here is a no-op for one process,
so the trainer and the evaluator run the same code in both cases.

Conventions (docs/distributed.md):

- ``batch_size`` in the config is the *global* batch: each of the N ranks takes
  ``batch_size / N`` examples of every global batch, so a run on N ranks follows the same
  optimisation trajectory as one process (up to floating-point summation order).
- Rank 0 writes checkpoints and metrics; the others wait at a barrier.
- Counts (correct predictions, losses, robust masks) are summed across ranks, so every rank sees
  the same metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and logs (rank 0)."""
        return self.rank == 0


def env_context() -> DistContext:
    """The :class:`DistContext` described by torchrun's environment variables.

    Raises:
        ConfigError: some but not all of RANK/WORLD_SIZE/LOCAL_RANK are set, or they are
            not integers, or the rank is out of range.
    """
    present = [v for v in ENV_VARS if v in os.environ]
    if not present:
        return DistContext()
    if len(present) != len(ENV_VARS):
        missing = sorted(set(ENV_VARS) - set(present))
        raise ConfigError(
            f"distributed environment incomplete: {', '.join(missing)} not set; launch with "
            "`torchrun --nproc-per-node N -m robust_amo.cli ...` or unset RANK, WORLD_SIZE "
            "and LOCAL_RANK"
        )
    try:
        rank, world, local = (int(os.environ[v]) for v in ENV_VARS)
    except ValueError:
        raise ConfigError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            + ", ".join(f"{v}={os.environ[v]!r}" for v in ENV_VARS)
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent distributed environment: RANK={rank}, "
                          f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return DistContext(rank, world, local)


def current() -> DistContext:
    """The context of the joined process group (rank 0 of 1 when none is joined)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistContext()


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the rank that writes files."""
    return current().is_main


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """On CUDA, rank ``LOCAL_RANK`` of a node drives GPU ``LOCAL_RANK``; other devices unchanged."""
    if device.type != "cuda" or not ctx.enabled:
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={ctx.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
            "start at most that many processes per node (--nproc-per-node)"
        )
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the process group torchrun describes (if any) for the duration of the block.

    Args:
        device: the device asked for; on CUDA each rank gets ``cuda:LOCAL_RANK``.

    Yields:
        ``(context, device)``. A group joined here is left at exit; one joined by the caller
        beforehand is used as is and left alone.
    """
    if dist.is_available() and dist.is_initialized():
        ctx = current()
        yield ctx, device_for(ctx, device)
        return
    ctx = env_context()
    if not ctx.enabled:
        yield ctx, device
        return
    device = device_for(ctx, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d (%s, %s)", ctx.rank, ctx.world_size, backend,
             device)
    try:
        yield ctx, device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if current().enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (``t`` unchanged in a single process)."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when several ranks take part, else ``model``.

    DDP averages gradients over ranks in ``backward``; since each rank's loss is the mean over
    its ``batch_size / N`` examples, the averaged gradient is that of the global batch.
    """
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def per_rank_batch(batch_size: int, ctx: DistContext) -> int:
    """This rank's share of the global ``batch_size``.

    Raises:
        ConfigError: ``batch_size`` is not divisible by the number of ranks.
    """
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and must be divisible by the number of "
            f"processes ({ctx.world_size}); use e.g. batch_size="
            f"{max(ctx.world_size, batch_size - batch_size % ctx.world_size)}"
        )
    return batch_size // ctx.world_size


def global_batch(n_local: int) -> int:
    """The global batch size whose share on this rank has ``n_local`` examples.

    A per-example step that is defined through the gradient of a *batch-mean* loss (the δ ascent
    of (robust) AMO with ``delta_grad="mean"``) must divide by this, not by the local size, or N
    ranks take δ steps N times larger than one process with the same global batch.
    """
    return n_local * current().world_size


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of the examples this rank evaluates: whole batches, dealt round-robin.

    The n examples are cut into the batches a single process would use
    (``[0, b), [b, 2b), ...``) and batch i goes to rank ``i % world_size``. Keeping the batches
    whole means every example is attacked in the same batch (same shapes, same per-batch seeds)
    as in a single-process run, so a sharded evaluation reproduces it exactly; no example is
    dropped or repeated.

    Returns:
        int64 indices (ascending) of this rank's examples; empty when it gets no batch.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad shard: rank {rank}, world_size {world_size}, batch {batch_size}")
    starts = range(rank * batch_size, n, world_size * batch_size)
    parts = [torch.arange(s, min(s + batch_size, n)) for s in starts]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def batch_ids(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Global batch numbers of this rank's batches under :func:`shard_batches`."""
    return list(range(rank, -(-n // batch_size), world_size))


def assemble(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The full per-example tensor of n entries from every rank's ``values`` at ``index``.

    Each example must belong to exactly one rank. The result is built by scattering the local
    values into zeros and summing over ranks, which is exact for integer and boolean data (and
    for floats, as every entry has one non-zero contributor).

    Args:
        values: this rank's per-example values (k, ...); bool is supported.
        index: their global positions (k,).
        n: the total number of examples.

    Returns:
        (n, ...) tensor on ``values``' device, identical on every rank (communicated through
        :func:`comm_device`, so CPU masks work under NCCL too).
    """
    is_bool = values.dtype == torch.bool
    dev = comm_device()
    src = (values.to(torch.uint8) if is_bool else values).to(dev)
    out = torch.zeros((n, *values.shape[1:]), dtype=src.dtype, device=dev)
    out[index.to(dev)] = src
    all_reduce_sum(out)
    out = out.to(values.device)
    return out.bool() if is_bool else out


def comm_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under NCCL, else the CPU."""
    if current().enabled and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not current().enabled:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
