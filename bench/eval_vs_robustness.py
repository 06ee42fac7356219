"""PGD-50 x 10 restarts evaluation: robust-amo vs robustness's attacker (random_restarts=10).

Both attack the same examples of the same model with L-inf PGD, 50 steps of 2/255 in the
8/255 ball, random start, 10 restarts; each reports robust accuracy (lower = stronger attack)
and the time taken. robustness keeps the best-loss iterate of every restart (``use_best``) and
runs all restarts on all examples; robust-amo's evaluation (``robust_amo.evaluation.runner``,
what ``robust-amo eval --attack pgd50`` runs) stops attacking an example at its first
misclassified iterate and only restarts the examples still standing.

Target (issue 7): ratio >= 3 with equal or lower robust accuracy, on one GPU, for a
PGD-trained model (an untrained one falls at the first step and says little):

    python -m bench.eval_vs_robustness --device cuda --checkpoint runs/cifar10-pgd \\
        --examples 1000 --batch-size 500
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import torch

from bench.common import (
    ZeroOneDataset,
    base_parser,
    chunks,
    cuda_noop_patch,
    device_from,
    header,
    make_model,
    patched_note,
    sync,
    synthetic_split,
)
from robust_amo.checkpoint import load_checkpoint, model_from_checkpoint
from robust_amo.data import load_dataset
from robust_amo.evaluation import evaluate_attacks, parse_attack


def native(model, x, y, args, device, steps: int, restarts: int) -> tuple[float, float]:
    """(robust accuracy, seconds) of ``robust-amo eval``'s PGD-steps x restarts."""
    spec = parse_attack(f"pgd{steps}", eps=args.eps, step_size=args.step_size,
                        restarts=restarts)
    sync(device)
    t0 = time.perf_counter()
    (outcome,) = evaluate_attacks(model, x, y, [spec], batch_size=args.batch_size,
                                  device=device, bf16=args.eval_bf16 and device.type == "cuda")
    sync(device)
    return outcome.robust.float().mean().item(), time.perf_counter() - t0


def _attacker(model, x, args, device, steps: int, restarts: int | bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustness.attacker import AttackerModel
    attacker = AttackerModel(model, ZeroOneDataset(x.shape[1])).to(device).eval()
    kw = {"constraint": "inf", "eps": args.eps, "step_size": args.step_size,
          "iterations": steps, "random_start": True, "random_restarts": restarts,
          "use_best": True}
    return attacker, kw


def robustness(model, x, y, args, device, steps: int, restarts: int) -> tuple[float, float]:
    """(robust accuracy, seconds) of robustness's Attacker with random_restarts.

    In robustness 1.2.1 this keeps the last restart's point for every example (its ``~corr``
    on a uint8 mask is never 0), so it is about as strong as one restart: what its users get.
    """
    attacker, kw = _attacker(model, x, args, device, steps, restarts)
    correct = 0
    with cuda_noop_patch(device), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its uint8 mask indexing is deprecated
        sync(device)
        t0 = time.perf_counter()
        for sl in chunks(len(y), args.batch_size):
            logits, _ = attacker(x[sl], y[sl], make_adv=True, **kw)
            correct += (logits.argmax(1) == y[sl]).sum().item()
        sync(device)
    return correct / len(y), time.perf_counter() - t0


def robustness_looped(model, x, y, args, device, steps: int,
                      restarts: int) -> tuple[float, float]:
    """(robust accuracy, seconds) of robustness's Attacker run ``restarts`` times without its
    ``random_restarts``, each time on the examples still robust: the strength its restarts
    were meant to have (bench/eval_agreement.py's "restarts looped here")."""
    attacker, kw = _attacker(model, x, args, device, steps, False)
    with cuda_noop_patch(device), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync(device)
        t0 = time.perf_counter()
        robust = torch.ones(len(y), dtype=torch.bool, device=y.device)
        for _ in range(restarts):
            idx = robust.nonzero().squeeze(1)
            for sl in chunks(len(idx), args.batch_size):
                j = idx[sl]
                logits, _ = attacker(x[j], y[j], make_adv=True, **kw)
                robust[j] &= logits.argmax(1) == y[j]
        sync(device)
    return robust.float().mean().item(), time.perf_counter() - t0


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=str, default=None,
                   help="robust-amo run folder or .pt (default: untrained --arch)")
    p.add_argument("--dataset", type=str, default=None,
                   help="take --examples test images of this dataset (needs --data-dir for "
                        "all but digits; default: the checkpoint's dataset, else random images)")
    p.add_argument("--data-dir", type=str, default=None, help="dataset folder")
    p.add_argument("--examples", type=int, default=1000, help="examples attacked (default 1000)")
    p.add_argument("--pgd-steps", type=int, default=50, help="steps per restart (default 50)")
    p.add_argument("--restarts", type=int, default=10, help="restarts (default 10)")
    p.add_argument("--eval-bf16", action="store_true",
                   help="robust-amo side in bf16 autocast on CUDA (default float32 like "
                        "robustness; `robust-amo eval --bf16`)")
    args = p.parse_args()
    device = device_from(args)
    print(header(device))
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt).to(device)
        args.dataset = args.dataset or ckpt["dataset"]
    else:
        model = make_model(args, device).eval()
    if args.dataset:
        _, test = load_dataset(args.dataset, args.data_dir)
        x, y = test.x[: args.examples], test.y[: args.examples]
    else:
        split = synthetic_split(args, args.examples)
        x, y = split.x, split.y
    x, y = x.to(device).float() / 255, y.to(device)
    print(f"# {args.checkpoint or args.arch + ' (untrained)'}, {len(y)} examples of "
          f"{args.dataset or 'random images'}, PGD-{args.pgd_steps} x {args.restarts}, "
          f"eps {args.eps:.4g}, batch {args.batch_size}")
    for side in (native, robustness):  # warm-up (allocator, kernels), not timed
        side(model, x[: args.batch_size], y[: args.batch_size], args, device, 2, 2)
    acc_n, t_n = native(model, x, y, args, device, args.pgd_steps, args.restarts)
    print(f"robust-amo PGD: robust accuracy {acc_n:.4f} in {t_n:.2f} s")
    acc_r, t_r = robustness(model, x, y, args, device, args.pgd_steps, args.restarts)
    print(f"robustness attacker: robust accuracy {acc_r:.4f} in {t_r:.2f} s" + patched_note(device))
    acc_l, t_l = robustness_looped(model, x, y, args, device, args.pgd_steps, args.restarts)
    print(f"robustness attacker, restarts looped here: robust accuracy {acc_l:.4f} in "
          f"{t_l:.2f} s" + patched_note(device))
    print(f"robust accuracy robust-amo <= robustness: {acc_n <= acc_r}")
    print(f"robust accuracy robust-amo <= robustness, restarts looped: {acc_n <= acc_l}")
    print(f"ratio robustness time / robust-amo time: {t_r / t_n:.2f}")


if __name__ == "__main__":
    main()
