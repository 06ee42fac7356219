"""``robust-amo eval`` across the ranks of a torchrun job: whole chunks per rank, masks gathered.

The runner cuts the evaluation set into chunks of ``batch_size`` consecutive examples; under
torchrun chunk c is attacked by rank ``c % world_size``
(``robust_amo.distributed.shard_batches``). Every attack keys its randomness by the example's
global index and sees the same chunk as in a single-process run, so each rank computes exactly
the masks one process would for its chunks; :func:`gather_outcome` puts the per-example masks
of all ranks together (a sum of disjoint scatters: exact), so every rank ends with the full,
single-process result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robust_amo import distributed

from .outcome import AttackOutcome


def state_file(path: str | Path | None) -> Path | None:
    """Each rank keeps its own resume state: ``x.state.pt`` -> ``x.state.rank1of4.pt``.

    A rank only resumes chunks it computed itself; after a change of the number of ranks the
    chunks that moved to another rank are computed again.
    """
    if path is None:
        return None
    path, ctx = Path(path), distributed.current()
    if not ctx.enabled:
        return path
    return path.with_suffix(f".rank{ctx.rank}of{ctx.world_size}{path.suffix}")


def my_chunks(n: int, batch_size: int) -> list[int]:
    """The chunk numbers this rank evaluates (all of them in a single process)."""
    ctx = distributed.current()
    return distributed.batch_ids(n, batch_size, ctx.rank, ctx.world_size)


def gather_outcome(outcome: AttackOutcome, n: int, batch_size: int) -> AttackOutcome:
    """Turn this rank's outcome (masks of its chunks, in chunk order) into the full one.

    Masks are assembled over ranks; warnings are merged in rank order without duplicates;
    ``wall_time_s``, ``resumed_chunks`` and the passes (``forward_passes``, ``backward_passes``,
    ``sub_passes``) are summed (compute time and work over all ranks); the kept adversarial
    points (``adv``) are put in example order.
    """
    ctx = distributed.current()
    if not ctx.enabled:
        return outcome
    index = distributed.shard_batches(n, batch_size, ctx.rank, ctx.world_size)
    broken = index[(outcome.clean & ~outcome.robust).to(index.device)]
    infos = distributed.gather_objects(
        (list(outcome.steps), outcome.warnings, outcome.wall_time_s, outcome.resumed_chunks,
         outcome.forward_passes, outcome.backward_passes, outcome.sub_passes,
         list(outcome.individual),
         broken.cpu(), None if outcome.adv is None else outcome.adv.cpu()))
    names = next((info[0] for info in infos if info[0]), [])
    solo = next((info[7] for info in infos if info[7]), [])
    empty = torch.zeros(0, dtype=torch.bool)
    outcome.clean = distributed.assemble(outcome.clean, index, n)
    outcome.robust = distributed.assemble(outcome.robust, index, n)
    outcome.steps = {k: distributed.assemble(outcome.steps.get(k, empty), index, n)
                     for k in names}
    outcome.individual = {k: distributed.assemble(outcome.individual.get(k, empty), index, n)
                          for k in solo}
    warnings: list[str] = []
    for info in infos:
        warnings += [w for w in info[1] if w not in warnings]
    outcome.warnings = warnings
    outcome.wall_time_s = sum(info[2] for info in infos)
    outcome.resumed_chunks = sum(info[3] for info in infos)
    outcome.forward_passes = sum(info[4] for info in infos)
    outcome.backward_passes = sum(info[5] for info in infos)
    sub: dict[str, tuple[int, int]] = {}
    for info in infos:
        for k, (f, b) in info[6].items():
            f0, b0 = sub.get(k, (0, 0))
            sub[k] = (f0 + f, b0 + b)
    outcome.sub_passes = sub
    # a rank that broke nothing (or got no chunk) may hold no points; any other rank without
    # them means they were not kept
    parts = [(info[8], info[9]) for info in infos if len(info[8])]
    if parts and all(points is not None for _, points in parts):
        where = torch.cat([w for w, _ in parts])
        outcome.adv = torch.cat([p for _, p in parts])[where.argsort()]
    else:
        outcome.adv = None
    return outcome
