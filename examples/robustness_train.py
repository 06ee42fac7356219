"""Robust AMO (and optionally Jacobian-LM) training inside MadryLab's robustness.train.train_model.

A complete script in robustness's own workflow: a robustness dataset, ``make_and_restore_model``
(here robust-amo's :func:`~robust_amo.integrations.robustness.make_model`, which builds the
``RobustAMOAttackerModel``), a ``cox.utils.Parameters`` argument object filled with robustness's
defaults, and ``train_model``. robustness's loop calls ``.cuda()``, so this needs a CUDA device.

    python examples/robustness_train.py --dataset digits --arch tiny-cnn --epochs 5 \\
        --eps 0.1 --attack-lr 0.025 --attack-steps 7 --out runs/robustness-digits
    python examples/robustness_train.py --dataset cifar10 --data-dir data/cifar10 \\
        --arch wrn16-10 --epochs 150 --step-lr 50 --batch-size 128 --out runs/robustness-cifar

Every dataset but ``digits`` (bundled) needs its files: ``--data-dir DIR``, or the environment
variable ``ROBUST_AMO_DATA`` naming the folder.

robustness writes ``checkpoint.pt.latest`` and ``checkpoint.pt.best`` into ``--out``. To evaluate
one with robust-amo:

    robust-amo convert-checkpoint runs/robustness-digits/checkpoint.pt.latest digits.pt \\
        --arch tiny-cnn --dataset digits
    robust-amo eval --checkpoint digits.pt
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

# isort: off
# the plugin must come before any robustness.datasets/robustness.train import (it installs the
# torchvision.models.utils alias robustness 1.2.1 needs)
from robust_amo.integrations import robustness as rp
from cox.utils import Parameters
from robustness import defaults
from robustness.datasets import CIFAR
from robustness.train import train_model
# isort: on
from robust_amo.config import ThreatModel

DATA_ENV = "ROBUST_AMO_DATA"
"""The environment variable read when ``--data-dir`` is not given."""

NORMS = {"inf": "linf", "2": "l2"}
"""robustness's constraint names as our norms."""

log = logging.getLogger("robustness_train")


def _fraction(text: str) -> float:
    """8/255, 0.03 or 2e-3 as a float (never eval)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 8/255, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The script's options; attack options use robustness's names and meanings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=str, default="digits",
                   help="robust-amo dataset: digits, mnist, fashion-mnist, cifar10, cifar100")
    p.add_argument("--data-dir", type=str, default=os.environ.get(DATA_ENV),
                   help=f"folder with the dataset (default: ${DATA_ENV}; digits needs none)")
    p.add_argument("--arch", type=str, default="tiny-cnn", help="robust-amo architecture")
    p.add_argument("--out", type=str, default="runs/robustness-example",
                   help="robustness's out_dir (checkpoints)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--step-lr", type=int, default=0, help="drop the lr 10x every N epochs (0: off)")
    p.add_argument("--constraint", type=str, default="inf", choices=["inf", "2"],
                   help="robustness threat model")
    p.add_argument("--eps", type=_fraction, default=0.1, help="attack radius, e.g. 8/255")
    p.add_argument("--attack-lr", type=_fraction, default=0.025, help="attack step size")
    p.add_argument("--attack-steps", type=int, default=7, help="attack steps")
    p.add_argument("--use-best", type=int, choices=[0, 1], default=0,
                   help="robustness's use_best (robust AMO keeps the matching delta)")
    p.add_argument("--rho", type=float, default=0.92, help="robust AMO shrink factor of delta")
    p.add_argument("--eta-delta", type=float, default=6.4e-3, help="robust AMO delta step size")
    p.add_argument("--jacobian-lm", type=float, default=0.0,
                   help="weight of the Jacobian-LM regularizer (0: off)")
    p.add_argument("--train-subset", type=int, default=None, help="first N training examples")
    p.add_argument("--val-examples", type=int, default=None, help="first N test examples")
    p.add_argument("--augment", type=str, choices=["auto", "on", "off"], default="auto",
                   help="crop/flip augmentation (auto: on for CIFAR, off for 8x8/28x28 digits)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (init, attack starts)")
    p.add_argument("--resume", type=str, default=None,
                   help="robustness or robust-amo checkpoint to start from (weights; with "
                        "--step-lr also optimizer, epoch and schedule)")
    opts = p.parse_args(argv)
    if opts.data_dir is None and opts.dataset != "digits":
        p.error(f"--dataset {opts.dataset} needs its files: pass --data-dir DIR or set "
                f"{DATA_ENV}=DIR (only digits is bundled)")
    return opts


def robustness_args(opts: argparse.Namespace, regularizer=None) -> Parameters:
    """robustness's argument object: our options, then its defaults for the rest."""
    args = Parameters({
        "out_dir": opts.out, "adv_train": 1, "adv_eval": 1, "epochs": opts.epochs,
        "lr": opts.lr, "momentum": opts.momentum, "weight_decay": opts.weight_decay,
        "step_lr": opts.step_lr, "step_lr_gamma": 0.1, "log_iters": 1, "save_ckpt_iters": -1,
        **rp.attack_args(ThreatModel(norm=NORMS[opts.constraint], eps=opts.eps,
                                     step_size=opts.attack_lr, steps=opts.attack_steps)),
        "use_best": opts.use_best,
        "random_restarts": 0, "mixed_precision": 0, "batch_size": opts.batch_size,
    })
    if regularizer is not None:
        args.regularizer = regularizer
    # CIFAR's table only fills what is still missing; every BY_DATASET value is given above
    args = defaults.check_and_fill_args(args, defaults.TRAINING_ARGS, CIFAR)
    return defaults.check_and_fill_args(args, defaults.PGD_ARGS, CIFAR)


def main(argv: Sequence[str] | None = None) -> torch.nn.Module:
    """Build everything and run ``train_model``; returns the trained (DataParallel) model."""
    opts = parse_args(argv)
    torch.manual_seed(opts.seed)
    Path(opts.out).mkdir(parents=True, exist_ok=True)

    ds = rp.robustness_dataset(opts.dataset, opts.data_dir)
    augment = opts.augment == "on" or (opts.augment == "auto" and ds.ds_name.startswith("cifar"))
    train_loader, val_loader = ds.make_loaders(
        workers=0, batch_size=opts.batch_size, data_aug=augment,
        subset=opts.train_subset, val_subset=opts.val_examples, seed=opts.seed)
    model, checkpoint = rp.make_model(arch=opts.arch, dataset=ds, resume_path=opts.resume,
                                      rho=opts.rho, eta_delta=opts.eta_delta)
    reg = rp.JacobianLMRegularizer(opts.jacobian_lm) if opts.jacobian_lm > 0 else None
    args = robustness_args(opts, reg)
    log.info("robust AMO (rho=%g, eta_delta=%g) on %s/%s, %d epochs", opts.rho, opts.eta_delta,
             opts.arch, opts.dataset, opts.epochs)
    # robustness resumes optimizer, epoch and schedule from a checkpoint but cannot fast-forward
    # a missing schedule: without --step-lr, --resume only provides the starting weights
    resume = checkpoint if (checkpoint is not None and opts.step_lr > 0) else None
    return train_model(args, model, (train_loader, val_loader), checkpoint=resume)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.exit("robustness's train_model calls .cuda(): run this example on a CUDA machine")
    main()
