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
    ``wall_time_s``, ``resumed_chunks`` and ``forward_passes`` are summed (compute time and
    work over all ranks).
    """
    ctx = distributed.current()
    if not ctx.enabled:
        return outcome
    index = distributed.shard_batches(n, batch_size, ctx.rank, ctx.world_size)
    infos = distributed.gather_objects(
        (list(outcome.steps), outcome.warnings, outcome.wall_time_s, outcome.resumed_chunks,
         outcome.forward_passes))
    names = next((names for names, *_ in infos if names), [])
    empty = torch.zeros(0, dtype=torch.bool)
    outcome.clean = distributed.assemble(outcome.clean, index, n)
    outcome.robust = distributed.assemble(outcome.robust, index, n)
    outcome.steps = {k: distributed.assemble(outcome.steps.get(k, empty), index, n)
                     for k in names}
    warnings: list[str] = []
    for _, ws, *_ in infos:
        warnings += [w for w in ws if w not in warnings]
    outcome.warnings = warnings
    outcome.wall_time_s = sum(t for _, _, t, _, _ in infos)
    outcome.resumed_chunks = sum(r for _, _, _, r, _ in infos)
    outcome.forward_passes = sum(f for *_, f in infos)
    return outcome
