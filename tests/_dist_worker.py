"""Worker process of the distributed tests: joins a gloo group as torchrun would, runs a job.

Kept out of the test module so that ``torch.multiprocessing`` spawn can import it by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def run(rank: int, world_size: int, port: int, job: dict) -> None:
    """Set torchrun's environment variables, then train/evaluate as ``job`` says.

    ``job``: ``{"train": [(cfg_dict, resume), ...], "out": folder for results}``.
    """
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from robust_amo import distributed
    from robust_amo.config import TrainConfig, from_dict, validate
    from robust_amo.train import train

    out = Path(job["out"])
    with distributed.session(torch.device("cpu")) as (ctx, _):
        for cfg_dict, resume in job["train"]:
            cfg = from_dict(TrainConfig, cfg_dict)
            validate(cfg)
            train(cfg, resume=resume)
        # the sharding helpers inside a real group: every example lands exactly once
        n, b = 23, 4
        idx = distributed.shard_batches(n, b, ctx.rank, ctx.world_size)
        values = torch.arange(n)[idx] * 3 + 1
        mask = (torch.arange(n)[idx] % 3) == 0
        full = distributed.assemble(values, idx, n)
        full_mask = distributed.assemble(mask, idx, n)
        count = distributed.all_reduce_sum(torch.tensor([len(idx)]))
        (out / f"helpers_rank{ctx.rank}.json").write_text(json.dumps(
            {"values": full.tolist(), "mask": full_mask.tolist(), "count": count.item(),
             "mask_dtype": str(full_mask.dtype)}))
