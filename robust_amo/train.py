"""The native training loop: standard, Madry PGD and every registered method, top to bottom.

``train(cfg)`` builds data, model, optimiser, schedule and the method's objective, then for every
epoch: one pass over the shuffled (and augmented) training set, a clean and PGD accuracy check on
held-out examples, one JSON line of metrics, and an atomic checkpoint. A killed run restarts with
``resume=True`` from its last checkpoint and ends with the weights an uninterrupted run would have:
every epoch's batch order, augmentation and attack starts depend only on ``(seed, epoch)``
(each stream seeded through :func:`robust_amo.runtime.derive_seed`).

The run folder's files and checks are :mod:`robust_amo.runs`'; a checked config comes from
:func:`robust_amo.resolve.resolve`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from . import distributed
from .attacks import PGD, AttackFn
from .compiled import CompiledModel, probe
from .config import LrExtension, OptimConfig, TrainConfig, check_choice, check_split_of
from .curves import write_curves
from .data import (
    DatasetInfo,
    Examples,
    Loader,
    check_split_version,
    dataset_info,
    held_out_size,
    load_dataset,
    require_examples,
    take_subset,
    training_splits,
)
from .errors import CheckpointError, ConfigError, RobustAmoError
from .methods import EpochAware, build_objective, method_spec
from .models import ExternalModel, build_external, create_model
from .perturb import compiled_hook
from .resolve import check_names
from .runs import LOCK, RESUME_ADVICE, RESUME_ADVICE_PARAMS, RunDir
from .runtime import Amp, amp_factory, check_stop, derive_seed, eval_mode, resolve_device
from .tblog import TensorBoardLog

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


class LRSchedule:
    """The learning-rate multiplier per iteration: warmup, then multistep, cosine or constant.

    Milestones are in epochs (as in the papers), applied at the first iteration of that epoch.
    The schedule is planned for the run's ``epochs`` when it starts and keeps that plan:
    resuming with more epochs appends a segment (:meth:`extend`) in which the added epochs
    either keep the last rate (``final``) or run the whole schedule again (``restart``), never
    a silent jump of a stretched schedule. Its attributes are plain data, so ``LambdaLR``'s
    state dict (and so the checkpoint) carries the plan.

    Attributes:
        segments: ``[first_epoch, end_epoch, how]`` per part of the run: ``"plan"`` for the
            schedule as configured, then one entry per extension.
    """

    def __init__(self, optim: OptimConfig, epochs: int, steps_per_epoch: int) -> None:
        self.schedule = optim.schedule
        self.milestones = list(optim.milestones)
        self.gammas = (list(optim.gamma) if isinstance(optim.gamma, list)
                       else [optim.gamma] * len(optim.milestones))
        self.warmup_epochs = optim.warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.segments: list[list[Any]] = [[0, epochs, "plan"]]

    @property
    def planned_epochs(self) -> int:
        """The epochs the schedule covers (its plan and every extension)."""
        return int(self.segments[-1][1])

    def extend(self, epochs: int, how: LrExtension) -> None:
        """Schedule the epochs past :attr:`planned_epochs` up to ``epochs``: ``final`` keeps
        the rate the schedule ends with, ``restart`` runs it again over the added epochs."""
        if epochs > self.planned_epochs:
            self.segments.append([self.planned_epochs, epochs, how])

    def __call__(self, it: int) -> float:
        spe = self.steps_per_epoch
        i = max(j for j, seg in enumerate(self.segments) if it >= seg[0] * spe)
        return self._at(i, it)

    def _at(self, i: int, it: int) -> float:
        start, end, how = self.segments[i]
        if how == "final":  # the previous segment's rate at its end, where this one starts
            return self._at(i - 1, start * self.steps_per_epoch)
        return self._base(it - start * self.steps_per_epoch, end - start)

    def _base(self, it: int, epochs: int) -> float:
        """The configured schedule over ``epochs`` epochs, at iteration ``it`` of it."""
        spe = self.steps_per_epoch
        t = it / spe  # epochs done, fractional
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            return (it + 1) / (self.warmup_epochs * spe)
        if self.schedule == "multistep":
            return math.prod((g for m, g in zip(self.milestones, self.gammas, strict=True)
                              if it >= m * spe), start=1.0)
        if self.schedule == "cosine":
            total = max(epochs - self.warmup_epochs, 1e-9)
            return 0.5 * (1 + math.cos(math.pi * min((t - self.warmup_epochs) / total, 1.0)))
        return 1.0


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    """The learning-rate multiplier per iteration of a run of ``cfg`` (:class:`LRSchedule`)."""
    return LRSchedule(cfg.optim, cfg.epochs, steps_per_epoch)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                   ) -> torch.optim.SGD:
    """SGD with momentum/Nesterov; weight decay on every parameter (as in the papers' code)."""
    o = cfg.optim
    kw: dict[str, Any] = {}
    if o.fused and device.type == "cuda":
        kw["fused"] = True
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay,
                           **kw)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: AttackFn | None,
    amp: Amp = contextlib.nullcontext,
    *,
    reduce_ranks: bool = False,
) -> dict[str, float]:
    """Clean accuracy and accuracy under ``attack`` (eval mode, model mode restored).

    Args:
        reduce_ranks: each rank of the process group passes its shard of the examples and the
            counts are summed over ranks (every rank must call this then).

    Returns:
        ``{"clean_acc", "robust_acc", "n"}``; robust_acc is NaN without an attack, both are NaN
        without examples.
    """
    # counted on the device, read once at the end: no host sync per batch
    counts = torch.zeros(3, dtype=torch.long, device=next(model.parameters()).device)
    with eval_mode(model):
        for x, y in loader:
            with amp():
                clean = _correct(model, x, y)
                counts[0] += clean.sum()
                if attack is not None:
                    # robust means correct on x and at the attack's point (docs/algorithms.md,
                    # Evaluation): the attack starts from a random point, never from x itself
                    counts[1] += (clean & _correct(model, attack(x, y), y)).sum()
            counts[2] += len(y)
    if reduce_ranks:
        distributed.all_reduce_sum(counts)
    clean, robust, n = counts.tolist()
    nan = float("nan")  # nothing measured (no examples, or no attack): never a best checkpoint
    return {"clean_acc": clean / n if n else nan,
            "robust_acc": robust / n if n and attack is not None else nan, "n": n}


def train_step(
    model: nn.Module,
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Amp = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: the method's objective (its attack included), backward, update.

    Nothing here waits for the device (no ``.item()``, no data-dependent branch), so the host
    queues the next batch's work while the GPU computes. The benchmarks in bench/ time exactly
    this function.

    Returns:
        ``(loss, logits)``, detached.
    """
    with amp():
        loss, logits = objective(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@dataclass
class _Session:
    """What one :func:`train` call works with, in every part of the loop."""

    cfg: TrainConfig
    ctx: distributed.DistContext
    device: torch.device
    run: RunDir
    resume: bool
    overwrite: bool
    unsafe_load: bool
    progress: bool
    callbacks: list[EpochCallback]
    lr_extension: LrExtension = "final"


@dataclass
class TrainData:
    """The training set's loader and the per-epoch check's examples, on the device."""

    info: DatasetInfo
    train_split: Examples
    eval_split: Examples
    loader: Loader
    eval_loader: Loader
    check_split: str = "val"


@dataclass
class Optimisation:
    """The plain model (whose weights checkpoints hold), its optimiser and schedule."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: Amp
    channels_last: bool


@dataclass
class Method:
    """The forward the attacks call, the one the optimiser steps through (DDP-wrapped), the
    method's objective and the two attack generators reseeded per epoch."""

    fwd: nn.Module
    model: nn.Module
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
    method_gen: torch.Generator
    eval_attack: PGD
    eval_gen: torch.Generator


CO_FLAG = "catastrophic_overfitting"
"""Metrics key: true on the line of the check where the guard found the collapse."""
CO_EPOCH = "catastrophic_overfitting_epoch"
"""Metrics key: the epoch of that check, on its line and on every later line of the run."""


@dataclass
class OverfitGuard:
    """The catastrophic-overfitting guard of the per-epoch check (docs/methods.md).

    Fast adversarial training can collapse within an epoch: the training attack stops finding
    adversarial points, robust accuracy under PGD falls towards 0 while clean accuracy jumps
    (Wong, Rice & Kolter 2020; de Jorge et al. 2022). A check is a collapse when
    its robust accuracy r and clean accuracy c against the previous check's (r₀, c₀) satisfy
    r₀ − r > ``drop``·r₀ and c > c₀. The first collapse of a run is flagged (``CO_FLAG`` on its
    line, ``CO_EPOCH`` on its line and all later ones); later ones are not.

    Attributes:
        drop: the relative drop of robust accuracy that counts (``eval.co_drop``; 0: off).
        last: (clean, robust) of the previous check, or None before the first.
        fired: the epoch of the collapse found, or None.
    """

    drop: float
    last: tuple[float, float] | None = None
    fired: int | None = None

    @classmethod
    def from_rows(cls, drop: float, rows: Iterable[dict[str, Any]]) -> OverfitGuard:
        """The guard after the metrics rows of the epochs done (a resumed run's history), so
        that it compares the next check with the last one and does not flag a collapse again.
        """
        guard = cls(drop)
        for row in rows:
            if isinstance(row.get(CO_EPOCH), int):
                guard.fired = row[CO_EPOCH]
            guard.last = _check_of(row) or guard.last
        return guard

    def observe(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Compare this epoch's check (if it has one) with the previous one; add the guard's
        keys to ``metrics``.

        Args:
            epoch: the epoch number of the line (1-based, as in metrics.jsonl).
            metrics: the epoch's metrics line, changed in place.

        Returns:
            whether this check is the run's first collapse (the caller warns once).
        """
        now = _check_of(metrics)
        collapsed = False
        if now is not None and self.last is not None and self.fired is None and self.drop > 0:
            (clean0, robust0), (clean, robust) = self.last, now
            collapsed = robust0 - robust > self.drop * robust0 and clean > clean0
            if collapsed:
                self.fired = epoch
                metrics[CO_FLAG] = True
        if now is not None:
            self.last = now
        if self.fired is not None:
            metrics[CO_EPOCH] = self.fired
        return collapsed


def _check_of(row: dict[str, Any]) -> tuple[float, float] | None:
    """(clean, robust) accuracy of a metrics row's check, None without a finite one."""
    clean, robust = row.get("clean_acc"), row.get("robust_acc")
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (clean, robust)):
        return float(clean), float(robust)
    return None


@dataclass
class Progress:
    """Where the run stands: epochs done, best robust accuracy, the last epoch's metrics, the
    catastrophic-overfitting guard."""

    start_epoch: int = 0
    best: float = -1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    guard: OverfitGuard = field(default_factory=lambda: OverfitGuard(0.0))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    unsafe_load: bool = False,
    progress: bool = False,
    callbacks: list[EpochCallback] | None = None,
    lr_extension: LrExtension = "final",
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``cfg.dataset`` with ``cfg.method``; see the module docstring.

    Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set) every process runs this function: the
    model is wrapped in DistributedDataParallel, ``cfg.batch_size`` is the global batch split
    evenly over the ranks, metrics are summed over ranks, and rank 0 alone writes files
    (``robust_amo.distributed``).

    Args:
        cfg: the resolved configuration (:func:`robust_amo.resolve.resolve`).
        resume: continue from ``cfg.out/checkpoint.pt`` when it exists (also with another
            number of processes than the run that wrote it); the resolved config must equal
            the checkpoint's but for :data:`robust_amo.runs.RESUME_FREE` keys.
        overwrite: start over in a folder that holds a run (its checkpoints and metrics are
            deleted); without it, or ``resume``, such a folder is refused
            (:data:`robust_amo.runs.RUN_FILES`).
        unsafe_load: read a checkpoint that needs full unpickling (runs code from the file).
        progress: show tqdm progress bars (the CLI turns them on; rank 0 only).
        callbacks: called as ``cb(epoch, metrics)`` after each epoch's checkpoint is written, on
            every rank with the same (reduced) metrics; guard file writes with
            ``robust_amo.distributed.is_main()``.
        lr_extension: resuming with more epochs than the learning-rate schedule was planned
            for: ``"final"`` (default) keeps its last rate, with a warning; ``"restart"`` runs
            it again over the added epochs (:class:`LRSchedule`).

    Raises:
        ConfigError: among others, a new run whose per-epoch check would fall on the test
            split without ``eval.split: test``, or an unknown ``lr_extension``.

    Returns:
        the last epoch's metrics (also the last line of ``metrics.jsonl``).
    """
    check_choice("lr_extension", lr_extension, LrExtension)
    run = RunDir(cfg.out)
    fresh = not run.path.exists()
    try:
        with distributed.session(resolve_device(cfg.device)) as (ctx, device), \
                contextlib.ExitStack() as stack:
            if ctx.is_main:  # one writer per run folder: a second train into it is refused
                stack.enter_context(run.lock())
            return _train(_Session(cfg, ctx, device, run, resume, overwrite, unsafe_load,
                                   progress, callbacks or [], lr_extension))
    except BaseException:
        if fresh:
            _remove_empty_run(run)
        raise


def _remove_empty_run(run: RunDir) -> None:
    """Remove the folder a failed run created if it holds nothing but the lock file: a run
    that could not even load its data must not leave a folder behind (a rerun would find it)."""
    with contextlib.suppress(OSError):
        if {p.name for p in run.path.iterdir()} <= {LOCK}:
            (run.path / LOCK).unlink(missing_ok=True)
            run.path.rmdir()


def _train(s: _Session) -> dict[str, Any]:
    cfg, ctx = s.cfg, s.ctx
    check_names(cfg)  # a config built by hand: reject unknown names before any work
    local_batch = distributed.per_rank_batch(cfg.batch_size, ctx)
    if ctx.is_main:
        s.run.prepare(resume=s.resume, overwrite=s.overwrite)
    # weight init and dropout only; attacks and methods use their own generators
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    ck = _read_last(s)
    s.cfg, data = _build_data(s, ck, local_batch)
    cfg = s.cfg
    opt = _build_model_and_optimiser(s, data)
    state = _start(s, opt, ck)
    method = _build_method(s, data, opt, state.start_epoch)

    tb = TensorBoardLog(s.run.path, cfg.to_dict()) if cfg.logging.tensorboard and ctx.is_main \
        else None
    if ctx.is_main:
        log.info("training %s on %s with %s for %d epochs on %s x %d (%d train examples; the "
                 "per-epoch check and best.pt: %d %s examples; global batch %d)",
                 cfg.model or cfg.arch, cfg.dataset, cfg.method, cfg.epochs, s.device,
                 ctx.world_size, len(data.train_split), len(data.eval_split),
                 _SPLIT_WORDS[data.check_split], cfg.batch_size)
    for epoch in range(state.start_epoch, cfg.epochs):
        metrics = _run_epoch(s, epoch, data, opt, method, tb)
        _check_and_checkpoint(s, epoch, metrics, state, data, opt, method, tb)
        distributed.barrier()  # the checkpoint exists before any rank goes on
        for cb in s.callbacks:
            cb(epoch + 1, state.metrics)
    if tb is not None:
        tb.close()
    if ctx.is_main:
        write_curves(s.run.path)  # RUN/curves.png: loss, accuracy and learning rate per epoch
    return state.metrics


def _build_data(s: _Session, ck: dict[str, Any] | None, local_batch: int
                ) -> tuple[TrainConfig, TrainData]:
    """Subset, held-out split, loaders that keep the uint8 set on the device; each rank takes
    its share of every global batch and whole batches of the evaluation examples.

    Returns:
        the config with ``data.val_size`` a count (:func:`_held_out`), and the data.
    """
    cfg, ctx, device = s.cfg, s.ctx, s.device
    info = dataset_info(cfg.dataset, cfg.data.data_dir, cfg.data.image_size)
    train_split, test_split = load_dataset(cfg.dataset, cfg.data.data_dir, cfg.data.download,
                                           cfg.data.image_size)
    pool = len(take_subset(train_split, cfg.data.train_subset, cfg.data.subset_seed))
    cfg = _held_out(s, ck, pool)
    train_split, val_split = training_splits(
        train_split, train_subset=cfg.data.train_subset, subset_seed=cfg.data.subset_seed,
        val_size=cfg.data.val_size, seed=cfg.seed, check_split=cfg.eval.split)
    check_split = check_split_of(cfg.eval.split, cfg.data.val_size)
    eval_split = val_split if check_split == "val" else test_split
    if cfg.eval.n_examples > 0:
        require_examples(eval_split, "the per-epoch check")
    eval_split = eval_split.subset(torch.arange(min(cfg.eval.n_examples, len(eval_split))))
    loader = Loader(train_split, local_batch, device, shuffle=True, augment=cfg.data.augment,
                    seed=cfg.seed, drop_last=len(train_split) > cfg.batch_size,
                    rank=ctx.rank, world_size=ctx.world_size)
    eval_shard = distributed.shard_batches(len(eval_split), cfg.eval.batch_size, ctx.rank,
                                           ctx.world_size)
    eval_loader = Loader(eval_split.subset(eval_shard), cfg.eval.batch_size, device)
    return cfg, TrainData(info, train_split, eval_split, loader, eval_loader, check_split)


_SPLIT_WORDS = {"val": "held-out training (val)", "test": "TEST-split"}


def _read_last(s: _Session) -> dict[str, Any] | None:
    """The run's last checkpoint when resuming (None for a new run, or a resume that finds
    none yet); read before the data, since its config settles the held-out part."""
    if not s.resume:
        return None
    path = s.run.last
    if not path.exists():
        log.warning("resume: no checkpoint in %s yet, starting from scratch", s.run.path)
        return None
    return ckpt_io.load_native(path, unsafe_load=s.unsafe_load, advice=RESUME_ADVICE,
                               advice_params=RESUME_ADVICE_PARAMS)


def _held_out(s: _Session, ck: dict[str, Any] | None, n_train: int) -> TrainConfig:
    """The config with ``data.val_size: auto`` resolved to a count, and the check's split
    refused or announced when it is the test split.

    ``auto`` is 10% of the training examples (at most 1000; none under ``eval.split: test``,
    :func:`robust_amo.data.held_out_size`) for a new run, and the count the run recorded for a
    resumed one: a run started before ``auto`` was the default recorded 0 and, with
    ``eval.split: auto``, checked on the test split, and it goes on doing so.
    """
    cfg = s.cfg
    size = cfg.data.val_size
    saved = ((ck or {}).get("config") or {}).get("data") or {}
    if size == "auto" and isinstance(saved.get("val_size"), int):
        size = saved["val_size"]
    elif size == "auto":
        size = held_out_size("auto", n_train, cfg.eval.split)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_size=size))
    on_test = check_split_of(cfg.eval.split, cfg.data.val_size) == "test"
    if on_test and cfg.eval.n_examples > 0 and s.ctx.is_main:
        if cfg.eval.split == "test":
            log.warning("the per-epoch check, and so best.pt, uses the test split (eval.split: "
                        "test): the test accuracy of best.pt is then optimistic (Rice et al. "
                        "2020); hold training examples out (eval.split: auto) to select fairly")
        elif ck is not None:
            log.warning("this run selects best.pt on the test split (it was started with "
                        "data.val_size 0 and eval.split auto, before held-out examples were "
                        "the default); it goes on doing so, so its best.pt test accuracy is "
                        "optimistic")
    if on_test and cfg.eval.split != "test" and ck is None and cfg.eval.n_examples > 0:
        raise ConfigError(
            "data.val_size 0 holds no training examples out, so the per-epoch check would "
            "choose best.pt on the test split; hold examples out (data.val_size auto or a "
            "count) or, to select on the test set knowingly, set eval.split: test",
            params=("data.val_size",))
    return cfg


def _build_model_and_optimiser(s: _Session, data: TrainData) -> Optimisation:
    """The model (from ``init_weights`` when fine-tuning), optimiser, schedule, autocast."""
    cfg, device, info = s.cfg, s.device, data.info
    net: nn.Module
    if cfg.model is not None:
        # the user's FN, wrapped as eval and margins wrap it (inputs in [0, 1], no
        # normalisation, the same perturbation points); this runs the user's code
        net = build_external(cfg.model, info.num_classes, info.input_shape,
                             points=cfg.model_points).to(device)
    else:
        try:
            net = create_model(cfg.arch, info.num_classes, input_shape=info.input_shape,
                               mean=info.mean, std=info.std, **cfg.model_kwargs).to(device)
        except TypeError as e:  # an option the architecture's constructor does not take
            raise ConfigError(f"model_kwargs {cfg.model_kwargs} do not fit {cfg.arch}: "
                              f"{e}") from None
    if cfg.init_weights and not (s.resume and s.run.last.exists()):
        # fine-tuning: start from these weights (a resumed run continues from its checkpoint)
        ckpt_io.load_weights(_own_module(net), cfg.init_weights, unsafe_load=s.unsafe_load)
        log.info("initial weights from %s", cfg.init_weights)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda" and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): tuned kernels pay off
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(data.loader)))
    return Optimisation(net, optimizer, scheduler, amp_factory(device, cfg.bf16), channels_last)


def _own_module(net: nn.Module) -> nn.Module:
    """The module whose weights a weights file holds: the user's network inside an
    :class:`ExternalModel` (a state dict of it loads as eval ``--model`` loads one), else the
    model itself."""
    return net.net if isinstance(net, ExternalModel) else net


def _start(s: _Session, opt: Optimisation, ck: dict[str, Any] | None) -> Progress:
    """A fresh start, or the resumed run's state (the live objects loaded, metric lines past
    its checkpoint dropped); then the run's config.yaml."""
    state = Progress()  # a finished run that is resumed returns its last epoch's metrics
    if s.resume:
        state = _resume(s, opt, ck) if ck is not None else Progress()
        found = distributed.gather_objects(state.start_epoch)
        if len(set(found)) > 1:
            raise CheckpointError(
                f"resume: the processes found different checkpoints in {s.run.path} (epochs "
                f"{found} by rank); put out on storage every machine sees",
                params=("resume", "out"))
        if s.ctx.is_main:
            s.run.truncate_metrics(state.start_epoch)
    if s.ctx.is_main:  # after the resume check, which must not replace the run's own config
        s.run.write_config(s.cfg)
    # a resumed run's guard knows the last check and any collapse flagged before the kill: the
    # lines up to its checkpoint (the checkpoint's own line when metrics.jsonl is gone)
    done = [r for r in s.run.read_metrics() if r["epoch"] <= state.start_epoch] \
        if state.start_epoch else []
    state.guard = OverfitGuard.from_rows(s.cfg.eval.co_drop, done or
                                         ([state.metrics] if state.metrics else []))
    return state


def _resume(s: _Session, opt: Optimisation, ck: dict[str, Any]) -> Progress:
    """Load the run's last checkpoint (read already) into the live objects."""
    path = s.run.last
    s.run.check_resume(ck, s.cfg)
    check_split_version(
        ck.get("robust_amo_version"),
        needed=s.cfg.data.val_size != 0 or s.cfg.data.train_subset is not None,
        refuse=lambda v: CheckpointError(
            f"cannot resume {path}: robust-amo {v} drew data.train_subset/data.val_size "
            "differently, so the run would go on with other training data; start a new run "
            "(another out)", params=("out",)),
    )
    opt.net.load_state_dict(ckpt_io.model_state(ck))
    opt.optimizer.load_state_dict(ck["optimizer"])
    opt.scheduler.load_state_dict(ck["scheduler"])
    _extend_schedule(s, opt, ck)
    ckpt_io.set_rng_state(ck["rng"])
    log.info("resumed from %s after epoch %d", path, ck["epoch"])
    return Progress(ck["epoch"], ck["best_robust_acc"], dict(ck.get("metrics") or {}))


def _extend_schedule(s: _Session, opt: Optimisation, ck: dict[str, Any]) -> None:
    """Keep the learning-rate schedule the run was planned with; epochs past it follow the
    caller's ``lr_extension`` (:class:`LRSchedule`), never a stretched schedule's jump."""
    schedule = opt.scheduler.lr_lambdas[0]
    if not isinstance(schedule, LRSchedule):  # pragma: no cover (the trainer builds one)
        return
    if (ck["scheduler"].get("lr_lambdas") or [None])[0] is None:
        # a checkpoint of a version whose schedule saved no plan: it was planned for the
        # epochs of the run's saved config
        planned = int((ck.get("config") or {}).get("epochs", s.cfg.epochs))
        schedule.segments = [[0, planned, "plan"]]
    planned = schedule.planned_epochs
    if s.cfg.epochs <= planned:
        return
    schedule.extend(s.cfg.epochs, s.lr_extension)
    # the next iteration's rate: LambdaLR set it from the old plan when the run stopped
    lrs = [base * schedule(opt.scheduler.last_epoch) for base in opt.scheduler.base_lrs]
    for group, lr in zip(opt.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    opt.scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    if s.ctx.is_main and s.lr_extension == "final":
        log.warning("resume: epochs %d-%d go past the %d epochs the learning-rate schedule "
                    "(%s) was planned for; they keep its final rate, %.4g (lr_extension "
                    "restart runs the schedule again over them instead)", planned + 1,
                    s.cfg.epochs, planned, s.cfg.optim.schedule, lrs[0])
    elif s.ctx.is_main:
        log.info("resume: epochs %d-%d run the learning-rate schedule (%s) again, over %d "
                 "epochs", planned + 1, s.cfg.epochs, s.cfg.optim.schedule,
                 s.cfg.epochs - planned)


def _build_method(s: _Session, data: TrainData, opt: Optimisation, start_epoch: int) -> Method:
    """The forward attacks and objectives call (compiled if asked: CompiledModel falls back to
    eager under perturbation hooks), the training attack if the method needs one, its objective
    and the per-epoch check's attack; the forward DDP-wrapped for the gradient all-reduce."""
    cfg = s.cfg
    fwd: nn.Module = opt.net
    if cfg.compile:
        try:
            fwd = CompiledModel(opt.net, cfg.compile_backend, cfg.compile_mode)
        except RuntimeError as e:  # torch._dynamo's InvalidBackend for an unknown backend
            raise ConfigError(f"compile_backend {cfg.compile_backend!r}: {e}") from None

    # the method's randomness is one generator, reseeded per epoch and rank; attacks need no
    # gradient sync, so they run on the unwrapped forward
    method_gen = torch.Generator()
    attack = None
    if method_spec(cfg.method).needs_attack:
        attack = PGD.from_threat(fwd, cfg.attack, generator=method_gen)
    objective = build_objective(cfg, attack, method_gen)
    eval_gen = torch.Generator()
    eval_threat = cfg.attack.replace(step_size=cfg.eval.step_size or cfg.attack.step_size,
                                     steps=cfg.eval.steps)
    eval_attack = PGD.from_threat(fwd, eval_threat, restarts=cfg.eval.restarts,
                                  generator=eval_gen, early_stop=True)
    loader = data.loader
    if isinstance(fwd, CompiledModel) and start_epoch < cfg.epochs and len(loader) > 0:
        loader.set_epoch(start_epoch)
        x0, y0 = next(iter(loader))
        probe(fwd, objective, _memory_format(x0, opt.channels_last), y0, opt.amp)
    model = distributed.wrap_ddp(fwd, s.ctx, s.device)
    return Method(fwd, model, objective, method_gen, eval_attack, eval_gen)


def _run_epoch(s: _Session, epoch: int, data: TrainData, opt: Optimisation, method: Method,
               tb: TensorBoardLog | None) -> dict[str, Any]:
    """One pass over the training set; its loss, accuracy, learning rate and speed.

    Raises:
        RobustAmoError: the loss is not finite.
    """
    cfg, ctx, device, loader = s.cfg, s.ctx, s.device, data.loader
    method.model.train()
    loader.set_epoch(epoch)
    method.method_gen.manual_seed(derive_seed(cfg.seed, "method", epoch, ctx.rank))
    if isinstance(method.objective, EpochAware):
        method.objective.begin_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    t0 = time.perf_counter()
    show = s.progress and ctx.is_main
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
    for step, (x, y) in enumerate(bar):
        check_stop()  # a SIGTERM whose KeyboardInterrupt a finalizer swallowed
        if step % cfg.log_every == 0 and isinstance(method.objective, EpochAware):
            method.objective.log_next()  # the method measures what it logs on this batch
        # with compile on the model runs eagerly under δ hooks: compile the points' arithmetic
        with compiled_hook(cfg.compile, cfg.compile_backend):
            loss, logits = train_step(method.model, method.objective, opt.optimizer,
                                      _memory_format(x, opt.channels_last), y, opt.amp)
        opt.scheduler.step()
        # accumulate on the device: no host sync inside the loop
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % cfg.log_every == 0 and (tb is not None or show):
            value = loss.item()  # one host sync per log_every steps
            if show:
                bar.set_postfix(loss=f"{value:.3f}")
            if tb is not None:
                tb.step(epoch * len(loader) + step, value)
    totals = torch.stack([loss_sum.double(), correct.double(),
                          torch.tensor(float(seen), device=device, dtype=torch.float64)])
    loss_sum_all, correct_all, seen_all = distributed.all_reduce_sum(totals).tolist()
    train_time = time.perf_counter() - t0
    train_loss = loss_sum_all / max(seen_all, 1)
    if not math.isfinite(train_loss):
        raise RobustAmoError(
            f"training diverged: the loss is {train_loss} in epoch {epoch + 1}; lower "
            "optim.lr or check the method's options"
        )
    metrics = {"epoch": epoch + 1, "train_loss": train_loss,
               "train_acc": correct_all / max(seen_all, 1),
               "lr": opt.optimizer.param_groups[0]["lr"], "train_time_s": round(train_time, 3),
               "images_per_s": round(seen_all / train_time, 1)}
    if isinstance(method.objective, EpochAware):
        # what the method logs per epoch (e.g. what the all-layer δ does), from this rank
        metrics.update(method.objective.epoch_metrics())
    return metrics


def _check_and_checkpoint(s: _Session, epoch: int, metrics: dict[str, Any], state: Progress,
                          data: TrainData, opt: Optimisation, method: Method,
                          tb: TensorBoardLog | None) -> None:
    """The per-epoch check when due, then (rank 0) the metrics line, the last checkpoint and,
    on a new best robust accuracy, best.pt; ``state`` moves to this epoch."""
    cfg, ctx = s.cfg, s.ctx
    if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
        # the same starts every epoch
        method.eval_gen.manual_seed(derive_seed(cfg.seed, "eval-attack", ctx.rank))
        checked = evaluate(method.fwd, data.eval_loader, method.eval_attack, opt.amp,
                           reduce_ranks=ctx.enabled)
        metrics.update(checked, check_split=data.check_split, check_examples=checked["n"])
    if state.guard.observe(epoch + 1, metrics) and ctx.is_main:
        log.warning("catastrophic overfitting at epoch %d: the check's robust accuracy fell "
                    "by more than %g of the previous check's while its clean accuracy rose "
                    "(the training attack no longer finds adversarial points; best.pt keeps "
                    "the epoch of best robust accuracy); metrics.jsonl says %s from here on",
                    epoch + 1, s.cfg.eval.co_drop, CO_EPOCH)

    robust = metrics.get("robust_acc", float("nan"))
    is_best = math.isfinite(robust) and robust > state.best
    state.best = robust if is_best else state.best
    state.metrics = metrics
    if ctx.is_main:
        checked = f" (check on the {metrics['check_split']} split)" if "check_split" in metrics \
            else ""
        log.info("epoch %d%s: %s", epoch + 1, checked, json.dumps(metrics))
        s.run.append_metrics(metrics)
        if tb is not None:
            tb.epoch(metrics)
        ckpt = _checkpoint_dict(cfg, data.info, opt, epoch + 1, state.best, metrics)
        ckpt_io.atomic_save(ckpt, s.run.last)
        if is_best:
            ckpt_io.atomic_save(ckpt, s.run.best)


def _checkpoint_dict(cfg: TrainConfig, info: DatasetInfo, opt: Optimisation, epoch: int,
                     best: float, metrics: dict[str, Any]) -> dict[str, Any]:
    mean, std = info.mean, info.std
    if isinstance(opt.net, ExternalModel):  # the user's model: no normalisation of ours
        norm = opt.net.normalize
        mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    return ckpt_io.build_checkpoint(
        arch=cfg.model or cfg.arch, num_classes=info.num_classes, input_shape=info.input_shape,
        mean=mean, std=std, model_kwargs=cfg.model_kwargs, dataset=cfg.dataset,
        method=cfg.method, model=opt.net, epoch=epoch, optimizer=opt.optimizer.state_dict(),
        scheduler=opt.scheduler.state_dict(), best_robust_acc=best, metrics=metrics,
        class_names=list(info.classes) if info.classes else None,
        config=cfg.to_dict(), rng=ckpt_io.rng_state())


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
