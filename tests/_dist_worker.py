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

    ``job``: ``{"train": [(cfg_dict, resume), ...], "eval": [argv of robust-amo eval, ...],
    "masks": checkpoint to evaluate with ``evaluate_attacks`` directly (or None),
    "out": folder for results}``.
    """
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from robust_amo import distributed
    from robust_amo.cli import main as cli_main
    from robust_amo.config import TrainConfig, from_dict, validate
    from robust_amo.train import train

    out = Path(job["out"])
    with distributed.session(torch.device("cpu")) as (ctx, _):
        for cfg_dict, resume in job["train"]:
            cfg = from_dict(TrainConfig, cfg_dict)
            validate(cfg)
            train(cfg, resume=resume)
        for argv in job.get("eval", []):
            assert cli_main(argv) == 0, argv
        if job.get("masks"):
            chunks: list[tuple[str, int]] = []
            masks = eval_masks(job["masks"], chunks)
            torch.save({"masks": masks, "chunks": chunks}, out / f"masks_rank{ctx.rank}.pt")
        # the sharding helpers inside a real group: every example lands exactly once
        n, b = 23, 4
        idx = distributed.shard_batches(n, b, ctx.rank, ctx.world_size)
        values = torch.arange(n)[idx] * 3 + 1
        mask = (torch.arange(n)[idx] % 3) == 0
        full = distributed.assemble(values, idx, n)
        full_mask = distributed.assemble(mask, idx, n)
        count = distributed.all_reduce_sum(torch.tensor([len(idx)]))
        assert distributed.global_batch(16) == 16 * world_size
        (out / f"helpers_rank{ctx.rank}.json").write_text(json.dumps(
            {"values": full.tolist(), "mask": full_mask.tolist(), "count": count.item(),
             "mask_dtype": str(full_mask.dtype)}))


def eval_masks(checkpoint: str, chunks: list | None = None) -> dict[str, torch.Tensor]:
    """Per-example masks of clean, PGD-3 x 2 and PGD-4 (no restarts) on 45 digits test images.

    45 examples in chunks of 8: 6 chunks, the last one partial, so the two ranks get 3 each.
    ``chunks`` collects the (attack, chunk) pairs this process computed.
    """
    from robust_amo.evaluation import evaluate_attacks, parse_attack
    from robust_amo.evaluation.loading import load_eval_data, load_model

    model, meta = load_model(checkpoint, torch.device("cpu"))
    data = load_eval_data(meta, split="test", n_examples=45)
    specs = [parse_attack(a, eps=0.1, restarts=r, seed=4) for a, r in
             (("clean", None), ("pgd3", 2), ("pgd4", 1))]
    out = {}
    record = (lambda name, c: chunks.append((name, c))) if chunks is not None else None
    for o in evaluate_attacks(model, data.x, data.y, specs, batch_size=8, interrupt=record):
        out[f"{o.spec.name}/clean"] = o.clean
        out[f"{o.spec.name}/robust"] = o.robust
        out.update({f"{o.spec.name}/{k}": v for k, v in o.steps.items()})
    return out
