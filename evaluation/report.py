"""Evaluation reports: a JSON document, a Markdown table, and the gradient-masking sanity checks.

Schema (``"schema": "robust-amo-eval/1"``), documented field by field in docs/evaluation.md:
dataset, split, n_examples, model (checkpoint and training facts), threat_model (norm, eps),
seed, device, precision, clean_accuracy, attacks (one section per attack: kind, settings,
robust_accuracy, n_robust, curve, warnings, wall_time_s, ...), robust_accuracy (per-example worst
case over every attack run), sanity_checks (name, passed, detail), wall_time_s, versions, created.
"""

from __future__ import annotations

import datetime as _dt
import glob
import io
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_amo.curves import pyplot, save_figure
from robust_amo.errors import OutputError
from robust_amo.outputs import atomic_write, disk_writes

from .outcome import AttackOutcome, summarize

log = logging.getLogger(__name__)

SCHEMA = "robust-amo-eval/1"
REQUIRED_KEYS = (
    "schema", "created", "dataset", "split", "n_examples", "model", "threat_model", "seed",
    "device", "precision", "clean_accuracy", "attacks", "robust_accuracy", "sanity_checks",
    "wall_time_s", "versions",
)
ATTACK_KEYS = ("kind", "settings", "robust_accuracy", "n_robust", "curve", "warnings",
               "wall_time_s")
DEFAULT_TOLERANCE = 0.03


@dataclass
class SanityCheck:
    """One check against gradient masking (:func:`sanity_checks`).

    Attributes:
        name: ``finite-logits``, ``robust<=clean``, ``restarts-monotone``, ``more-steps``,
            ``large-eps``, ``pgd-vs-autoattack`` or ``autoattack-checks``.
        passed: False flags the evaluation. detail: the figures behind the verdict.
        attack: the attack it is about, for the per-attack checks (else None).
    """

    name: str
    passed: bool
    detail: str
    attack: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "passed", ["attack"], "detail"}`` as report.json holds it."""
        out: dict[str, Any] = {"name": self.name, "passed": self.passed}
        if self.attack is not None:
            out["attack"] = self.attack
        out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SanityCheck:
        """The check of a report.json entry."""
        return cls(d["name"], bool(d["passed"]), d.get("detail", ""), d.get("attack"))


@dataclass(frozen=True)
class Passes:
    """The model's forward and backward passes in example units (a batch of 128 is 128).

    A backward pass is a gradient of the batch flowing back through the model (to the input
    or the weights), counted once per backward (docs/evaluation.md, "Passes").
    """

    forward: int = 0
    backward: int = 0

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.backward + other.backward)

    def to_dict(self, n_examples: int | None = None) -> dict[str, Any]:
        """``{"forward", "backward"}``, with ``"per_example"`` (each divided by n_examples)
        when ``n_examples`` is given."""
        out: dict[str, Any] = {"forward": self.forward, "backward": self.backward}
        if n_examples:
            out["per_example"] = {"forward": self.forward / n_examples,
                                  "backward": self.backward / n_examples}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Passes:
        """The passes of a report.json entry (``per_example`` is derived, not read)."""
        return cls(int(d["forward"]), int(d["backward"]))


@dataclass
class AttackReport:
    """One attack's section of a report (``attacks.NAME``; docs/evaluation.md).

    Attributes:
        kind: ``clean``, ``pgd`` or ``autoattack``. settings: the attack's settings as run
            (PGD: eps, step_size, steps, restarts, norm, loss, random_start, seed, early_exit).
        robust_accuracy: fraction of the examples correct under this attack. n_robust: count.
        curve: robust accuracy after each restart (PGD: ``restart r``) or AutoAttack attack.
        warnings: AutoAttack's own checks. wall_time_s: seconds, work before a resume included.
        resumed_chunks: chunks read back from the state file. backend: package and version
            that ran it (AutoAttack), else None.
        passes: the model's forward and backward passes of this attack over all examples
            (None in reports written before they were counted). sub_passes: per sub-attack
            (AutoAttack's apgd-ce, apgd-t, ...).
        individual: robust accuracy under each sub-attack alone (AutoAttack with
            ``individual``), beside ``curve``'s cumulative one; empty otherwise.
    """

    kind: str
    settings: dict[str, Any]
    robust_accuracy: float
    n_robust: int
    curve: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    resumed_chunks: int = 0
    backend: str | None = None
    passes: Passes | None = None
    sub_passes: dict[str, Passes] = field(default_factory=dict)
    individual: dict[str, float] = field(default_factory=dict)

    def to_dict(self, n_examples: int | None = None) -> dict[str, Any]:
        """The section as report.json holds it (``backend``, ``individual``, ``passes`` only
        when set; ``passes`` per example when ``n_examples`` is given)."""
        out: dict[str, Any] = {
            "kind": self.kind, "settings": self.settings,
            "robust_accuracy": self.robust_accuracy, "n_robust": self.n_robust,
            "curve": self.curve}
        if self.individual:
            out["individual"] = self.individual
        out.update(warnings=self.warnings, wall_time_s=self.wall_time_s,
                   resumed_chunks=self.resumed_chunks)
        if self.passes is not None:
            out["passes"] = self.passes.to_dict(n_examples)
            if self.sub_passes:
                out["passes"]["by_attack"] = {k: p.to_dict(n_examples)
                                              for k, p in self.sub_passes.items()}
        if self.backend:
            out["backend"] = self.backend
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttackReport:
        """The section of a report.json."""
        passes = d.get("passes")
        return cls(d["kind"], dict(d["settings"]), d["robust_accuracy"], d["n_robust"],
                   dict(d.get("curve") or {}), list(d.get("warnings") or []),
                   d.get("wall_time_s", 0.0), d.get("resumed_chunks", 0), d.get("backend"),
                   Passes.from_dict(passes) if passes else None,
                   {k: Passes.from_dict(p) for k, p in (passes or {}).get("by_attack",
                                                                         {}).items()},
                   dict(d.get("individual") or {}))


@dataclass
class Report:
    """The result of one evaluation (schema ``robust-amo-eval/1``; docs/evaluation.md).

    :meth:`to_dict` gives report.json, :meth:`from_dict` and :meth:`read` read it back.

    Attributes:
        dataset, split, data_dir: the examples (the first ``n_examples`` of the split).
        model: checkpoint and training facts (path, arch, dataset, method, epoch, ...).
        norm, eps: the threat model.
        seed: of the random starts. device, precision, bf16: where and how it ran.
        clean_accuracy: fraction correct without attack.
        attacks: one :class:`AttackReport` per attack run, in order, ``clean`` first.
        robust_accuracy, n_robust: per example, the worst case over every attack.
        sanity_checks: :class:`SanityCheck` list. wall_time_s: of the whole evaluation.
        versions: Python, torch and the packages that ran it. created: ISO time (UTC).
        eps_fraction: eps as a simple fraction (``"8/255"``: :func:`fraction_text`), None
            when it is none (and in older reports, which did not record it).
        selected_on: for a ``best.pt``, the examples its run's per-epoch check chose it on
            (:func:`robust_amo.evaluation.api.selection_of`); shown in report.md. None: another
            file, a model without a run's config, or not recorded.
        extra: fields of a report.json this version does not know (kept for a round trip).
    """

    dataset: str
    split: str
    n_examples: int
    model: dict[str, Any]
    norm: str
    eps: float
    seed: int
    device: str
    precision: str
    bf16: bool
    clean_accuracy: float
    attacks: dict[str, AttackReport]
    robust_accuracy: float
    n_robust: int
    sanity_checks: list[SanityCheck]
    wall_time_s: float
    versions: dict[str, str]
    created: str
    data_dir: str | None = None
    selected_on: str | None = None
    eps_fraction: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sanity_ok(self) -> bool:
        """Every sanity check passed."""
        return all(c.passed for c in self.sanity_checks)

    @property
    def threat_model(self) -> dict[str, Any]:
        """``{"norm", "eps"}`` as report.json holds it, with ``"eps_fraction"`` (``"8/255"``)
        when the report has one."""
        out: dict[str, Any] = {"norm": self.norm, "eps": self.eps}
        if self.eps_fraction is not None:
            out["eps_fraction"] = self.eps_fraction
        return out

    @property
    def eps_label(self) -> str:
        """eps as people read it: ``0.0313725 (8/255)``, or the number alone."""
        return number_text(self.eps)

    @property
    def passes(self) -> Passes | None:
        """The passes of every attack together (clean included; not the sanity checks'), or
        None for a report written before passes were counted."""
        counted = [a.passes for a in self.attacks.values() if a.passes is not None]
        if not counted:
            return None
        total = Passes()
        for p in counted:
            total = total + p
        return total

    def robust_accuracies(self) -> dict[str, float]:
        """Robust accuracy of each attack but ``clean``, by name."""
        return {k: a.robust_accuracy for k, a in self.attacks.items() if a.kind != "clean"}

    def to_dict(self) -> dict[str, Any]:
        """report.json: the documented keys, in their order."""
        out = {
            "schema": SCHEMA, "created": self.created, "dataset": self.dataset,
            "data_dir": self.data_dir, "split": self.split, "n_examples": self.n_examples,
            "model": self.model, "threat_model": self.threat_model, "seed": self.seed,
            "device": self.device, "precision": self.precision, "bf16": self.bf16,
            "clean_accuracy": self.clean_accuracy,
            "attacks": {k: a.to_dict(self.n_examples) for k, a in self.attacks.items()},
            "robust_accuracy": self.robust_accuracy, "n_robust": self.n_robust,
            "sanity_checks": [c.to_dict() for c in self.sanity_checks],
            "sanity_ok": self.sanity_ok, "wall_time_s": self.wall_time_s,
        }
        total = self.passes
        if total is not None:
            out["passes"] = total.to_dict(self.n_examples)
        out["versions"] = self.versions
        if self.selected_on is not None:
            out["selected_on"] = self.selected_on
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """The report of a report.json document.

        Raises:
            ValueError: a missing field or another schema (:func:`validate_report`).
        """
        validate_report(d)
        known = {"schema", "created", "dataset", "data_dir", "split", "n_examples", "model",
                 "threat_model", "seed", "device", "precision", "bf16", "clean_accuracy",
                 "attacks", "robust_accuracy", "n_robust", "sanity_checks", "sanity_ok",
                 "wall_time_s", "versions", "selected_on", "passes"}
        attacks = {k: AttackReport.from_dict(a) for k, a in d["attacks"].items()}
        worst = d.get("n_robust")
        if worst is None:
            worst = round(d["robust_accuracy"] * d["n_examples"])
        return cls(
            dataset=d["dataset"], split=d["split"], n_examples=d["n_examples"],
            model=dict(d["model"]), norm=d["threat_model"]["norm"],
            eps=d["threat_model"]["eps"], seed=d["seed"], device=d["device"],
            precision=d["precision"], bf16=bool(d.get("bf16", False)),
            clean_accuracy=d["clean_accuracy"], attacks=attacks,
            robust_accuracy=d["robust_accuracy"], n_robust=int(worst),
            sanity_checks=[SanityCheck.from_dict(c) for c in d["sanity_checks"]],
            wall_time_s=d["wall_time_s"], versions=dict(d["versions"]), created=d["created"],
            data_dir=d.get("data_dir"), selected_on=d.get("selected_on"),
            eps_fraction=d["threat_model"].get("eps_fraction"),
            extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """The report in a report.json file.

        Raises:
            OutputError: the file is missing, not JSON, or not a robust-amo-eval/1 report.
        """
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except OSError as e:
            raise OutputError(f"cannot read report {p} ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OutputError(f"{p} is not a robust-amo-eval/1 report ({e}); write it again "
                              "with robust-amo eval") from None


def package_versions() -> dict[str, str]:
    """Versions of Python, torch and the packages an evaluation depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("robust-amo", "pyautoattack", "autoattack", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class FiniteLogits:
    """What :func:`robust_amo.evaluation.runner.finite_logits` found: NaN or infinite outputs.

    Attributes:
        n_examples: examples whose clean logits were checked.
        nonfinite_examples: of them, those with a NaN or infinite logit.
        nonfinite_weights: NaN or infinite entries of the model's parameters and buffers.
    """

    n_examples: int
    nonfinite_examples: int
    nonfinite_weights: int = 0

    @property
    def ok(self) -> bool:
        """Every logit is finite."""
        return self.nonfinite_examples == 0

    def check(self) -> SanityCheck:
        """The ``finite-logits`` check."""
        if self.ok:
            detail = f"the clean logits of all {self.n_examples} examples are finite"
        else:
            detail = (f"{self.nonfinite_examples} of {self.n_examples} examples have NaN or "
                      "infinite clean logits, so their predictions (and every accuracy here) "
                      "mean nothing")
        if self.nonfinite_weights:
            detail += f"; the model holds {self.nonfinite_weights} NaN or infinite weights"
        return SanityCheck("finite-logits", self.ok, detail)


def sanity_checks(
    clean_accuracy: float,
    outcomes: list[AttackOutcome],
    *,
    large_eps: tuple[float, float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    finite: FiniteLogits | None = None,
) -> list[SanityCheck]:
    """Checks against gradient masking and broken models, each a :class:`SanityCheck`.

    - ``finite-logits`` (when ``finite`` is given): every clean logit is finite; a model that
      outputs NaN still gets an argmax, and an accuracy near chance, so this check says it.
    - ``robust<=clean``: no attack has higher accuracy than the clean model.
    - ``restarts-monotone``: PGD robust accuracy never rises from one restart to the next.
    - ``more-steps``: a PGD with at least the steps and restarts of another (same eps, norm) is
      not weaker by more than ``tolerance``.
    - ``large-eps``: with eps large enough to reach a constant image, robust accuracy is 0.
    - ``pgd-vs-autoattack``: the strongest PGD and AutoAttack agree within ``tolerance``.
    - ``autoattack-checks``: AutoAttack's own checks raised no warning.
    - ``fast-checks``: the fast evaluation's versions of them (randomized model, probabilities
      as outputs, zero gradients at APGD-CE's start, more targets than classes) found nothing.
    """
    checks: list[SanityCheck] = [finite.check()] if finite is not None else []
    attacked = [o for o in outcomes if o.spec.kind != "clean"]
    acc = {o.spec.name: summarize(o)["robust_accuracy"] for o in attacked}
    bad = {k: v for k, v in acc.items() if v > clean_accuracy + 1e-12}
    checks.append(SanityCheck("robust<=clean", not bad, f"clean {clean_accuracy:.4f}; "
                              + (", ".join(f"{k} {v:.4f} exceeds it" for k, v in bad.items())
                                 if bad else "every attack at or below it")))
    pgds = [o for o in attacked if o.spec.kind == "pgd"]
    for o in pgds:
        curve = list(summarize(o)["curve"].values())
        rises = [i + 2 for i in range(len(curve) - 1) if curve[i + 1] > curve[i] + 1e-12]
        checks.append(SanityCheck("restarts-monotone", not rises, "robust accuracy per restart "
                                  + ", ".join(f"{v:.4f}" for v in curve)
                                  + (f"; rises at restart {rises}" if rises else ""),
                                  attack=o.spec.name))
    for a in pgds:
        for b in pgds:
            pa, pb = a.spec.pgd, b.spec.pgd
            ta, tb = pa.threat, pb.threat
            # targeted and untargeted PGD (or different target counts) are different attacks
            if a is b or (ta.eps, ta.norm, pa.targets) != (tb.eps, tb.norm, pb.targets):
                continue
            if tb.steps >= ta.steps and pb.restarts >= pa.restarts and (
                    tb.steps, pb.restarts) != (ta.steps, pa.restarts):
                worse = acc[b.spec.name] > acc[a.spec.name] + tolerance
                checks.append(SanityCheck(
                    "more-steps", not worse, f"{b.spec.name} ({tb.steps} steps x {pb.restarts}) "
                    f"{acc[b.spec.name]:.4f} vs {a.spec.name} ({ta.steps} x {pa.restarts}) "
                    f"{acc[a.spec.name]:.4f}"))
    if large_eps is not None:
        eps, a = large_eps
        checks.append(SanityCheck("large-eps", a == 0.0,
                                  f"PGD-20 at eps {eps:.4g} leaves robust accuracy {a:.4f} "
                                  "(must be 0: a constant image is within reach of every input)"))
    aas = [o for o in attacked if o.spec.kind == "autoattack"]
    if pgds and aas:
        best_pgd = min(pgds, key=lambda o: acc[o.spec.name])
        for o in aas:
            gap = abs(acc[o.spec.name] - acc[best_pgd.spec.name])
            checks.append(SanityCheck(
                "pgd-vs-autoattack", gap <= tolerance,
                f"{best_pgd.spec.name} {acc[best_pgd.spec.name]:.4f} vs {o.spec.name} "
                f"{acc[o.spec.name]:.4f} (gap {gap:.4f}, tolerance {tolerance:.4f})"))
    for o in aas + [o for o in attacked if o.spec.kind == "fast"]:
        checks.append(SanityCheck(f"{o.spec.kind}-checks", not o.warnings,
                                  "; ".join(o.warnings) if o.warnings else "no warnings",
                                  attack=o.spec.name))
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
    checks: list[SanityCheck],
    data_dir: str | None = None,
    selected_on: str | None = None,
) -> Report:
    """The :class:`Report` of one evaluation from its per-example outcomes."""
    if not outcomes:
        raise ValueError("no attack outcomes to report")
    n = len(outcomes[0].robust)
    clean = int(outcomes[0].clean.sum()) / n if n else float("nan")
    worst = outcomes[0].clean.clone()
    attacks: dict[str, AttackReport] = {}
    for o in outcomes:
        s = summarize(o)
        worst &= o.robust
        attacks[o.spec.name] = AttackReport(
            o.spec.kind, o.spec.settings(), s["robust_accuracy"], s["n_robust"], s["curve"],
            o.warnings, round(o.wall_time_s, 3), o.resumed_chunks, o.backend or None,
            Passes(o.forward_passes, o.backward_passes),
            {k: Passes(f, b) for k, (f, b) in o.sub_passes.items()}, s["individual"])
    return Report(
        dataset=dataset, split=split, n_examples=n,
        model={k: v for k, v in model_meta.items() if k != "config"}, norm=norm, eps=eps,
        seed=seed, device=device,
        precision="bf16 (requested; PGD forward passes under autocast)" if bf16 else "float32",
        bf16=bf16, clean_accuracy=clean, attacks=attacks,
        robust_accuracy=int(worst.sum()) / n if n else float("nan"), n_robust=int(worst.sum()),
        sanity_checks=list(checks), wall_time_s=round(wall_time_s, 3),
        versions=package_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        data_dir=data_dir, selected_on=selected_on, eps_fraction=fraction_text(eps))


def markdown(report: Report) -> str:
    """A readable summary: one row per attack, the overall worst case, the sanity checks."""
    m = report.model
    flagged = [c for c in report.sanity_checks if not c.passed]
    lines = [
        f"# Robustness evaluation: {m.get('arch')} ({m.get('path')})",
        "",
        f"{report.dataset} {report.split}, {report.n_examples} examples; "
        f"{report.norm} eps = {report.eps_label}; seed {report.seed}; {report.device}, "
        f"{report.precision}.",
    ]
    if report.selected_on is not None:
        lines += ["", f"best.pt was chosen by its run's per-epoch check on {report.selected_on}."]
    if flagged:
        lines += ["", f"**{len(flagged)} sanity check(s) FLAGGED "
                      f"({', '.join(c.name for c in flagged)}): do not trust these figures "
                      "before reading the checks below.**"]
    n = report.n_examples
    lines += [
        "",
        "| attack | settings | robust accuracy | time (s) | passes per example (fwd / bwd) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, a in report.attacks.items():
        if a.kind == "clean":
            lines.append(f"| {name} | | {report.clean_accuracy:.2%} | | "
                         f"{_per_example(a.passes, n)} |")
            continue
        s = a.settings
        if a.kind == "pgd":
            runs = (f"{s['targets']} targets x {s['restarts']} restarts" if s.get("targets")
                    else f"{s['restarts']} restarts")
            desc = (f"{s['steps']} steps x {runs}, step {number_text(s['step_size'], 4)}, "
                    f"{s['loss']} loss")
        elif a.kind == "fast":
            ranked = "nearest linearised boundary first, MALT" if s.get("rank") == "malt" \
                else "highest clean logit first"
            again = ", then the first again from the clean input" if s.get("clean_start") \
                else ""
            desc = (f"APGD-CE, then APGD-T towards {s['targets']} targets ({ranked}){again}, "
                    f"{s['steps']} iterations each, on the examples still standing")
        else:
            desc = f"{s['version']}: {', '.join(s['attacks'])} ({a.backend or ''})"
        lines.append(f"| {name} | {desc} | {a.robust_accuracy:.2%} | {a.wall_time_s:.1f} | "
                     f"{_per_example(a.passes, n)} |")
        if a.kind == "autoattack":
            # one row per sub-attack: cumulative accuracy, alone (individual), its passes
            for sub, acc in a.curve.items():
                alone = a.individual.get(sub)
                what = "after it and those above" + (
                    f"; alone {alone:.2%}" if alone is not None else "")
                lines.append(f"| ↳ {sub} | {what} | {acc:.2%} | | "
                             f"{_per_example(a.sub_passes.get(sub), n)} |")
    lines.append(f"| **worst case** | per example, over all attacks | "
                 f"**{report.robust_accuracy:.2%}** | | {_per_example(report.passes, n)} |")
    total = report.passes
    if total is not None:
        lines += ["", f"Passes of the model, all attacks together (the sanity checks not "
                      f"counted), in examples: {total.forward:,} forward and "
                      f"{total.backward:,} backward."]
    lines += ["", f"Wall time of this command: {report.wall_time_s:.1f} s (attack times "
              "include work done before a resume).", "", "## Sanity checks", ""]
    for c in report.sanity_checks:
        tag = "ok" if c.passed else "FLAGGED"
        where = f" ({c.attack})" if c.attack is not None else ""
        lines.append(f"- {tag}: {c.name}{where}: {c.detail}")
    return "\n".join(lines) + "\n"


def _per_example(passes: Passes | None, n: int) -> str:
    """``12.5 / 10`` passes per example of a table row (empty when not counted)."""
    if passes is None or not n:
        return ""
    return f"{passes.forward / n:,.4g} / {passes.backward / n:,.4g}"


MIN_SPAN = 10.0
"""The restart picture's y axis spans at least this many percentage points, so that a change of
one example (0.2 points of 500) does not fill the picture like a cliff."""


def restarts_figure(report: Report):
    """Robust accuracy after each restart of every multi-restart PGD of a report: does it
    flatten (enough restarts) or still fall (more would find more)?

    The y axis is in percent and spans at least :data:`MIN_SPAN` points (within 0-100); its
    label says what one example is worth, and a right-hand axis counts robust examples. Each
    AutoAttack run is a dashed horizontal line at its robust accuracy. The title names the
    model, data, n and eps.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    n = max(report.n_examples, 1)
    values: list[float] = []
    for name, a in report.attacks.items():
        curve = list(a.curve.values())  # {"restart 1": acc, ...}, in order
        if a.kind == "pgd" and len(curve) > 1:
            ys = [100 * c for c in curve]
            ax.plot(range(1, len(curve) + 1), ys, marker="o", label=name)
            values += ys
    for name, a in report.attacks.items():
        if a.kind == "autoattack":
            y = 100 * a.robust_accuracy
            # hlines (a collection, not a Line2D): across the whole width, beside the curves
            ax.hlines(y, 0, 1, transform=ax.get_yaxis_transform(), colors="black",
                      linestyles="--", linewidth=1, label=f"{name} ({y:.2f}%)")
            values.append(y)
    if values:
        ax.set_ylim(*_honest_range(min(values), max(values)))
    targeted = any(a.kind == "pgd" and a.settings.get("targets") and len(a.curve) > 1
                   for a in report.attacks.values())
    # a targeted PGD's points are its targets (each with its restarts), in rank order
    ax.set_xlabel("restart (targeted PGD: target, then restart)" if targeted else "restart")
    ax.xaxis.get_major_locator().set_params(integer=True)
    per = 100 / n
    ax.set_ylabel(f"robust accuracy (%; 1 example = {per:.2g} "
                  f"{'point' if per == 1 else 'points'})")
    counts = ax.secondary_yaxis("right", functions=(lambda p: p * n / 100,
                                                    lambda k: k * 100 / n))
    counts.set_ylabel(f"robust examples (of {report.n_examples})")
    counts.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{report.model.get('arch', '')}: robust accuracy after each PGD restart\n"
                 f"{report.dataset} {report.split}, n = {report.n_examples} examples, "
                 f"{report.norm} eps = {report.eps_label}", fontsize=10)
    ax.grid(alpha=0.3)
    if values:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _honest_range(lo: float, hi: float) -> tuple[float, float]:
    """A y range in percent around [lo, hi], at least :data:`MIN_SPAN` wide, inside 0-100."""
    span = max(MIN_SPAN, 1.2 * (hi - lo))
    bottom = (lo + hi) / 2 - span / 2
    bottom = min(max(bottom, 0.0), 100.0 - span) if span < 100 else 0.0
    return bottom, bottom + min(span, 100.0)


def write_report(report: Report, path: str | Path) -> tuple[Path, Path]:
    """Write the JSON report and its Markdown twin (same name, ``.md``), and, when an attack
    has several restarts, ``NAME.restarts.png``: robust accuracy after each restart (does it
    flatten?). Every file an earlier report at ``path`` wrote (:func:`report_files`) is removed
    first, so nothing of it stays beside the new one. Returns the JSON and Markdown paths."""
    p = Path(path)
    with disk_writes(p.parent):
        p.parent.mkdir(parents=True, exist_ok=True)
    remove_report_files(p)
    atomic_write(p, json.dumps(report.to_dict(), indent=2) + "\n")  # a full disk: one line
    md = p.with_suffix(".md")
    atomic_write(md, markdown(report))
    if any(a.kind == "pgd" and len(a.curve) > 1 for a in report.attacks.values()):
        save_figure(restarts_figure(report), restarts_png(p))
    return p, md


ROBUSTBENCH_THEIRS = ("link", "name", "authors", "venue", "reported", "additional_data")
"""Fields of a RobustBench model-info entry that the model's authors fill (we leave them empty:
null for ``additional_data``, "" for the rest)."""


MAX_DENOMINATOR = 4 * 255
"""The largest denominator :func:`fraction_text` shows (quarters of 255ths: 1/1020)."""


def fraction_text(x: float) -> str | None:
    """``"8/255"`` for 0.0313725..., ``"1/10"`` for 0.1: ``x`` as a fraction with a denominator
    up to :data:`MAX_DENOMINATOR` when that fraction gives ``x`` to a relative 1e-7 (a float32
    round trip); None for whole numbers and numbers no such fraction gives."""
    if not math.isfinite(x) or x <= 0:
        return None
    f = Fraction(x).limit_denominator(MAX_DENOMINATOR)
    if f.denominator == 1 or abs(float(f) - x) > 1e-7 * x:
        return None
    return f"{f.numerator}/{f.denominator}"


def number_text(x: float, digits: int = 6) -> str:
    """``0.0313725 (8/255)``: the number, and its fraction when :func:`fraction_text` has one."""
    frac = fraction_text(x)
    return f"{x:.{digits}g}" + (f" ({frac})" if frac else "")


def eps_text(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths (RobustBench's way), else the number."""
    k = round(eps * 255)
    return f"{k}/255" if k > 0 and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def robustbench_entry(report: Report) -> dict[str, Any]:
    """The fields of a RobustBench model-info entry (``model_info/DATASET/THREAT/NAME.json``)
    from an eval report with a standard AutoAttack run; docs/evaluation.md says which fields are
    ours and which the model's authors fill.

    Raises:
        ValueError: the report has no ``autoattack`` (standard) result.
    """
    aa = report.attacks.get("autoattack")
    if aa is None:
        raise ValueError("a RobustBench entry needs the standard AutoAttack (attack autoattack)")
    threat = {"linf": "Linf", "l2": "L2"}[report.norm]
    entry: dict[str, Any] = {k: "" for k in ROBUSTBENCH_THEIRS}
    entry["additional_data"] = None
    entry.update({
        "number_forward_passes": 1,
        "dataset": report.dataset,
        "architecture": report.model.get("arch"),
        "eps": eps_text(report.eps),
        "clean_acc": f"{100 * report.clean_accuracy:.2f}",
        "autoattack_acc": f"{100 * aa.robust_accuracy:.2f}",
    })
    entry["robust_amo"] = {
        "threat_model": threat,
        "n_examples": report.n_examples,
        "split": report.split,
        "leaderboard_comparable": report.n_examples >= 10000 and report.split == "test",
        "autoattack_backend": aa.backend,
        "autoattack_version": aa.settings.get("version"),
        "model_info_path": f"model_info/{report.dataset}/{threat}/NAME.json",
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


def state_path(report_path: str | Path) -> Path:
    """The resume state of an evaluation writing ``report_path``: ``report.state.pt`` (under
    torchrun each rank keeps ``report.state.rankRofN.pt``:
    :func:`robust_amo.evaluation.sharding.state_file`)."""
    return Path(report_path).with_suffix(".state.pt")


def report_outputs(report_path: str | Path) -> list[Path]:
    """The files a finished report at ``report_path`` may consist of, in one list: the JSON,
    the Markdown, the restart picture and the RobustBench entry. A folder holding any of them
    holds a report (``overwrite`` replaces it)."""
    p = Path(report_path)
    return [p, p.with_suffix(".md"), restarts_png(p), robustbench_path(p)]


def report_files(report_path: str | Path) -> list[Path]:
    """Every file of an evaluation at ``report_path`` that exists: :func:`report_outputs` and
    the resume state files of any number of ranks."""
    state = state_path(report_path)
    ranks = sorted(state.parent.glob(f"{glob.escape(state.stem)}.rank*of*{state.suffix}"))
    return [f for f in [*report_outputs(report_path), state, *ranks] if f.is_file()]


def remove_report_files(report_path: str | Path) -> list[Path]:
    """Delete every file of an earlier evaluation at ``report_path`` (:func:`report_files`)."""
    removed = report_files(report_path)
    for f in removed:
        f.unlink(missing_ok=True)
    if removed:
        log.info("removed the earlier report's %s", ", ".join(f.name for f in removed))
    return removed


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


ADV_FORMAT = "robust-amo-adv/1"
"""The ``format`` entry of a ``save_adv`` file (an .npz of plain arrays)."""


def worst_case_examples(outcomes: list[AttackOutcome], x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The worst-case adversarial example of each example and which attack found it.

    Attacks are taken in order (``clean`` first): an example keeps the point of the first attack
    that broke it, named ``ATTACK:STEP`` (``pgd50:restart 3``, ``autoattack:apgd-t``: the first
    restart, target or sub-attack after which it was broken) or ``ATTACK`` when the attack has
    no steps; ``clean`` for an example misclassified without attack (its point is x); ``""``
    for an example no attack broke (its point is x).

    Args:
        outcomes: the attacks' outcomes, each with its kept points (``adv``, from
            ``evaluate_attacks(..., keep_adv=True)``).
        x: the clean examples (n, ...); y: labels (n,).

    Returns:
        ``(x_adv (n, ...) float32 on the CPU, found_by (n,) names)``.

    Raises:
        ValueError: an outcome without its points.
    """
    x_adv = x.detach().float().cpu().clone()
    found = [""] * len(y)
    for o in outcomes:
        if o.spec.kind == "clean":
            for i in (~o.clean).nonzero().squeeze(1).tolist():
                found[i] = found[i] or "clean"
            continue
        if o.adv is None:
            raise ValueError(f"attack {o.spec.name} kept no adversarial points")
        broken = (o.clean & ~o.robust).nonzero().squeeze(1).tolist()
        for pos, i in enumerate(broken):
            if found[i]:
                continue
            step = next((k for k, m in o.steps.items() if not bool(m[i])), None)
            found[i] = f"{o.spec.name}:{step}" if step is not None else o.spec.name
            x_adv[i] = o.adv[pos]
        for i in (~o.clean).nonzero().squeeze(1).tolist():
            found[i] = found[i] or "clean"
    return x_adv, found


def write_adversarial(path: str | Path, x_adv: torch.Tensor, y: torch.Tensor,
                      found_by: list[str], prediction: torch.Tensor, *, eps: float,
                      norm: str, attacks: list[str]) -> Path:
    """Write the worst-case adversarial examples as an .npz of plain arrays, atomically.

    It loads without pickle: ``numpy.load(path, allow_pickle=False)``. Arrays: ``x_adv``
    (n, C, H, W) float32 in [0, 1]; ``y`` (n,) int64 labels; ``index`` (n,) int64, the
    example's position among the n evaluated examples (the first n of the split);
    ``found_by`` (n,) unicode, the attack that broke it (:func:`worst_case_examples`; ``""``:
    robust); ``robust`` (n,) bool; ``prediction`` (n,) int64, the model's class at x_adv;
    ``attacks`` the attacks run, in order; ``eps`` float64; ``norm`` and ``format``
    (``robust-amo-adv/1``) unicode scalars.
    """
    arrays = {
        "format": np.array(ADV_FORMAT), "x_adv": x_adv.float().cpu().numpy(),
        "y": y.cpu().numpy().astype(np.int64),
        "index": np.arange(len(y), dtype=np.int64),
        "found_by": np.array(found_by, dtype=str),
        "robust": np.array([f == "" for f in found_by], dtype=bool),
        "prediction": prediction.cpu().numpy().astype(np.int64),
        "attacks": np.array(attacks, dtype=str), "eps": np.array(eps, dtype=np.float64),
        "norm": np.array(norm),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())
