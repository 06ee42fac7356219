"""Evaluation reports: a JSON document, a Markdown table, and the gradient-masking sanity checks.

Schema (``"schema": "robust-amo-eval/1"``), documented field by field in docs/evaluation.md:
dataset, split, n_examples, model (checkpoint and training facts), threat_model (norm, eps),
seed, device, precision, clean_accuracy, attacks (one section per attack: kind, settings,
robust_accuracy, n_robust, curve, warnings, wall_time_s, ...), robust_accuracy (per-example worst
case over every attack run), sanity_checks (name, passed, detail), wall_time_s, versions, created.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from robust_amo.curves import restarts_figure, save_figure

from .outcome import AttackOutcome, summarize

SCHEMA = "robust-amo-eval/1"
REQUIRED_KEYS = (
    "schema", "created", "dataset", "split", "n_examples", "model", "threat_model", "seed",
    "device", "precision", "clean_accuracy", "attacks", "robust_accuracy", "sanity_checks",
    "wall_time_s", "versions",
)
ATTACK_KEYS = ("kind", "settings", "robust_accuracy", "n_robust", "curve", "warnings",
               "wall_time_s")
DEFAULT_TOLERANCE = 0.03


def package_versions() -> dict[str, str]:
    """Versions of Python, torch and the packages an evaluation depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("robust-amo", "pyautoattack", "autoattack", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def sanity_checks(
    clean_accuracy: float,
    outcomes: list[AttackOutcome],
    *,
    large_eps: tuple[float, float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[dict[str, Any]]:
    """Checks against gradient masking; each ``{"name", "passed", "detail"}``.

    - ``robust<=clean``: no attack has higher accuracy than the clean model.
    - ``restarts-monotone``: PGD robust accuracy never rises from one restart to the next.
    - ``more-steps``: a PGD with at least the steps and restarts of another (same eps, norm) is
      not weaker by more than ``tolerance``.
    - ``large-eps``: with eps large enough to reach a constant image, robust accuracy is 0.
    - ``pgd-vs-autoattack``: the strongest PGD and AutoAttack agree within ``tolerance``.
    - ``autoattack-checks``: AutoAttack's own checks raised no warning.
    """
    checks: list[dict[str, Any]] = []
    attacked = [o for o in outcomes if o.spec.kind != "clean"]
    acc = {o.spec.name: summarize(o)["robust_accuracy"] for o in attacked}
    bad = {k: v for k, v in acc.items() if v > clean_accuracy + 1e-12}
    checks.append({"name": "robust<=clean", "passed": not bad,
                   "detail": f"clean {clean_accuracy:.4f}; "
                   + (", ".join(f"{k} {v:.4f} exceeds it" for k, v in bad.items())
                      if bad else "every attack at or below it")})
    pgds = [o for o in attacked if o.spec.kind == "pgd"]
    for o in pgds:
        curve = list(summarize(o)["curve"].values())
        rises = [i + 2 for i in range(len(curve) - 1) if curve[i + 1] > curve[i] + 1e-12]
        checks.append({"name": "restarts-monotone", "passed": not rises, "attack": o.spec.name,
                       "detail": "robust accuracy per restart "
                       + ", ".join(f"{v:.4f}" for v in curve)
                       + (f"; rises at restart {rises}" if rises else "")})
    for a in pgds:
        for b in pgds:
            pa, pb = a.spec.pgd, b.spec.pgd
            if a is b or (pa.eps, pa.norm) != (pb.eps, pb.norm):
                continue
            if pb.steps >= pa.steps and pb.restarts >= pa.restarts and (
                    pb.steps, pb.restarts) != (pa.steps, pa.restarts):
                worse = acc[b.spec.name] > acc[a.spec.name] + tolerance
                checks.append({"name": "more-steps", "passed": not worse,
                               "detail": f"{b.spec.name} ({pb.steps} steps x {pb.restarts}) "
                               f"{acc[b.spec.name]:.4f} vs {a.spec.name} ({pa.steps} x "
                               f"{pa.restarts}) {acc[a.spec.name]:.4f}"})
    if large_eps is not None:
        eps, a = large_eps
        checks.append({"name": "large-eps", "passed": a == 0.0,
                       "detail": f"PGD-20 at eps {eps:.4g} leaves robust accuracy {a:.4f} "
                       "(must be 0: a constant image is within reach of every input)"})
    aas = [o for o in attacked if o.spec.kind == "autoattack"]
    if pgds and aas:
        best_pgd = min(pgds, key=lambda o: acc[o.spec.name])
        for o in aas:
            gap = abs(acc[o.spec.name] - acc[best_pgd.spec.name])
            checks.append({"name": "pgd-vs-autoattack", "passed": gap <= tolerance,
                           "detail": f"{best_pgd.spec.name} {acc[best_pgd.spec.name]:.4f} vs "
                           f"{o.spec.name} {acc[o.spec.name]:.4f} (gap {gap:.4f}, tolerance "
                           f"{tolerance:.4f})"})
    for o in aas:
        checks.append({"name": "autoattack-checks", "passed": not o.warnings,
                       "attack": o.spec.name,
                       "detail": "; ".join(o.warnings) if o.warnings else "no warnings"})
    return checks


def build_report(
    *,
    outcomes: list[AttackOutcome],
    model_meta: dict[str, Any],
    dataset: str,
    split: str,
    norm: str,
    eps: float,
    seed: int,
    device: str,
    bf16: bool,
    wall_time_s: float,
    checks: list[dict[str, Any]],
    data_dir: str | None = None,
) -> dict[str, Any]:
    """The JSON report of one ``robust-amo eval`` call (see the module docstring)."""
    if not outcomes:
        raise ValueError("no attack outcomes to report")
    n = len(outcomes[0].robust)
    clean = int(outcomes[0].clean.sum()) / n if n else float("nan")
    worst = outcomes[0].clean.clone()
    attacks: dict[str, Any] = {}
    for o in outcomes:
        s = summarize(o)
        worst &= o.robust
        attacks[o.spec.name] = {
            "kind": o.spec.kind,
            "settings": o.spec.settings(),
            "robust_accuracy": s["robust_accuracy"],
            "n_robust": s["n_robust"],
            "curve": s["curve"],
            "warnings": o.warnings,
            "wall_time_s": round(o.wall_time_s, 3),
            "resumed_chunks": o.resumed_chunks,
        }
        if o.backend:
            attacks[o.spec.name]["backend"] = o.backend
    model = {k: v for k, v in model_meta.items() if k != "config"}
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "data_dir": data_dir,
        "split": split,
        "n_examples": n,
        "model": model,
        "threat_model": {"norm": norm, "eps": eps},
        "seed": seed,
        "device": device,
        "precision": "bf16 (requested; PGD forward passes under autocast)" if bf16 else "float32",
        "bf16": bf16,
        "clean_accuracy": clean,
        "attacks": attacks,
        "robust_accuracy": int(worst.sum()) / n if n else float("nan"),
        "n_robust": int(worst.sum()),
        "sanity_checks": checks,
        "sanity_ok": all(c["passed"] for c in checks),
        "wall_time_s": round(wall_time_s, 3),
        "versions": package_versions(),
    }


def markdown(report: dict[str, Any]) -> str:
    """A readable summary: one row per attack, the overall worst case, the sanity checks."""
    tm = report["threat_model"]
    m = report["model"]
    lines = [
        f"# Robustness evaluation: {m.get('arch')} ({m.get('path')})",
        "",
        f"{report['dataset']} {report['split']}, {report['n_examples']} examples; "
        f"{tm['norm']} eps = {tm['eps']:.6g}; seed {report['seed']}; {report['device']}, "
        f"{report['precision']}.",
        "",
        "| attack | settings | robust accuracy | time (s) |",
        "|---|---|---:|---:|",
        f"| clean | | {report['clean_accuracy']:.2%} | |",
    ]
    for name, a in report["attacks"].items():
        if a["kind"] == "clean":
            continue
        s = a["settings"]
        if a["kind"] == "pgd":
            desc = (f"{s['steps']} steps x {s['restarts']} restarts, step {s['step_size']:.4g}, "
                    f"{s['loss']} loss")
        else:
            desc = f"{s['version']}: {', '.join(s['attacks'])} ({a.get('backend', '')})"
        lines.append(f"| {name} | {desc} | {a['robust_accuracy']:.2%} | {a['wall_time_s']:.1f} |")
    lines.append(f"| **worst case** | per example, over all attacks | "
                 f"**{report['robust_accuracy']:.2%}** | |")
    lines += ["", f"Wall time of this command: {report['wall_time_s']:.1f} s (attack times "
              "include work done before a resume).", "", "## Sanity checks", ""]
    for c in report["sanity_checks"]:
        tag = "ok" if c["passed"] else "FLAGGED"
        where = f" ({c['attack']})" if "attack" in c else ""
        lines.append(f"- {tag}: {c['name']}{where}: {c['detail']}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the JSON report and its Markdown twin (same name, ``.md``), and, when an attack
    has several restarts, ``NAME.restarts.png``: robust accuracy after each restart (does it
    flatten?). Returns the JSON and Markdown paths."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2) + "\n")
    md = p.with_suffix(".md")
    md.write_text(markdown(report))
    if any(a["kind"] == "pgd" and len(a.get("curve") or {}) > 1
           for a in report["attacks"].values()):
        save_figure(restarts_figure(report), restarts_png(p))
    return p, md


ROBUSTBENCH_THEIRS = ("link", "name", "authors", "venue", "reported", "additional_data")
"""Fields of a RobustBench model-info entry that the model's authors fill (we leave them empty:
null for ``additional_data``, "" for the rest)."""


def eps_text(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths (RobustBench's way), else the number."""
    k = round(eps * 255)
    return f"{k}/255" if k > 0 and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def robustbench_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of a RobustBench model-info entry (``model_info/DATASET/THREAT/NAME.json``)
    from an eval report with a standard AutoAttack run; docs/evaluation.md says which fields are
    ours and which the model's authors fill.

    Raises:
        ValueError: the report has no ``autoattack`` (standard) result.
    """
    aa = report["attacks"].get("autoattack")
    if aa is None:
        raise ValueError("a RobustBench entry needs the standard AutoAttack (--attack autoattack)")
    threat = {"linf": "Linf", "l2": "L2"}[report["threat_model"]["norm"]]
    entry: dict[str, Any] = {k: "" for k in ROBUSTBENCH_THEIRS}
    entry["additional_data"] = None
    entry.update({
        "number_forward_passes": 1,
        "dataset": report["dataset"],
        "architecture": report["model"].get("arch"),
        "eps": eps_text(report["threat_model"]["eps"]),
        "clean_acc": f"{100 * report['clean_accuracy']:.2f}",
        "autoattack_acc": f"{100 * aa['robust_accuracy']:.2f}",
    })
    entry["robust_amo"] = {
        "threat_model": threat,
        "n_examples": report["n_examples"],
        "split": report["split"],
        "leaderboard_comparable": report["n_examples"] >= 10000 and report["split"] == "test",
        "autoattack_backend": aa.get("backend"),
        "autoattack_version": aa["settings"].get("version"),
        "model_info_path": f"model_info/{report['dataset']}/{threat}/NAME.json",
        "theirs_to_fill": list(ROBUSTBENCH_THEIRS),
    }
    return entry


def robustbench_path(report_path: str | Path) -> Path:
    """Where ``eval --format robustbench`` writes the entry: ``report.robustbench.json``."""
    p = Path(report_path)
    return p.with_name(f"{p.stem}.robustbench.json")


def restarts_png(report_path: str | Path) -> Path:
    """Where :func:`write_report` draws the restart curves: ``report.restarts.png``."""
    p = Path(report_path)
    return p.with_name(f"{p.stem}.restarts.png")


def validate_report(report: dict[str, Any]) -> None:
    """Raise ValueError if ``report`` lacks a field of the schema (used by tests and readers)."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"report lacks {missing}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"unknown report schema {report['schema']!r}")
    for name, a in report["attacks"].items():
        lacking = [k for k in ATTACK_KEYS if k not in a]
        if lacking:
            raise ValueError(f"attack {name} lacks {lacking}")
