"""Evaluations and margins as library calls: what ``robust-amo eval`` and ``margins`` run.

- :func:`evaluate`: any ``nn.Module`` on [0, 1] images, one call, in the spirit of RobustBench's
  ``benchmark``: ``robust_amo.evaluate(model, dataset="cifar10", eps=8/255)`` -> :class:`Report`.
- :func:`evaluate_checkpoint`: a checkpoint (or ``--model`` file) described by an
  :class:`EvalRequest`, the fields of ``robust-amo eval``'s flags: load, attack chunk by chunk
  (resumable, sharded over torchrun's ranks), sanity checks, report.json/.md, RobustBench entry.
- :func:`measure_checkpoint`: the margins of a checkpoint described by a :class:`MarginsRequest`
  (``robust-amo margins``), written as margins.csv, summary.json and plots.

Requests hold plain values (JSON-serialisable: :meth:`EvalRequest.to_dict`), so a study's worker
can pass one along. Errors name the request's fields (``eps``, ``resume``); the CLI says them as
its flags. docs/evaluation.md, "From Python"; docs/margins.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robust_amo import distributed
from robust_amo.checkpoint import Which
from robust_amo.config import (
    AttackLoss,
    Norm,
    check_at_least,
    check_choice,
    check_int,
    check_split_of,
    parse_float,
)
from robust_amo.data import dataset_info
from robust_amo.distributed import DistContext
from robust_amo.errors import ConfigError
from robust_amo.margins import MarginsResult, SearchOptions, measure
from robust_amo.margins.measure import CSV, SUMMARY
from robust_amo.models import ExternalModel
from robust_amo.outputs import atomic_write, refuse_overwrite, writable_dir
from robust_amo.runs import BEST
from robust_amo.runtime import eval_mode, resolve_device

from . import sharding
from .attacks import EvalAttack, parse_attack
from .loading import (
    Analysis,
    EvalData,
    SplitName,
    check_differentiable,
    load_eval_data,
    load_for_analysis,
)
from .outcome import AttackOutcome
from .report import (
    DEFAULT_TOLERANCE,
    Report,
    build_report,
    number_text,
    report_outputs,
    robustbench_entry,
    robustbench_path,
    sanity_checks,
    state_path,
    worst_case_examples,
    write_adversarial,
    write_report,
)
from .runner import chunks, evaluate_attacks, finite_logits, large_eps_accuracy, model_digest

log = logging.getLogger(__name__)

ReportFormat = Literal["robust-amo", "robustbench"]
"""``robustbench`` also writes REPORT.robustbench.json (needs the standard AutoAttack)."""


def _check_attack_counts(batch_size: int, n_examples: int | None, restarts: int | None,
                         seed: int) -> None:
    """The counts every evaluation takes (:class:`EvalRequest` and :func:`evaluate`)."""
    for key, v in (("batch_size", batch_size), ("n_examples", n_examples),
                   ("restarts", restarts)):
        check_at_least(key, v)
    check_int("seed", seed)


@dataclass
class CheckpointRequest:
    """What to analyse: a checkpoint, or a model of your own, and the examples and threat model.

    Attributes:
        checkpoint: run folder of ``robust-amo train`` or of robustness's ``train_model``, or a
            ``.pt`` file (or give ``model``).
        model: ``FILE.py:FN`` or ``package.module:FN`` returning your ``nn.Module`` (RUNS that
            code), with ``weights`` (required: a file, or ``"none"`` for the module as FN
            returns it), ``mean``/``std`` (normalisation applied inside, inputs stay
            in [0, 1]) and ``input_shape`` (C, H, W; default the dataset's).
        which: ``last`` (checkpoint.pt) or ``best`` (best.pt) of a run folder.
        arch: architecture of a robustness-library checkpoint that records none.
        dataset, data_dir: the data (default: the checkpoint's).
        split: ``test`` (default), ``val`` (the run's held-out part) or ``train``.
        n_examples: the first N examples of the split (None: all).
        eps, norm, step_size: the threat model (numbers or text such as ``"8/255"``; default:
            the checkpoint's training attack).
        batch_size: examples per batch. device: ``auto``, ``cpu`` or ``cuda[:i]``.
        seed: of the attacks' random starts. progress: progress bars.
        unsafe_load: unpickle a file that needs it (RUNS code from it).
        overwrite: replace earlier results in the output folder (refused without it).
    """

    checkpoint: str | None = None
    model: str | None = None
    weights: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_shape: list[int] | None = None
    which: Which = "last"
    arch: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    split: SplitName = "test"
    n_examples: int | None = None
    eps: str | float | None = None
    norm: Norm | None = None
    step_size: str | float | None = None
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    unsafe_load: bool = False
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The request (of the class it is called on) from :meth:`to_dict`'s output.

        Raises:
            ConfigError: a key that is not a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}; fields: "
                              f"{', '.join(sorted(names))}")
        return cls(**data)

    def external(self, points: list[str] | None = None) -> dict[str, Any] | None:
        """The model options as :func:`~robust_amo.evaluation.load_external` arguments, or None
        for a checkpoint; exactly one of ``checkpoint`` and ``model`` must be given.

        Raises:
            ConfigError: both or neither, model options with a checkpoint, or ``mean``
                without ``std``.
        """
        if (self.checkpoint is None) == (self.model is None):
            raise ConfigError("give either checkpoint (a run or .pt file) or model FILE.py:FN "
                              "with weights", params=("checkpoint", "model", "weights"))
        if self.model is None:
            for key in ("weights", "mean", "std", "input_shape"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{key} belongs to model; a checkpoint records it",
                                      params=(key, "model"))
            return None
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give mean and std together", params=("mean", "std"))
        return {"model": self.model, "weights": self.weights, "input_shape": self.input_shape,
                "mean": self.mean, "std": self.std, "points": points}

    def load(self, device: torch.device, points: list[str] | None = None) -> Analysis:
        """Model, examples and threat model (:func:`load_for_analysis`)."""
        return load_for_analysis(
            self.checkpoint, device=device, which=self.which, arch=self.arch,
            dataset=self.dataset, data_dir=self.data_dir, split=self.split,
            n_examples=self.n_examples, eps=self.eps, norm=self.norm,
            step_size=self.step_size, unsafe_load=self.unsafe_load,
            external=self.external(points))


@dataclass
class EvalRequest(CheckpointRequest):
    """An evaluation of a checkpoint: ``robust-amo eval``'s flags as fields (docs/evaluation.md).

    Besides :class:`CheckpointRequest`'s fields:

    Attributes:
        attacks: names such as ``pgd20``, ``pgd50``, ``autoattack`` (default ``["pgd50"]``;
            ``clean`` is always reported).
        step_size: the PGD step (default eps / 4: :func:`~robust_amo.evaluation.attacks.
            eval_step_size`, never the training attack's).
        restarts: PGD restarts (None: 10 for pgd50, else 1). loss: ``ce`` or ``cw``.
        aa_attacks: the attacks of ``autoattack-custom``. aa_backend: AutoAttack package.
        out: report .json path (None: RUN/eval/report.json); .md and pictures beside it.
        resume: continue an interrupted evaluation from its state file.
        bf16: PGD forward passes under bf16 autocast on CUDA (flagged in the report).
        tolerance: PGD/AutoAttack disagreement flagged above it (default 0.03).
        format: ``robustbench`` also writes the fields of a RobustBench model-info entry.
        sanity: run the large-eps gradient-masking check (the other checks always run).
        individual: AutoAttack also runs each of its attacks on every clean-correct example
            and the report gives each one's robust accuracy alone (AutoAttack's
            ``run_standard_evaluation_individual``) beside the cumulative curve; the
            AutoAttack result is then the intersection of the individual ones.
        save_adv: an ``.npz`` path for the worst-case adversarial examples and the attack
            that found each (:func:`~robust_amo.evaluation.report.write_adversarial`; loads
            with ``numpy.load(allow_pickle=False)``); an existing file is refused unless
            ``overwrite``.
    """

    attacks: list[str] = field(default_factory=lambda: ["pgd50"])
    restarts: int | None = None
    loss: AttackLoss = "ce"
    aa_attacks: list[str] = field(default_factory=list)
    aa_backend: str | None = None
    out: str | None = None
    resume: bool = False
    bf16: bool = False
    tolerance: str | float = DEFAULT_TOLERANCE
    format: ReportFormat = "robust-amo"
    sanity: bool = True
    individual: bool = False
    save_adv: str | None = None

    def check(self) -> float:
        """Validate the fields that need no file; the tolerance as a float.

        Raises:
            ConfigError: naming the field.
        """
        _check_attack_counts(self.batch_size, self.n_examples, self.restarts, self.seed)
        check_choice("format", self.format, ReportFormat)
        names = self.attack_names()
        if self.format == "robustbench" and "autoattack" not in names:
            raise ConfigError("format robustbench needs the standard AutoAttack: add "
                              "attacks autoattack", params=("format", "attacks"))
        tolerance = parse_float(self.tolerance, "tolerance")
        if tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0, got {tolerance}", params=("tolerance",))
        return tolerance

    def attack_names(self) -> list[str]:
        """The attack names, stripped (default ``["pgd50"]``).

        Raises:
            ConfigError: a name given twice.
        """
        names = [a.strip() for a in self.attacks if a.strip()] or ["pgd50"]
        dup = {a for a in names if names.count(a) > 1}
        if dup:
            raise ConfigError(f"attacks {sorted(dup)[0]} given twice", params=("attacks",))
        return names


def attack_specs(names: list[str], *, eps: float, norm: Norm, step_size: float | None,
                 restarts: int | None, loss: AttackLoss, seed: int,
                 aa_attacks: tuple[str, ...] = (), aa_backend: str | None = None,
                 individual: bool = False) -> list[EvalAttack]:
    """The attacks of ``names`` (:func:`parse_attack`), ``clean`` first when not named."""
    specs = [parse_attack(n, eps=eps, norm=norm, step_size=step_size, restarts=restarts,
                          loss=loss, seed=seed, aa_attacks=aa_attacks, aa_backend=aa_backend,
                          individual=individual)
             for n in names]
    if not any(s.kind == "clean" for s in specs):
        specs.insert(0, parse_attack("clean", eps=eps))
    if individual and not any(s.kind == "autoattack" for s in specs):
        log.warning("individual applies to AutoAttack's attacks, and none is asked for; each "
                    "other attack is already reported on its own beside the worst case")
    return specs


def _run(model: nn.Module, meta: dict[str, Any], data: EvalData, specs: list[EvalAttack], *,
         norm: Norm, eps: float, seed: int, batch_size: int, device: torch.device, bf16: bool,
         sanity: bool, tolerance: float, state_path: Path | None, resume: bool, progress: bool,
         t_start: float, save_adv: Path | None = None) -> Report:
    """Attack, check and report (the part every evaluation shares); with ``save_adv``, rank 0
    also writes the worst-case adversarial examples there."""
    if bf16 and device.type != "cuda":
        log.warning("bf16 has no effect on %s: evaluating in float32", device)
    bf16 = bf16 and device.type == "cuda"
    if distributed.is_main():  # every rank runs this; one says it
        log.info("evaluating %s on %d %s examples of %s (%s eps %s) on %s: %s", meta["arch"],
                 len(data.y), data.split, data.dataset, norm, number_text(eps), device,
                 ", ".join(s.name for s in specs))
    outcomes = evaluate_attacks(
        model, data.x, data.y, specs, batch_size=batch_size, device=device,
        state_path=state_path, resume=resume, bf16=bf16, progress=progress,
        fingerprint={"split": data.split, "dataset": data.dataset}, keep_adv=save_adv is not None)
    if save_adv is not None and distributed.is_main():
        _save_adversarial(model, data, outcomes, save_adv, norm=norm, eps=eps,
                          batch_size=batch_size, device=device)
    clean_acc = int(outcomes[0].clean.sum()) / len(data.y)
    finite = finite_logits(model, data.x, batch_size=batch_size, device=device)
    large = None
    if sanity:
        large = large_eps_accuracy(model, data.x, data.y, norm, batch_size=batch_size,
                                   device=device, seed=seed)
    checks = sanity_checks(clean_acc, outcomes, large_eps=large, tolerance=tolerance,
                           finite=finite)
    return build_report(outcomes=outcomes, model_meta=meta, dataset=data.dataset,
                        split=data.split, norm=norm, eps=eps, seed=seed, device=str(device),
                        bf16=bf16, wall_time_s=time.perf_counter() - t_start, checks=checks,
                        data_dir=data.data_dir, selected_on=selection_of(meta))


def _save_adversarial(model: nn.Module, data: EvalData, outcomes: list[AttackOutcome],
                      path: Path, *, norm: Norm, eps: float, batch_size: int,
                      device: torch.device) -> None:
    """Write the worst-case adversarial examples (:func:`write_adversarial`) with the model's
    prediction at each (a forward pass over them, not counted as an attack's)."""
    x_adv, found = worst_case_examples(outcomes, data.x, data.y)
    with torch.no_grad(), eval_mode(model):
        pred = torch.cat([model(x_adv[sl].to(device)).argmax(1).cpu()
                          for sl in chunks(len(x_adv), batch_size)] or [torch.zeros(0).long()])
    kept = [i for i, f in enumerate(found) if f not in ("", "clean") and pred[i] == data.y[i]]
    if kept:  # a point an attack reported as broken that the model classifies correctly
        log.warning("%d saved adversarial examples are classified correctly when evaluated "
                    "again (first: example %d, found by %s)", len(kept), kept[0],
                    found[kept[0]])
    write_adversarial(path, x_adv, data.y, found, pred, eps=eps, norm=norm,
                      attacks=[o.spec.name for o in outcomes])
    log.info("worst-case adversarial examples written to %s (%d examples: %d broken by an "
             "attack, %d misclassified clean, %d robust)", path, len(found),
             sum(1 for f in found if f not in ("", "clean")),
             sum(1 for f in found if f == "clean"), sum(1 for f in found if not f))


def _adv_target(path: str | Path | None, overwrite: bool) -> Path | None:
    """The ``save_adv`` path, checked before any attack runs: an ``.npz`` in a writable
    folder, and no existing file unless ``overwrite``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.suffix != ".npz":
        raise ConfigError(f"save_adv must name a .npz file, got {path}", params=("save_adv",))
    writable_dir(p.parent, "save_adv")
    refuse_overwrite(p.parent, [p.name], "file of adversarial examples", overwrite=overwrite,
                     ways="replace it (overwrite) or choose another file (save_adv)",
                     params=("overwrite", "save_adv"))
    return p


def selection_of(meta: dict[str, Any]) -> str | None:
    """What chose a ``best.pt`` (issue 20): the split of its run's per-epoch check, read from
    the run's config in the checkpoint (:func:`robust_amo.config.check_split_of`).

    Returns:
        ``"the val split (held-out training examples)"`` or a ``"the test split ..."`` text
        that says the file's test accuracy is optimistic; None for other files
        (``checkpoint.pt`` is the last epoch, chosen by nothing) and for models without a run's
        config (your own model, robustness checkpoints).
    """
    if Path(str(meta.get("path", ""))).name != BEST:
        return None
    cfg = meta.get("config") or {}
    ev, data = cfg.get("eval"), cfg.get("data")
    if not isinstance(ev, dict) or not isinstance(data, dict):
        return None
    split = check_split_of(ev.get("split", "auto"), data.get("val_size", 0))
    if split == "val":
        return "the val split (held-out training examples)"
    return ("the test split, so its test accuracy here is optimistic (selection on the test "
            "set, Rice et al. 2020)")


def _write(report: Report, out: Path, robustbench: bool) -> None:
    json_path, md_path = write_report(report, out)
    log.info("report written to %s and %s", json_path, md_path)
    if robustbench:
        rb = robustbench_path(out)
        atomic_write(rb, json.dumps(robustbench_entry(report), indent=2) + "\n")
        log.info("RobustBench entry written to %s (fill link, name, authors, venue, reported, "
                 "additional_data)", rb)
    for c in report.sanity_checks:
        if not c.passed:
            log.warning("sanity check %s flagged: %s", c.name, c.detail)
    log.info("done: clean accuracy %.2f%%, robust accuracy %.2f%% (worst case over %s) of %d "
             "examples; sanity checks %s", 100 * report.clean_accuracy,
             100 * report.robust_accuracy, ", ".join(report.robust_accuracies()) or "no attack",
             report.n_examples, "ok" if report.sanity_ok else "FLAGGED")


def run_evaluation(request: EvalRequest, ctx: DistContext, device: torch.device) -> Report:
    """:func:`evaluate_checkpoint` inside a process group the caller has joined (``ctx``).

    Every rank attacks its share of the chunks and ends with the same report; rank 0 writes it.
    """
    tolerance = request.check()
    names = request.attack_names()
    t_start = time.perf_counter()
    a = request.load(device)
    model, meta, data = a.model, a.meta, a.data
    meta["weights_sha256"] = model_digest(model)
    aa_attacks = tuple(x.strip() for x in request.aa_attacks if x.strip())
    # eval's own step default (eps / 4), not the training attack's that a.threat holds
    step = parse_float(request.step_size, "step_size") if request.step_size is not None else None
    specs = attack_specs(names, eps=a.threat.eps, norm=a.threat.norm, step_size=step,
                         restarts=request.restarts, loss=request.loss, seed=request.seed,
                         aa_attacks=aa_attacks, aa_backend=request.aa_backend,
                         individual=request.individual)
    out = Path(request.out) if request.out else Path(meta["path"]).parent / "eval" / "report.json"
    if ctx.is_main:
        writable_dir(out.parent)
        # an overwrite replaces all of them (write_report removes the old ones first)
        refuse_overwrite(out.parent, [f.name for f in report_outputs(out)], "report",
                         overwrite=request.overwrite)
    adv = _adv_target(request.save_adv, request.overwrite) if ctx.is_main else (
        Path(request.save_adv) if request.save_adv else None)
    state = state_path(out)
    report = _run(model, meta, data, specs, norm=a.threat.norm, eps=a.threat.eps,
                  seed=request.seed, batch_size=request.batch_size, device=device,
                  bf16=request.bf16, sanity=request.sanity, tolerance=tolerance,
                  state_path=state, resume=request.resume, progress=request.progress,
                  t_start=t_start, save_adv=adv)
    sharding.state_file(state).unlink(missing_ok=True)
    if ctx.is_main:  # every rank holds the same report; rank 0 writes it
        _write(report, out, request.format == "robustbench")
    return report


def evaluate_checkpoint(request: EvalRequest | dict[str, Any]) -> Report:
    """Evaluate a checkpoint: ``robust-amo eval`` as a call (sharded under torchrun).

    Args:
        request: an :class:`EvalRequest` or its :meth:`~EvalRequest.to_dict` form.

    Returns:
        The :class:`Report` (also written to ``request.out``, default RUN/eval/report.json).

    Raises:
        RobustAmoError: bad fields, data or checkpoint, with the fix in the message.
    """
    if isinstance(request, dict):
        request = EvalRequest.from_dict(request)
    with distributed.session(resolve_device(request.device)) as (ctx, device):
        return run_evaluation(request, ctx, device)


def evaluate(
    model: nn.Module,
    *,
    dataset: str,
    eps: float,
    norm: Norm = "linf",
    attacks: tuple[str, ...] | list[str] = ("pgd50", "autoattack"),
    n_examples: int | None = 1000,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    data_dir: str | None = None,
    split: SplitName = "test",
    device: torch.device | str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    step_size: float | None = None,
    restarts: int | None = None,
    loss: AttackLoss = "ce",
    sanity: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    out: str | Path | None = None,
    progress: bool = False,
    individual: bool = False,
    save_adv: str | Path | None = None,
    overwrite: bool = False,
) -> Report:
    """Robust accuracy of any classifier in one call (the spirit of RobustBench's ``benchmark``).

    The same protocol as ``robust-amo eval`` (docs/evaluation.md): per-example worst case over
    ``attacks``, clean accuracy, the sanity checks; on the same examples, seed and attacks the
    per-example masks equal the command's.

    Args:
        model: an ``nn.Module`` mapping (B, C, H, W) images in [0, 1] to logits (B, classes);
            with ``mean``/``std`` it is fed ``(x − mean) / std`` (the wrapper of ``--model``), so
            the attacks still work in [0, 1].
        dataset: a registered dataset (``digits``, ``mnist``, ``cifar10``, ...).
        eps: radius in [0, 1] pixel units (8/255 for CIFAR-10 L∞).
        norm: ``"linf"`` (default) or ``"l2"``.
        attacks: attack names (default ``("pgd50", "autoattack")``; AutoAttack needs its
            package); ``clean`` is always reported.
        n_examples: the first N examples of the split (default 1000; None: all).
        mean, std: per-channel normalisation the model expects (default: none).
        data_dir: where the dataset lies (default: its usual place).
        split: ``"test"`` (default) or ``"train"``.
        device: where to evaluate (default: the model's).
        batch_size: examples per batch (default 256). seed: of the random starts (default 0).
        step_size: PGD step (default eps / 4). restarts: PGD restarts (default: 10 for pgd50,
            else 1). loss: ``"ce"`` (default) or ``"cw"``.
        sanity: run the large-eps gradient-masking check (default True).
        tolerance: PGD/AutoAttack disagreement flagged above it (default 0.03).
        out: a report .json path to write with its .md (default None: nothing is written).
        progress: progress bars (default False).
        individual: AutoAttack's attacks each on every clean-correct example, each one's
            robust accuracy in ``report.attacks[NAME].individual`` (default False).
        save_adv: an ``.npz`` path for the worst-case adversarial examples and the attack
            that found each (default None: not written); an existing file is refused unless
            ``overwrite`` (default False).

    Returns:
        The :class:`Report`: ``report.clean_accuracy``, ``report.robust_accuracy``,
        ``report.attacks["pgd50"].robust_accuracy``, ...

    Raises:
        RobustAmoError: a bad value, or data that cannot be found, with the fix in the message.
    """
    t_start = time.perf_counter()
    _check_attack_counts(batch_size, n_examples, restarts, seed)
    eps = parse_float(eps, "eps")
    if (mean is None) != (std is None):
        raise ConfigError("give mean and std together", params=("mean", "std"))
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device)
    info = dataset_info(dataset, data_dir)
    if mean is not None:
        model = ExternalModel(model, int(info.input_shape[0]), mean, std,
                              arch=type(model).__name__)
    model = model.to(device)
    meta: dict[str, Any] = {
        "path": None, "format": "module", "arch": getattr(model, "arch", type(model).__name__),
        "dataset": dataset, "method": None, "epoch": None, "num_classes": info.num_classes,
        "input_shape": list(info.input_shape), "class_names": None, "config": {},
        "normalization": {"mean": mean, "std": std}, "robust_amo_version": None}
    data = load_eval_data(meta, split=split, n_examples=n_examples, data_dir=data_dir)
    check_differentiable(model, meta, data.x)
    meta["weights_sha256"] = model_digest(model)
    specs = attack_specs(list(attacks), eps=eps, norm=norm,
                         step_size=step_size, restarts=restarts, loss=loss, seed=seed,
                         individual=individual)
    target = Path(out) if out is not None else None
    if target is not None:
        writable_dir(target.parent)
    adv = _adv_target(save_adv, overwrite)
    report = _run(model, meta, data, specs, norm=norm, eps=eps, seed=seed,
                  batch_size=batch_size, device=device, bf16=False, sanity=sanity,
                  tolerance=float(tolerance), state_path=None, resume=False, progress=progress,
                  t_start=t_start, save_adv=adv)
    if target is not None:
        _write(report, target, robustbench=False)
    return report


@dataclass
class MarginsRequest(CheckpointRequest):
    """The margins of a checkpoint: ``robust-amo margins``'s flags as fields (docs/margins.md).

    Besides :class:`CheckpointRequest`'s fields (``step_size`` defaults to the training
    attack's: the neighbourhood is the training attack's):

    Attributes:
        pgd_steps: PGD iterations of the neighbourhood (default 10). restarts: its restarts.
        adv: the adversarial all-layer margin and κ_adv (default True).
        input_margin: the L2 input margin (default True).
        attack_steps, rounds, rtol: the margin searches (:class:`SearchOptions`).
        points: ``model``'s perturbation points (module names; default its own or the rule).
        out: output folder (None: <run folder>/margins). plots: also the three PNGs.
    """

    n_examples: int | None = 256
    batch_size: int = 128
    pgd_steps: int = 10
    restarts: int = 1
    adv: bool = True
    input_margin: bool = True
    attack_steps: int = 20
    rounds: int = 10
    rtol: str | float = 0.01
    points: list[str] | None = None
    out: str | None = None
    plots: bool = True


def measure_checkpoint(request: MarginsRequest | dict[str, Any]) -> MarginsResult:
    """Load a checkpoint, measure its margins (:func:`robust_amo.margins.measure`) and write
    margins.csv, summary.json and the plots.

    Raises:
        RobustAmoError: bad fields, data or checkpoint, with the fix in the message.
    """
    if isinstance(request, dict):
        request = MarginsRequest.from_dict(request)
    r = request
    for key in ("n_examples", "batch_size", "pgd_steps", "restarts", "attack_steps", "rounds"):
        check_at_least(key, getattr(r, key))
    check_int("seed", r.seed)
    rtol = parse_float(r.rtol, "rtol")
    if rtol < 0:
        raise ConfigError(f"rtol must be >= 0, got {rtol}", params=("rtol",))
    if r.points and r.model is None:
        raise ConfigError("points belongs to model; a checkpoint's model declares its own",
                          params=("points", "model"))
    r.external(r.points)
    out = writable_dir(r.out if r.out else _margins_out(r.checkpoint or r.weights or "."))
    refuse_overwrite(out, [CSV, SUMMARY], "margins report",
                     overwrite=r.overwrite)
    device = resolve_device(r.device)
    a = r.load(device, r.points)
    if r.n_examples is not None and len(a.data.y) < r.n_examples:
        log.warning("the %s split has only %d examples; using all of them", r.split,
                    len(a.data.y))
    threat = a.threat.replace(steps=r.pgd_steps, random_start=True) if r.adv else None
    settings = {"checkpoint": str(r.checkpoint or r.weights), "model": r.model,
                "which": r.which, "arch": a.meta["arch"], "dataset": a.data.dataset,
                "split": r.split, "n_examples": len(a.data.y)}
    result = measure(a.model, a.data.x, a.data.y, threat, restarts=r.restarts, seed=r.seed,
                     search=SearchOptions(steps=r.attack_steps, rounds=r.rounds, rtol=rtol),
                     input_margin=r.input_margin, batch_size=r.batch_size, device=device,
                     progress=r.progress, settings=settings)
    result.write(out, plots=r.plots)
    log.info("margins of %d examples written to %s (clean accuracy %.3f)", len(a.data.y), out,
             result.summary["clean_accuracy"])
    return result


def _margins_out(checkpoint: str) -> Path:
    p = Path(checkpoint).expanduser()
    return (p if p.is_dir() else p.parent) / "margins"
