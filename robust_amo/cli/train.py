"""``robust-amo train``: resolve the config (file, flags, ``--set``), train, say where the run is.

``--config`` is a shipped config's name (``quickstart``) or a YAML file. Flags override the
config file; ``--set KEY=VALUE`` reaches every key (``--set attack.eps=8/255``). docs/config.md
lists the keys.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from robust_amo.config import CheckSplit, LrExtension, Norm, TrainConfig, choices, parse_override
from robust_amo.data import AUTO_FRACTION, AUTO_MAX
from robust_amo.methods import METHODS
from robust_amo.resolve import resolve
from robust_amo.train import train

from .common import DEVICE_HELP, add_overwrite, add_unsafe_load, device, refuse_renamed

NAME = "train"
HELP = ("train a model (standard, PGD, TRADES, MART, AWP, FGSM-RS, N-FGSM, robust AMO, clean AMO, "
        "Jacobian-LM)")

log = logging.getLogger(__name__)

PARAM_FLAGS = {"override": "--set", "overrides": "--set", "logging.tensorboard": "--tensorboard",
               "model_points": "--points", "data.val_size": "--val-size"}
"""Parameters and config keys whose flag is spelt otherwise (errors name the flag); every other
option's dest is its parameter (``resume`` -> ``--resume``, ``image_size`` -> ``--image-size``).
Other dotted config keys stay as they are: they may come from the config file."""

DEFAULTS = TrainConfig()
"""What a flag left out (and absent from --config) trains with; the help shows it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The common config keys as flags, plus ``--set`` for every other key.

    A flag's default is the config's (``--config``, else :class:`TrainConfig`'s), so none is
    set here; the help says the built-in one.
    """
    d = DEFAULTS
    p.epilog = ("The defaults shown are the built-in ones; a --config file's values replace "
                "them, and flags replace both. Example: robust-amo train --config quickstart "
                "--out runs/qs")
    p.add_argument("--config", type=str, metavar="NAME|FILE",
                   help="a shipped config by name (quickstart, "
                        "sokolic_table1/mnist_cnn2_256_ce_lm, ...: found from any folder) or a "
                        "YAML file; flags and --set override it (default: none, the built-in "
                        "defaults of docs/config.md)")
    p.add_argument("--arch", type=str,
                   help=f"architecture, e.g. wrn28-10 (or --model, your own); robust-amo "
                        f"archs lists them (default {d.arch})")
    p.add_argument("--model", type=str, metavar="FILE.py:FN|package.module:FN",
                   help="train your own architecture instead of --arch: FN returns an "
                        "nn.Module mapping [0, 1] images (B, C, H, W) to logits (called with "
                        "num_classes= when it takes it). Loading the file RUNS ITS CODE. A "
                        "resume needs the same --model again; evaluate with eval --model "
                        "FILE.py:FN --weights RUN/best.pt (default: none, --arch)")
    p.add_argument("--points", type=str, nargs="+", metavar="MODULE",
                   help="--model: module names whose outputs are the perturbation points of "
                        "robust AMO and clean AMO, model_points (default: the model's "
                        "perturbation_points(), else every Conv2d and Linear but the last "
                        "Linear, as margins --model)")
    p.add_argument("--dataset", type=str,
                   help="cifar10, cifar100, svhn, mnist, fashion-mnist, digits, or imagefolder "
                        "(--data-dir with train/CLASS/*.png and test/CLASS/...) "
                        f"(default {d.dataset})")
    p.add_argument("--image-size", type=int, metavar="PIXELS",
                   help="imagefolder only: side the images are resized and centre-cropped to "
                        "(default: none; other datasets keep their size and refuse another)")
    p.add_argument("--val-size", type=str, metavar="N|auto",
                   help="training examples held out for the per-epoch check and best.pt, "
                        f"data.val_size: a count, or auto = {AUTO_FRACTION:.0%}% of the training "
                        f"examples, at most {AUTO_MAX}, none when the check is on the test "
                        f"split (default {d.data.val_size})")
    p.add_argument("--check-split", type=str, choices=choices(CheckSplit),
                   help="split of the per-epoch check and so of best.pt, eval.split: val (the "
                        "held-out training examples), test (selects on the test set: only "
                        "when you mean it) or auto = val (default auto)")
    p.add_argument("--data-dir", type=str, metavar="DIR",
                   help="folder with the dataset (.npz or torchvision's layout; default none, "
                        "which only digits needs)")
    p.add_argument("--method", type=str, metavar="METHOD",
                   help=f"training objective, one of {', '.join(sorted(METHODS))} "
                        f"(docs/methods.md; default {d.method})")
    p.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int,
                   help=f"training batch size (default {d.batch_size})")
    p.add_argument("--lr", type=str, help=f"initial learning rate (default {d.optim.lr})")
    p.add_argument("--eps", type=str,
                   help="training attack radius, e.g. 8/255 (default 8/255)")
    p.add_argument("--norm", type=str, choices=choices(Norm),
                   help=f"training attack's threat model, attack.norm (default {d.attack.norm})")
    p.add_argument("--n-examples", type=int, metavar="N",
                   help="examples of the per-epoch check, eval.n_examples "
                        f"(default {d.eval.n_examples})")
    p.add_argument("--eval-examples", type=str, help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, metavar="DIR",
                   help=f"run folder for checkpoints, config and metrics (default {d.out})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (its config must match, epochs may grow: "
                        "see --lr-extension) (default: off)")
    p.add_argument("--lr-extension", type=str, choices=choices(LrExtension), default="final",
                   help="--resume with more epochs than the learning-rate schedule was "
                        "planned for: final keeps the schedule's last rate (0 after a cosine), "
                        "restart runs the whole schedule again over the added epochs (default "
                        "final)")
    add_overwrite(p, "run (checkpoints and metrics)")
    add_unsafe_load(p)
    p.add_argument("--init-weights", type=str, metavar="FILE",
                   help="start from these weights (a state dict, or a checkpoint of ours or of "
                        "robustness, read safely): fine-tuning; with --model, weights of your "
                        "network (default: none)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset into --data-dir (default: off)")
    p.add_argument("--device", type=device, metavar="DEVICE",
                   help=f"where to train: {DEVICE_HELP} (default {d.device})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--no-bf16", action="store_true",
                   help="train in float32 on CUDA (default: bf16 autocast on CUDA, bf16)")
    p.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (docs/config.md), e.g. "
                        "--set optim.milestones=[50,100]; repeat for several (default: none)")
    p.add_argument("--tensorboard", action="store_true",
                   help="log to RUN/tb for TensorBoard (logging.tensorboard; needs the "
                        "tensorboard extra) (default: off)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: bars on)")


def overrides(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The flags as config mappings, in the order they apply (flags, then each ``--set``)."""
    flat = {"arch": args.arch, "dataset": args.dataset, "method": args.method,
            "epochs": args.epochs, "batch_size": args.batch_size, "out": args.out,
            "device": args.device, "seed": args.seed}
    o: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
    if args.data_dir is not None:
        o.setdefault("data", {})["data_dir"] = args.data_dir
    if args.init_weights is not None:
        o["init_weights"] = args.init_weights
    if args.image_size is not None:
        o.setdefault("data", {})["image_size"] = args.image_size
    if args.val_size is not None:
        o.setdefault("data", {})["val_size"] = args.val_size if args.val_size == "auto" else \
            _count(args.val_size)
    if args.check_split is not None:
        o.setdefault("eval", {})["split"] = args.check_split
    if args.model is not None:
        o["model"] = args.model
    if args.points is not None:
        o["model_points"] = args.points
    if args.download:
        o.setdefault("data", {})["download"] = True
    if args.lr is not None:
        o.setdefault("optim", {})["lr"] = args.lr
    if args.eps is not None:
        o.setdefault("attack", {})["eps"] = args.eps
    if args.norm is not None:
        o.setdefault("attack", {})["norm"] = args.norm
    if args.n_examples is not None:
        o.setdefault("eval", {})["n_examples"] = args.n_examples
    if args.tensorboard:
        o.setdefault("logging", {})["tensorboard"] = True
    if args.no_bf16:
        o["bf16"] = False
    return [o] + [parse_override(s) for s in args.set]


def _count(text: str) -> Any:
    """``--val-size``'s number as an int when it is one, else the text (the config's type
    check then names data.val_size)."""
    try:
        return int(text)
    except ValueError:
        return text


def run(args: argparse.Namespace) -> int:
    """Resolve, train, report where the run is."""
    refuse_renamed(args, "eval_examples", "--n-examples")
    cfg = resolve(args.config, overrides(args))
    metrics = train(cfg, resume=args.resume, overwrite=args.overwrite,
                    unsafe_load=args.unsafe_load, progress=not args.no_progress,
                    lr_extension=args.lr_extension)
    log.info("done: run folder %s; last epoch %s", cfg.out, metrics)
    return 0
