"""``robust-amo margins``: per-example margins of a trained checkpoint, as CSV, JSON and plots.

For N examples of the checkpoint's dataset it computes what :mod:`robust_amo.margins` defines
(output, all-layer, adversarial all-layer and L2 input margins, κ and κ_adv per perturbation
point) and writes to ``--out``:

- ``margins.csv``: one row per example, one column per quantity and per point;
- ``summary.json``: the settings, and for every quantity its count, how many examples the
  estimate covers (finite values), mean and quantiles;
- ``margins_hist.png``, ``kappa_adv_by_layer.png``, ``first_order_vs_attack.png``.

docs/margins.md explains each quantity and whether it bounds from above or below.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .cli import subcommand
from .errors import ConfigError

log = logging.getLogger(__name__)

# per-example columns in CSV order; per-point columns follow, named <quantity>[<point>]
SCALAR_COLUMNS = ("output_margin", "all_layer_margin", "all_layer_margin_lower",
                  "adv_all_layer_margin", "input_margin_l2", "first_order_margin",
                  "first_order_adv_margin", "kappa_norm", "kappa_adv_norm")
POINT_COLUMNS = ("scale", "jac_norm", "kappa", "kappa_adv")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
MARGIN_LABELS = {
    "output_margin": "output margin gamma (logits)",
    "all_layer_margin": "all-layer margin m_F (from above)",
    "adv_all_layer_margin": "adversarial all-layer margin m_adv (from above)",
    "first_order_margin": "first-order margin 1/||kappa|| (approx.)",
    "input_margin_l2": "input margin, L2 (from above)",
}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=str, required=True,
                   help="run folder written by `robust-amo train`, or a checkpoint .pt file")
    p.add_argument("--which", type=str, choices=["last", "best"], default="last",
                   help="checkpoint of a run folder: last (checkpoint.pt) or best (best.pt)")
    p.add_argument("--n-examples", type=int, default=256, help="examples to analyse (default 256)")
    p.add_argument("--split", type=str, choices=["test", "train"], default="test",
                   help="which split the first N examples come from (default test)")
    p.add_argument("--arch", type=str,
                   help="architecture of a robustness checkpoint, which does not record it")
    p.add_argument("--dataset", type=str, help="dataset (default: the checkpoint's)")
    p.add_argument("--data-dir", type=str, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--eps", type=str, help="PGD neighbourhood radius, e.g. 8/255 "
                   "(default: the checkpoint's training attack)")
    p.add_argument("--step-size", type=str, help="PGD step (default: the training attack's)")
    p.add_argument("--norm", type=str, choices=["linf", "l2"],
                   help="PGD threat model (default: the training attack's)")
    p.add_argument("--pgd-steps", type=int, default=10,
                   help="PGD iterations defining the neighbourhood (default 10)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (default 1)")
    p.add_argument("--no-adv", action="store_true",
                   help="skip the adversarial all-layer margin and kappa_adv")
    p.add_argument("--no-input-margin", action="store_true", help="skip the L2 input margin")
    p.add_argument("--attack-steps", type=int, default=20,
                   help="attack steps per radius of the margin searches (default 20)")
    p.add_argument("--rounds", type=int, default=10,
                   help="bisection rounds of the margin searches (default 10)")
    p.add_argument("--rtol", type=str, default="0.01",
                   help="relative gap at which a bisection stops (default 0.01)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per batch (default 128)")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                   help="device (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the PGD random starts")
    p.add_argument("--out", type=str,
                   help="output folder (default: <run folder>/margins)")
    p.add_argument("--no-plots", action="store_true", help="write CSV and JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _load_examples(ckpt: dict[str, Any], args: argparse.Namespace):
    from .data import dataset_info, load_dataset

    cfg = ckpt.get("config", {})
    name = args.dataset or ckpt.get("dataset") or cfg.get("dataset")
    if not name:
        raise ConfigError("the checkpoint names no dataset; pass --dataset")
    data_dir = args.data_dir or cfg.get("data", {}).get("data_dir")
    info = dataset_info(name)
    if list(info.input_shape) != list(ckpt["input_shape"]) or \
            info.num_classes != ckpt["num_classes"]:
        raise ConfigError(
            f"dataset {name!r} has {info.num_classes} classes of shape {info.input_shape} but "
            f"the checkpoint expects {ckpt['num_classes']} of {tuple(ckpt['input_shape'])}; "
            "pass the --dataset it was trained on"
        )
    train, test = load_dataset(name, data_dir)
    split = test if args.split == "test" else train
    n = min(args.n_examples, len(split))
    if n < args.n_examples:
        log.warning("the %s split has only %d examples; using all of them", args.split, n)
    return name, split.subset(torch.arange(n))


def _attack_settings(ckpt: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from .config import parse_float

    a = ckpt.get("config", {}).get("attack", {})
    eps = parse_float(args.eps, "--eps") if args.eps is not None else float(a.get("eps", 8 / 255))
    step = (parse_float(args.step_size, "--step-size") if args.step_size is not None
            else float(a.get("step_size", eps / 4)))
    if eps < 0 or step < 0:
        raise ConfigError(f"--eps and --step-size must be >= 0, got {eps} and {step}")
    return {"eps": eps, "step_size": step, "steps": args.pgd_steps, "restarts": args.restarts,
            "norm": args.norm or a.get("norm", "linf"), "loss": a.get("loss", "ce"),
            "seed": args.seed}


@subcommand("margins", "per-example output, all-layer, adversarial and input margins, kappa",
            _args)
def cmd_margins(args: argparse.Namespace) -> int:
    """``robust-amo margins``: see the module docstring."""
    from tqdm.auto import tqdm

    from attacks import PGD

    from .checkpoint import BEST, LAST, load_checkpoint, model_from_checkpoint
    from .config import parse_float
    from .data import Loader
    from .margins import SearchOptions, margins_batch
    from .train import resolve_device

    for name, v, lo in (("--n-examples", args.n_examples, 1), ("--batch-size", args.batch_size, 1),
                        ("--pgd-steps", args.pgd_steps, 0), ("--restarts", args.restarts, 1),
                        ("--attack-steps", args.attack_steps, 1), ("--rounds", args.rounds, 0)):
        _positive(name, v, lo)
    rtol = parse_float(args.rtol, "--rtol")
    if rtol < 0:
        raise ConfigError(f"--rtol must be >= 0, got {rtol}")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, which=BEST if args.which == "best" else LAST,
                           arch=args.arch, dataset=args.dataset)
    model = model_from_checkpoint(ckpt).to(device)
    dataset, split = _load_examples(ckpt, args)
    attack_cfg = _attack_settings(ckpt, args)
    out = Path(args.out) if args.out else _default_out(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(args.seed)
    attack = None
    if not args.no_adv:
        attack = PGD(model, attack_cfg["eps"], attack_cfg["step_size"], attack_cfg["steps"],
                     attack_cfg["norm"], True, attack_cfg["restarts"], attack_cfg["loss"], gen)
    opts = SearchOptions(steps=args.attack_steps, rounds=args.rounds, rtol=rtol)
    loader = Loader(split, args.batch_size, device)
    parts: list[dict[str, torch.Tensor]] = []
    names: list[str] = []
    for x, y in tqdm(loader, desc="margins", unit="batch", disable=args.no_progress):
        cols, names = margins_batch(model, x, y, attack, opts, input_l2=not args.no_input_margin)
        cols["label"] = y
        parts.append({k: v.detach().cpu() for k, v in cols.items()})
    cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    settings = {"checkpoint": str(args.checkpoint), "which": args.which, "arch": ckpt["arch"],
                "dataset": dataset, "split": args.split, "n_examples": len(split),
                "pgd": attack_cfg if attack is not None else None,
                "search": {"attack_steps": opts.steps, "rounds": opts.rounds, "rtol": opts.rtol,
                           "max_expand": opts.max_expand, "step_scale": opts.step_scale},
                "points": names, "device": str(device), "torch": torch.__version__}
    write_csv(out / "margins.csv", cols, names)
    summary = summarize(cols, names, settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    if not args.no_plots:
        plot_margins(cols, names, out)
    log.info("margins of %d examples written to %s (clean accuracy %.3f)", len(split), out,
             summary["clean_accuracy"])
    return 0


def _default_out(checkpoint: str) -> Path:
    p = Path(checkpoint).expanduser()
    return (p if p.is_dir() else p.parent) / "margins"


def write_csv(path: Path, cols: dict[str, torch.Tensor], names: list[str]) -> None:
    """One row per example: index, label, pred, robust, the scalars, then per-point columns."""
    head = ["index", "label", "pred"] + [c for c in ("robust",) if c in cols]
    scalars = [c for c in SCALAR_COLUMNS if c in cols]
    points = [c for c in POINT_COLUMNS if c in cols]
    header = head + scalars + [f"{c}[{n}]" for c in points for n in names]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(cols["label"])):
            row: list[Any] = [i, int(cols["label"][i]), int(cols["pred"][i])]
            if "robust" in cols:
                row.append(int(cols["robust"][i]))
            row += [f"{float(cols[c][i]):.6g}" for c in scalars]
            row += [f"{float(v):.6g}" for c in points for v in cols[c][i].tolist()]
            w.writerow(row)


def _stats(v: torch.Tensor) -> dict[str, Any]:
    """count, covered (finite), mean and quantiles of the finite values (None if there are none)."""
    v = v.double().flatten()
    fin = v[torch.isfinite(v)]
    out: dict[str, Any] = {"count": int(v.numel()), "covered": int(fin.numel())}
    if fin.numel():
        out["mean"] = float(fin.mean())
        q = torch.quantile(fin, torch.tensor(QUANTILES, dtype=torch.float64))
        out["quantiles"] = {str(k): float(x) for k, x in zip(QUANTILES, q, strict=True)}
    else:
        out["mean"], out["quantiles"] = None, None
    return out


def summarize(cols: dict[str, torch.Tensor], names: list[str],
              settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary: settings, accuracy and statistics of every quantity and point."""
    correct = cols["pred"] == cols["label"]
    s: dict[str, Any] = {"settings": settings, "clean_accuracy": float(correct.double().mean())}
    if "robust" in cols:
        s["pgd_neighbourhood_accuracy"] = float(cols["robust"].double().mean())
    s["quantities"] = {c: _stats(cols[c]) for c in SCALAR_COLUMNS if c in cols}
    s["per_point"] = {c: {n: _stats(cols[c][:, j]) for j, n in enumerate(names)}
                      for c in POINT_COLUMNS if c in cols}
    ok = correct & torch.isfinite(cols["all_layer_margin"]) & (cols["all_layer_margin"] > 0)
    if ok.any():
        # how tight the first-order approximation is against the attack-based estimate
        ratio = cols["first_order_margin"][ok] / cols["all_layer_margin"][ok]
        s["first_order_over_all_layer"] = _stats(ratio)
    s["notes"] = ("all_layer_margin, adv_all_layer_margin and input_margin_l2 are estimates "
                  "from above (norms of perturbations found to misclassify); kappa_adv is an "
                  "estimate from below of the maximum over the PGD ball; first_order_margin = "
                  "1/||kappa|| is a first-order approximation, not a bound. 'covered' counts "
                  "finite values (inf: no misclassifying perturbation found / misclassified "
                  "candidate). See docs/margins.md.")
    return s


def plot_margins(cols: dict[str, torch.Tensor], names: list[str], out: Path) -> list[Path]:
    """Histograms of the margins, κ_adv by depth (box plot), first-order vs attack (scatter).

    Returns:
        the PNG files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    keys = [k for k in MARGIN_LABELS if k in cols]
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        v = cols[k].double()
        fin = v[torch.isfinite(v)].numpy()
        ax.hist(fin, bins=30, color="tab:blue", alpha=0.8)
        ax.set_title(MARGIN_LABELS[k], fontsize=9)
        ax.set_xlabel(f"{len(fin)}/{len(v)} finite", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    written.append(_save(fig, out / "margins_hist.png", plt))

    kkey = "kappa_adv" if "kappa_adv" in cols else "kappa"
    data = []
    for j in range(len(names)):
        v = cols[kkey][:, j].double()
        data.append(v[torch.isfinite(v) & (v > 0)].numpy())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 3.8))
    if any(len(d) for d in data):
        ax.boxplot(data, showfliers=False)
        ax.set_yscale("log")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("perturbation point (input side to output side)")
    ax.set_ylabel(f"{kkey} (finite values)")
    ax.set_title(f"{kkey} per layer: which layers limit the margin", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out / "kappa_adv_by_layer.png", plt))

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    pairs = [("all_layer_margin", "first_order_margin", "clean", "tab:blue"),
             ("adv_all_layer_margin", "first_order_adv_margin", "adversarial", "tab:red")]
    lo, hi = math.inf, 0.0
    for est, fo, label, color in pairs:
        if est not in cols:
            continue
        a, b = cols[est].double(), cols[fo].double()
        ok = torch.isfinite(a) & torch.isfinite(b) & (a > 0) & (b > 0)
        if ok.any():
            ax.scatter(a[ok].numpy(), b[ok].numpy(), s=8, alpha=0.6, color=color, label=label)
            lo = min(lo, float(a[ok].min()), float(b[ok].min()))
            hi = max(hi, float(a[ok].max()), float(b[ok].max()))
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("attack-based all-layer margin (from above)")
    ax.set_ylabel("first-order margin 1/||kappa||")
    ax.set_title("first-order approximation vs attack", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out / "first_order_vs_attack.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

