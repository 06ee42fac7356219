"""Native PGD-10 training throughput vs ``robustness.train.train_model`` (images/s).

Same device, architecture (robust-amo's registry, so the very same network), batch, PGD-10
(eps 8/255, step 2/255, random start) and SGD. robustness runs as its users run it: its
``train_model`` over a loader of CPU batches (DataParallel, float32, ``loss.item()`` per step);
its throughput is taken between two of its own iteration hooks. The native side runs
``robust_amo.train.train_step`` on device-resident data with bf16 and channels_last.

Target (issue 7): ratio >= 2 for WRN-28-10, batch 128, on one GPU:

    python -m bench.pgd_train_vs_robustness --device cuda --arch wrn28-10 --batch-size 128
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
import types
import warnings

import torch

from bench.common import (
    NativeTrainer,
    ZeroOneDataset,
    base_parser,
    cuda_noop_patch,
    device_from,
    header,
    make_model,
    patched_note,
    sync,
    synthetic_split,
)


def robustness_images_per_s(args, device: torch.device, use_best: int = 1) -> float:
    """Throughput of robustness.train.train_model on the same model and batches.

    ``use_best=1`` (its default) adds a forward per attack step to keep the highest-loss iterate;
    ``0`` keeps the last one, as robust-amo's PGD does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not import amp" (apex): not used here
        from robustness.attacker import AttackerModel
        from robustness.train import train_model

    net = make_model(args, device)
    model = AttackerModel(net, ZeroOneDataset(args.channels)).to(device)
    split = synthetic_split(args, args.batch_size * (args.iters + args.warmup))
    # what a torch DataLoader hands robustness: CPU float batches in [0, 1]
    batches = [(split.x[i:i + args.batch_size].float() / 255, split.y[i:i + args.batch_size])
               for i in range(0, len(split), args.batch_size)]
    stamps: list[float] = []

    def hook(model, i, loop_type, inp, target):
        if loop_type == "train":
            sync(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        ns = types.SimpleNamespace(
            out_dir=out, adv_train=1, adv_eval=0, epochs=1, lr=0.1, momentum=0.9,
            weight_decay=5e-4, step_lr=None, step_lr_gamma=0.1, custom_lr_multiplier=None,
            lr_interpolation="step", log_iters=1, save_ckpt_iters=-1, attack_steps=10,
            constraint="inf", eps=args.eps, attack_lr=args.step_size, use_best=use_best,
            random_restarts=0, random_start=1, custom_eps_multiplier=None, mixed_precision=0,
            iteration_hook=hook)
        # its progress bars and warnings would drown the figures
        with cuda_noop_patch(device), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # its end-of-epoch evaluation runs on one small batch (not timed)
            train_model(ns, model, (batches, batches[:1]), store=None)
    # stamp i is taken after step i; steps warmup..end are timed
    timed = stamps[args.warmup:]
    return (len(timed) - 1) * args.batch_size / (timed[-1] - timed[0])


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    device = device_from(args)
    print(header(device))
    print(f"# {args.arch}, batch {args.batch_size}, {args.channels}x{args.image_size}^2, "
          f"PGD-10, {args.iters} timed steps after {args.warmup}")
    native = NativeTrainer(args, device, steps=10).images_per_s(args.warmup)
    print(f"robust-amo train_step: {native:.1f} images/s")
    theirs = robustness_images_per_s(args, device)
    print(f"robustness train_model: {theirs:.1f} images/s" + patched_note(device))
    print(f"ratio robust-amo / robustness: {native / theirs:.2f}")


if __name__ == "__main__":
    main()
