"""How long the GPU waits for data: PGD-10 training with the real loader vs a prefetched batch.

robust-amo keeps the uint8 training set on the device and crops/flips there (``robust_amo.data
.Loader``). This benchmark runs the native PGD-10 training step twice over the same number of
batches: fed by the loader (shuffle + augmentation, as in training) and fed one batch prepared
in advance (no data work at all). The difference is the time the data pipeline adds to
training; its share of the loader-fed time is the idle fraction it causes, printed last.
Reference: a torchvision DataLoader with CPU crop/flip, as robustness uses, is timed alone.

Target (issue 7): the data pipeline is not the bottleneck (idle fraction near 0) on one GPU:

    python -m bench.data_pipeline --device cuda --arch wrn28-10 --batch-size 128
"""

from __future__ import annotations

import time

import torch

from bench.common import (
    NativeTrainer,
    base_parser,
    device_from,
    header,
    sync,
    synthetic_split,
    timed,
)


def loader_images_per_s(trainer: NativeTrainer) -> float:
    """The loader alone: batches per second when nothing else runs."""
    sync(trainer.device)
    t0, n = time.perf_counter(), 0
    for _x, y in trainer.batches():
        n += len(y)
    sync(trainer.device)
    return n / (time.perf_counter() - t0)


def torchvision_images_per_s(args, device: torch.device, workers: int) -> float:
    """A CPU DataLoader with RandomCrop(4)+flip, moving batches to the device (the usual way)."""
    import torchvision.transforms.v2 as T

    split = synthetic_split(args, args.batch_size * (args.iters + args.warmup))
    tf = T.Compose([T.RandomCrop(args.image_size, padding=4), T.RandomHorizontalFlip(),
                    T.ToDtype(torch.float32, scale=True)])
    ds = [(split.x[i], split.y[i]) for i in range(len(split))]
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                     num_workers=workers,
                                     collate_fn=lambda b: (torch.stack([tf(x) for x, _ in b]),
                                                           torch.stack([y for _, y in b])))
    sync(device)
    t0, n = time.perf_counter(), 0
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += len(y)
    sync(device)
    return n / (time.perf_counter() - t0)


def measure(args, device: torch.device, steps: int = 10, rounds: int = 3) -> dict[str, float]:
    """The data pipeline's share of PGD-``steps`` training (``args``: base_parser's options).

    Returns:
        images/s of the ``loader`` alone, of training ``fed`` by it and on one ``prefetched``
        batch (best of ``rounds`` alternating rounds each); ``idle`` = 1 − fed/prefetched (the
        time the device waits for data, ≥ 0) and ``loader_share`` = fed/loader (the fraction of
        the fed run's wall time spent producing batches, a bound that needs no subtraction of
        two noisy times).
    """
    trainer = NativeTrainer(args, device, steps=steps)
    x, y = next(iter(trainer.batches()))
    fed = prefetched = 0.0
    # alternate the two measurements and keep the best of each: the difference is small, and
    # on a shared machine the noise is not
    for _ in range(rounds):
        fed = max(fed, trainer.images_per_s(args.warmup))
        s_per_step = timed(lambda: trainer.step(x, y), device, args.iters, args.warmup)
        prefetched = max(prefetched, args.batch_size / s_per_step)
    alone = loader_images_per_s(trainer)
    return {"loader": alone, "fed": fed, "prefetched": prefetched,
            "idle": max(0.0, 1 - fed / prefetched), "loader_share": fed / alone}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of both measurements, best kept (default 3)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers of the torchvision reference (default 0)")
    args = p.parse_args()
    device = device_from(args)
    print(header(device))
    print(f"# {args.arch}, batch {args.batch_size}, PGD-{args.steps}, {args.iters} timed steps")
    m = measure(args, device, args.steps, args.rounds)
    print(f"robust-amo Loader alone: {m['loader']:.1f} images/s")
    print(f"torchvision DataLoader alone ({args.workers} workers): "
          f"{torchvision_images_per_s(args, device, args.workers):.1f} images/s")
    print(f"training fed by the Loader: {m['fed']:.1f} images/s")
    print(f"training on a prefetched batch: {m['prefetched']:.1f} images/s")
    print(f"loader time / training time (bound on the data share): "
          f"{m['prefetched'] / m['loader']:.4f}")
    print(f"idle fraction caused by data (1 - fed / prefetched): {m['idle']:.4f}")


if __name__ == "__main__":
    main()
