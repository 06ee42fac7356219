"""What ``robust-amo margins`` writes: the per-example CSV, the JSON summary and the plots.

- ``margins.csv``: one row per example, one column per quantity and per point;
- ``summary.json``: the settings, and for every quantity its count, how many examples the
  estimate covers (finite values), mean and quantiles;
- ``margins_hist.png``, ``kappa_adv_by_layer.png``, ``first_order_vs_attack.png``.

docs/margins.md explains each quantity and whether it bounds from above or below.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

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
MARGIN_UNITS = {
    "output_margin": "F_y - max_{j != y} F_j, in logits",
    "all_layer_margin": "||delta||_2, relative to each layer's activation norm",
    "adv_all_layer_margin": "||delta||_2, relative to each layer's activation norm",
    "first_order_margin": "1/||kappa||_2, relative to each layer's activation norm",
    "input_margin_l2": "||x' - x||_2, in [0, 1] pixel units",
}
"""The x axis of each histogram: what the value measures and in which units (docs/margins.md)."""
COUNT_LABEL = "examples (count)"


def finite_note(v: torch.Tensor) -> str:
    """How many examples a histogram draws, in words. A value that is not finite (``inf``) is an
    example for which the search found no misclassifying perturbation; it is not drawn."""
    n, fin = v.numel(), int(torch.isfinite(v).sum())
    note = f"{fin} of {n} examples have a finite margin"
    if fin < n:
        note += f";\n{n - fin} not drawn (no misclassifying perturbation found)"
    return note


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


def histograms(cols: dict[str, torch.Tensor]) -> Any:
    """The figure of ``margins_hist.png``: one histogram per margin, its x axis the quantity in
    its units (:data:`MARGIN_UNITS`), its y axis the count of examples, and under its title how
    many examples have a finite value (:func:`finite_note`; only those are drawn).

    Args:
        cols: the per-example columns of :class:`~robust_amo.margins.MarginsResult`.

    Returns:
        the matplotlib Figure (the caller saves and closes it).
    """
    import matplotlib  # heavy and only needed for pictures: imported when one is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in MARGIN_LABELS if k in cols]
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.8 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        v = cols[k].double()
        fin = v[torch.isfinite(v)].numpy()
        ax.hist(fin, bins=30, color="tab:blue", alpha=0.8)
        ax.set_title(f"{MARGIN_LABELS[k]}\n{finite_note(v)}", fontsize=8)
        ax.set_xlabel(MARGIN_UNITS[k], fontsize=8)
        ax.set_ylabel(COUNT_LABEL, fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 examples
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_margins(cols: dict[str, torch.Tensor], names: list[str], out: Path) -> list[Path]:
    """Histograms of the margins, κ_adv by depth (box plot), first-order vs attack (scatter).

    Returns:
        the PNG files written.
    """
    import matplotlib  # heavy and only needed for pictures: imported when one is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_save(histograms(cols), out / "margins_hist.png", plt)]

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

