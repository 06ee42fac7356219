"""The registry of evaluation attacks: what ``robust-amo eval --attack NAME`` can run.

Each entry is one function registered with :func:`register_eval_attack`: it turns a name (``clean``,
``pgd20``, ``autoattack``...) and the command's :class:`EvalOptions` into an :class:`EvalAttack`,
or returns None for a name it does not know. An :class:`EvalAttack` runs on one chunk of the
evaluation set and returns per-example masks; the runner, the state file, the report and the
CLI help know nothing more of it. Adding an attack is one registered function (and, if it is a
new kind of attack, one :class:`EvalAttack` subclass); docs/architecture.md shows how.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robust_amo.config import AttackLoss, Norm, ThreatModel
from robust_amo.errors import ConfigError
from robust_amo.runtime import Amp, eval_mode

from .autoattack_adapter import (
    AutoAttackSettings,
    autoattack_backend,
    autoattack_robust,
    backend_version,
)
from .fast_eval import FastSettings, fast_robust
from .pgd_eval import PGDSettings, pgd_robust

SavePartial = Callable[[dict[str, Any]], None]
"""Called with a chunk's partial entry after each finished sub-step (AutoAttack's attacks).

The entry is the attack's to shape (it comes back as ``partial`` after a resume); two keys are
read by the runner for its progress lines: ``done`` (the sub-steps finished so far, in order) and
``robust`` (the chunk's (B,) mask after them)."""


EVAL_STEP_FRACTION = 0.25
"""The evaluation PGD's default step as a fraction of eps: eps / 4 (2/255 at 8/255)."""


def eval_step_size(eps: float, step_size: float | None = None) -> float:
    """The step of an evaluation PGD: ``step_size`` when given, else ``eps · EVAL_STEP_FRACTION``.

    The one default of ``robust-amo eval`` and :func:`robust_amo.evaluate`: it never takes the
    training attack's step, so one eps gives one attack whatever the checkpoint. (The margins'
    PGD neighbourhood is the training attack's, so ``margins`` keeps the training step:
    :func:`robust_amo.evaluation.threat_model`; docs/evaluation.md, "Step size".)
    """
    return float(step_size) if step_size is not None else eps * EVAL_STEP_FRACTION


@dataclass(frozen=True)
class EvalOptions:
    """The evaluation options every attack may read.

    Attributes:
        threat: norm, eps, PGD step (already resolved by :func:`eval_step_size`) and loss; its
            ``steps`` is replaced by each PGD's own (``pgd20``: 20).
        restarts: PGD restarts (None: the attack's default, 10 for pgd50, else 1).
        seed: seed of the random starts (PGD) and of AutoAttack.
        aa_attacks: the attacks of ``autoattack-custom``.
        aa_backend: ``"autoattack"``, ``"pyautoattack"`` or None (the first installed).
        individual: AutoAttack runs each of its attacks on every clean-correct example and
            reports each one's robust accuracy (default False: the cascade only).
    """

    threat: ThreatModel
    restarts: int | None = None
    seed: int = 0
    aa_attacks: tuple[str, ...] = ()
    aa_backend: str | None = None
    individual: bool = False

    @property
    def eps(self) -> float:
        """The threat model's radius (what most registered attacks read)."""
        return self.threat.eps

    @property
    def norm(self) -> Norm:
        """The threat model's norm."""
        return self.threat.norm

    @property
    def step_size(self) -> float:
        """The PGD step, already resolved by :func:`eval_step_size`."""
        return self.threat.step_size

    @property
    def loss(self) -> AttackLoss:
        """The PGD loss."""
        return self.threat.loss


class EvalAttack:
    """One entry of ``--attack``: its name, its settings, and how it runs on a chunk.

    Attributes:
        name: as given on the command line (lower case), the key in the report and state.
        kind: the family (``clean``, ``pgd``, ``autoattack``) the report's checks look at.
    """

    kind: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def settings(self) -> dict[str, Any]:
        """The settings as a plain dict (report and state file; a change restarts the attack)."""
        return {}

    def backend(self) -> str | None:
        """The package and version that ran the attack, for the report (None: ours)."""
        return None

    def run_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  index: torch.Tensor, *, amp: Amp, partial: dict[str, Any] | None,
                  save_partial: SavePartial) -> dict[str, Any]:
        """Attack one chunk; the chunk entry ``{"clean", "robust", "steps", ...}`` (CPU masks).

        Optional keys: ``adv``, the adversarial points of the broken examples
        (``clean & ~robust``, in order; kept only for ``save_adv``), ``individual``
        (sub-attack -> (B,) mask of robustness under that sub-attack alone) and ``warnings``.

        Args:
            model: the classifier (the attack runs it in eval mode and restores its mode).
            x, y: the chunk (B, ...) and its labels on the evaluation device.
            index: the examples' global indices (B,), which key per-example randomness.
            amp: the forward passes' context (bf16 autocast when asked for).
            partial: what :func:`save_partial` saved for this chunk before an interruption.
            save_partial: persist a partial result after a sub-step (resumable attacks).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.settings()})"


class CleanAccuracy(EvalAttack):
    """No attack: correct classification of the clean input."""

    kind = "clean"

    def run_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # noqa: D102
                  index: torch.Tensor, *, amp: Amp, partial: dict[str, Any] | None,
                  save_partial: SavePartial) -> dict[str, Any]:
        with torch.no_grad(), amp(), eval_mode(model):
            ok = (model(x).argmax(1) == y).cpu()
        return {"clean": ok, "robust": ok, "steps": {}, "adv": x[:0].detach().float().cpu()}


class PGDAttack(EvalAttack):
    """PGD-K × R with the per-example worst case (:func:`robust_amo.evaluation.pgd_robust`)."""

    kind = "pgd"

    def __init__(self, name: str, pgd: PGDSettings) -> None:
        super().__init__(name)
        self.pgd = pgd

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return self.pgd.to_dict()

    def run_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # noqa: D102
                  index: torch.Tensor, *, amp: Amp, partial: dict[str, Any] | None,
                  save_partial: SavePartial) -> dict[str, Any]:
        r = pgd_robust(model, x, y, index, self.pgd, amp)
        return {"clean": r.clean.cpu(), "robust": r.robust.cpu(),
                "steps": dict(zip(self.pgd.step_names(), r.after_restart.cpu(), strict=True)),
                "adv": r.x_adv[r.clean & ~r.robust].detach().float().cpu()}


class AutoAttackEval(EvalAttack):
    """AutoAttack through its official code (:func:`robust_amo.evaluation.autoattack_robust`),
    resumable after each of its attacks."""

    kind = "autoattack"

    def __init__(self, name: str, aa: AutoAttackSettings) -> None:
        super().__init__(name)
        self.aa = aa

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return self.aa.to_dict()

    def backend(self) -> str | None:  # noqa: D102
        return backend_version(*autoattack_backend(self.aa.backend))

    def run_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # noqa: D102
                  index: torch.Tensor, *, amp: Amp, partial: dict[str, Any] | None,
                  save_partial: SavePartial) -> dict[str, Any]:
        prev = partial.get("aa") if partial is not None else None
        adv = partial.get("adv") if partial is not None else None
        r = autoattack_robust(model, x, y, self.aa, state=prev, adv=adv,
                              on_step=lambda res: save_partial(
                                  {"aa": res.state(), "done": list(res.done),
                                   "robust": res.robust.cpu(), "adv": res.adv()}))
        out = {"clean": r.clean.cpu(), "robust": r.robust.cpu(),
               "steps": {k: v.cpu() for k, v in r.after_attack.items()},
               "warnings": r.warnings, "adv": r.adv()}
        if r.individual:
            out["individual"] = {k: v.cpu() for k, v in r.individual.items()}
        return out


class FastEval(EvalAttack):
    """APGD-CE then APGD-T on the examples still standing (:func:`fast_robust`)."""

    kind = "fast"

    def __init__(self, name: str, fast: FastSettings) -> None:
        super().__init__(name)
        self.fast = fast

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return self.fast.to_dict()

    def run_chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # noqa: D102
                  index: torch.Tensor, *, amp: Amp, partial: dict[str, Any] | None,
                  save_partial: SavePartial) -> dict[str, Any]:
        r = fast_robust(model, x, y, index, self.fast, amp)
        return {"clean": r.clean.cpu(), "robust": r.robust.cpu(),
                "steps": dict(zip(self.fast.stage_names(), (m.cpu() for m in r.after_stage),
                                  strict=True)),
                "warnings": r.warnings,
                "adv": r.x_adv[r.clean & ~r.robust].detach().float().cpu()}


Parser = Callable[[str, EvalOptions], EvalAttack | None]


@dataclass(frozen=True)
class Registered:
    """A registered parser with how the CLI help shows its names."""

    parse: Parser
    usage: str
    help: str


EVAL_ATTACKS: dict[str, Registered] = {}


def register_eval_attack(usage: str, help: str) -> Callable[[Parser], Parser]:
    """Register ``parse(name, options) -> EvalAttack | None`` (None: not my name).

    Args:
        usage: how the names look in the help (``pgdK``, ``autoattack``).
        help: one line for ``robust-amo eval --help`` and the error of an unknown name.
    """

    def deco(fn: Parser) -> Parser:
        EVAL_ATTACKS[usage] = Registered(fn, usage, help)
        return fn

    return deco


def attack_usage() -> str:
    """The registered names, comma-separated, for help texts and errors."""
    return ", ".join(EVAL_ATTACKS)


def attack_help() -> str:
    """One ``usage: help`` clause per registered attack, for ``--attack``'s help."""
    return "; ".join(f"{r.usage}: {r.help}" for r in EVAL_ATTACKS.values())


def parse_attack(name: str, *, eps: float, norm: Norm = "linf", step_size: float | None = None,
                 restarts: int | None = None, loss: AttackLoss = "ce", seed: int = 0,
                 aa_attacks: tuple[str, ...] = (), aa_backend: str | None = None,
                 individual: bool = False) -> EvalAttack:
    """The :class:`EvalAttack` of a name such as ``clean``, ``pgd20``, ``pgd50``, ``pgd50-t9``,
    ``autoattack`` (``individual``: see :class:`EvalOptions`).

    Raises:
        ConfigError: an unknown name or bad values.
    """
    key = name.strip().lower()
    threat = ThreatModel(norm, eps, eval_step_size(eps, step_size), loss=loss)
    opts = EvalOptions(threat, restarts, seed, tuple(aa_attacks), aa_backend, individual)
    for entry in EVAL_ATTACKS.values():
        try:
            attack = entry.parse(key, opts)
        except ValueError as e:  # the settings' own checks (ConfigError is one too)
            raise ConfigError(f"attacks {name}: {e}", params=("attacks",)) from None
        if attack is not None:
            return attack
    raise ConfigError(f"unknown attack {name!r}; use {attack_usage()}", params=("attacks",))


@register_eval_attack("clean", "accuracy without attack (always reported)")
def _clean(name: str, opts: EvalOptions) -> EvalAttack | None:
    return CleanAccuracy("clean") if name == "clean" else None


PGD_DEFAULT_RESTARTS = {50: 10}


@register_eval_attack("pgdK", "K PGD steps of eps/4 (pgd20; pgd50 = 50 steps x 10 restarts)")
def _pgd(name: str, opts: EvalOptions) -> EvalAttack | None:
    m = re.fullmatch(r"pgd(\d+)", name)
    if not m:
        return None
    steps = int(m.group(1))
    if steps < 1:
        # parse_attack puts the name in front
        raise ConfigError("PGD needs at least one step (pgd1, pgd20, ...); `clean` is the "
                          "accuracy without an attack")
    restarts = opts.restarts if opts.restarts is not None else PGD_DEFAULT_RESTARTS.get(steps, 1)
    return PGDAttack(name, PGDSettings(opts.threat.replace(steps=steps), restarts, opts.seed))


@register_eval_attack("pgdK-tN[-dlr]",
                      "targeted PGD, K steps towards each of the N classes with the highest "
                      "clean logits but the label; CW-targeted loss z_t - z_y, or DLR-targeted "
                      "with -dlr; worst case over targets (pgd50-t9)")
def _targeted(name: str, opts: EvalOptions) -> EvalAttack | None:
    m = re.fullmatch(r"pgd(\d+)-t(\d+)(-dlr|-cw)?", name)
    if not m:
        return None
    steps, targets = int(m.group(1)), int(m.group(2))
    if steps < 1 or targets < 1:
        raise ConfigError("targeted PGD needs at least one step and one target (pgd50-t9)")
    restarts = opts.restarts if opts.restarts is not None else 1
    target_loss = "dlr" if m.group(3) == "-dlr" else "cw"
    return PGDAttack(name, PGDSettings(opts.threat.replace(steps=steps), restarts, opts.seed,
                                       targets=targets, target_loss=target_loss))


AA_VERSIONS = {"autoattack": "standard", "autoattack-plus": "plus", "autoattack-rand": "rand",
               "autoattack-custom": "custom"}


@register_eval_attack("autoattack[-plus|-rand|-custom]",
                      "AutoAttack's versions; -custom runs --aa-attacks")
def _autoattack(name: str, opts: EvalOptions) -> EvalAttack | None:
    version = AA_VERSIONS.get(name)
    if version is None:
        return None
    attacks = opts.aa_attacks if version == "custom" else ()
    return AutoAttackEval(name, AutoAttackSettings(opts.threat.eps, opts.threat.norm, version,
                                                   attacks, opts.seed, opts.aa_backend,
                                                   opts.individual))


@register_eval_attack("fast[-tN][-malt][-x0]",
                      "APGD-CE then APGD-T towards N classes the clean logits rank next (-malt: "
                      "nearest linearised boundary first; -x0: the first target once more from "
                      "the clean input), each only on the examples still standing; plain fast "
                      "is fast-t3; L-inf; docs/evaluation.md")
def _fast(name: str, opts: EvalOptions) -> EvalAttack | None:
    m = re.fullmatch(r"fast(?:-t(\d+))?(-malt)?(-x0)?", name)
    if not m:
        return None
    if opts.threat.norm != "linf":
        raise ConfigError("the fast evaluation is L-inf only (APGD's sign steps); use pgd50 or "
                          "autoattack for L2")
    targets = int(m.group(1)) if m.group(1) else 3
    if targets < 1:
        raise ConfigError("the fast evaluation needs at least one target (fast-t3)")
    return FastEval(name, FastSettings(opts.threat.eps, 100, targets, opts.seed,
                                       "malt" if m.group(2) else "logits", bool(m.group(3))))
