"""The native training loop: standard, Madry PGD and every registered method, top to bottom.

``train(cfg)`` builds data, model, optimiser, schedule and the method's objective, then for every
epoch: one pass over the shuffled (and augmented) training set, a clean and PGD accuracy check on
held-out examples, one JSON line of metrics, and an atomic checkpoint. A killed run restarts with
``resume=True`` from its last checkpoint and ends with the weights an uninterrupted run would have:
every epoch's batch order, augmentation and attack starts depend only on ``(seed, epoch)``
(each stream seeded through :func:`robust_amo.runtime.derive_seed`).

:func:`resolve` turns a YAML file and overrides into a checked :class:`TrainConfig`: the schema
(:func:`robust_amo.config.load_config`) and the names its registries hold (architecture,
dataset, method options).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from . import distributed, outputs
from .attacks import PGD, AttackFn
from .compiled import CompiledModel, probe
from .config import TrainConfig, load_config, save_yaml
from .curves import write_curves
from .data import (
    Loader,
    dataset_info,
    hold_out,
    load_dataset,
    normalize_dataset_name,
    require_examples,
    take_subset,
)
from .errors import CheckpointError, ConfigError, DataError, RobustAmoError, UnknownModelError
from .methods import build_objective, method_options, method_spec
from .models import create_model, is_registered, list_models
from .runtime import Amp, amp_factory, derive_seed, eval_mode, resolve_device
from .tblog import FOLDER as TB_FOLDER
from .tblog import TensorBoardLog
from .version import SPLITS_SINCE, version_tuple

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


def resolve(
    config_file: str | Path | None = None, overrides: list[dict[str, Any]] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then each override mapping in order; fully checked.

    Args:
        config_file: a YAML file (``configs/*.yaml``) or None for the defaults.
        overrides: mappings merged on top in order (the CLI's flags and ``--set``).

    Raises:
        ConfigError, UnknownModelError: naming the key and the allowed values.
    """
    cfg = load_config(config_file, overrides)
    check_names(cfg)
    return cfg


def check_names(cfg: TrainConfig) -> None:
    """The config's architecture, dataset and method (with its options) exist.

    Raises:
        UnknownModelError: an unknown ``arch`` (the message lists the known ones).
        ConfigError: an unknown ``dataset`` or ``method``, or bad ``method_args``.
    """
    if not is_registered(cfg.arch):
        raise UnknownModelError(
            f"arch: unknown architecture {cfg.arch!r}; known architectures: "
            f"{', '.join(list_models())} (see `robust-amo archs`)"
        )
    try:
        normalize_dataset_name(cfg.dataset)
    except DataError as e:
        raise ConfigError(f"dataset: {e}") from None
    method_options(cfg)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per iteration: warmup, then multistep, cosine or constant.

    Milestones are in epochs (as in the papers), applied at the first iteration of that epoch.
    """
    o = cfg.optim

    def f(it: int) -> float:
        t = it / steps_per_epoch  # epochs done, fractional
        if o.warmup_epochs > 0 and t < o.warmup_epochs:
            return (it + 1) / (o.warmup_epochs * steps_per_epoch)
        if o.schedule == "multistep":
            gammas = o.gamma if isinstance(o.gamma, list) else [o.gamma] * len(o.milestones)
            return math.prod((g for m, g in zip(o.milestones, gammas, strict=True)
                              if it >= m * steps_per_epoch), start=1.0)
        if o.schedule == "cosine":
            total = max(cfg.epochs - o.warmup_epochs, 1e-9)
            return 0.5 * (1 + math.cos(math.pi * min((t - o.warmup_epochs) / total, 1.0)))
        return 1.0

    return f


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


def _checkpoint_dict(cfg, model, optimizer, scheduler, epoch, best, metrics, info) -> dict:
    return ckpt_io.build_checkpoint(
        arch=cfg.arch, num_classes=info.num_classes, input_shape=info.input_shape,
        mean=info.mean, std=info.std, model_kwargs=cfg.model_kwargs, dataset=cfg.dataset,
        method=cfg.method, model=model, epoch=epoch, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), best_robust_acc=best, metrics=metrics,
        class_names=list(info.classes) if info.classes else None,
        config=cfg.to_dict(), rng=ckpt_io.rng_state())


RUN_FILES = (ckpt_io.LAST, ckpt_io.BEST, "metrics.jsonl")
"""What makes a folder hold a run: ``train --out`` into it needs ``--resume`` or ``--overwrite``."""

RESUME_FREE = frozenset({"epochs", "device", "out", "log_every", "logging.tensorboard",
                         "data.data_dir",
                         "data.download", "eval.batch_size", "compile", "compile_backend",
                         "compile_mode"})
"""Config keys a resumed run may change: more epochs, and what does not alter the trajectory
(where the data lies and the run is written, the device, progress output, compilation, the
evaluation batch size)."""

RESUME_ADVICE = ("start over with --overwrite, or continue from the best epoch: copy best.pt "
                 "over checkpoint.pt and --resume")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("model_kwargs", "method_args"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys (dotted) in which ``now`` differs from the ``saved`` config of a run, except
    :data:`RESUME_FREE`; keys a file of an older version lacks are not compared."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k} ({a[k]!r} -> {b.get(k)!r})" for k in sorted(a)
            if k in b and k not in RESUME_FREE and a[k] != b[k]]


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Check ``run_dir`` before any work: writable, not holding another run unless ``resume``
    (continue it) or ``overwrite`` (delete its checkpoints and metrics first); temporary files a
    kill left behind are removed."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or "
                          "start it over")
    outputs.writable_dir(run_dir)
    outputs.remove_temp_files(run_dir)
    found = outputs.refuse_overwrite(
        run_dir, RUN_FILES, "run", overwrite=overwrite or resume,
        ways="pass --resume to continue it or --overwrite to start over (deletes it)")
    if overwrite:
        for name in found:
            (run_dir / name).unlink()
            log.info("--overwrite: deleted %s", run_dir / name)
        # the old run's pictures and TensorBoard events would mix with the new run's
        (run_dir / "curves.png").unlink(missing_ok=True)
        if (run_dir / TB_FOLDER).is_dir():
            shutil.rmtree(run_dir / TB_FOLDER)
            log.info("--overwrite: deleted %s", run_dir / TB_FOLDER)


def _resume(
    run_dir: Path, cfg: TrainConfig, model, optimizer, scheduler, unsafe_load: bool = False
) -> tuple[int, float, dict[str, Any]]:
    """Load the run's last checkpoint into the live objects; returns (start_epoch, best,
    metrics of that epoch)."""
    path = run_dir / ckpt_io.LAST
    if not path.exists():
        log.warning("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
        return 0, -1.0, {}
    ck = ckpt_io.load_native(path, unsafe_load=unsafe_load, advice=RESUME_ADVICE)
    differ = config_differences(ck.get("config") or {}, cfg.to_dict())
    if differ:
        raise CheckpointError(
            f"cannot resume {path}: this run's config differs from the checkpoint's in "
            f"{', '.join(differ)}; resume with the run's own settings (its config.yaml), or "
            "start a new run (another --out, or --overwrite)"
        )
    redrawn = cfg.data.val_size > 0 or cfg.data.train_subset is not None
    if redrawn and version_tuple(ck.get("robust_amo_version")) < SPLITS_SINCE:
        raise CheckpointError(
            f"cannot resume {path}: robust-amo {ck.get('robust_amo_version')} drew "
            "data.train_subset/data.val_size differently, so the run would go on with other "
            "training data; start a new run (another --out)"
        )
    model.load_state_dict(ckpt_io.model_state(ck))
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    ckpt_io.set_rng_state(ck["rng"])
    log.info("resumed from %s after epoch %d", path, ck["epoch"])
    return ck["epoch"], ck["best_robust_acc"], dict(ck.get("metrics") or {})


def _truncate_metrics(path: Path, after_epoch: int) -> None:
    """Drop metric lines of epochs past the checkpoint (a run killed after logging them)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            epoch = json.loads(ln).get("epoch", 0) if ln.strip() else None
        except json.JSONDecodeError:  # a line cut short by the kill (or a full disk)
            log.warning("--resume: dropping an unreadable line of %s: %.80s", path, ln)
            continue
        if epoch is not None and epoch <= after_epoch:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    unsafe_load: bool = False,
    progress: bool = False,
    callbacks: list[EpochCallback] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``cfg.dataset`` with ``cfg.method``; see the module docstring.

    Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set) every process runs this function: the
    model is wrapped in DistributedDataParallel, ``cfg.batch_size`` is the global batch split
    evenly over the ranks, metrics are summed over ranks, and rank 0 alone writes files
    (``robust_amo.distributed``).

    Args:
        cfg: the resolved configuration (:func:`resolve`).
        resume: continue from ``cfg.out/checkpoint.pt`` when it exists (also with another
            number of processes than the run that wrote it); the resolved config must equal
            the checkpoint's but for :data:`RESUME_FREE` keys.
        overwrite: start over in a folder that holds a run (its checkpoints and metrics are
            deleted); without it, or ``resume``, such a folder is refused (:data:`RUN_FILES`).
        unsafe_load: read a checkpoint that needs full unpickling (runs code from the file).
        progress: show tqdm progress bars (the CLI turns them on; rank 0 only).
        callbacks: called as ``cb(epoch, metrics)`` after each epoch's checkpoint is written, on
            every rank with the same (reduced) metrics; guard file writes with
            ``robust_amo.distributed.is_main()``.

    Returns:
        the last epoch's metrics (also the last line of ``metrics.jsonl``).
    """
    with distributed.session(resolve_device(cfg.device)) as (ctx, device), \
            contextlib.ExitStack() as stack:
        if ctx.is_main:  # one writer per run folder: a second train into it is refused
            stack.enter_context(outputs.folder_lock(cfg.out, "robust-amo train"))
        return _train(cfg, ctx, device, resume, overwrite, unsafe_load, progress,
                      callbacks or [])


def _train(
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    unsafe_load: bool,
    progress: bool,
    callbacks: list[EpochCallback],
) -> dict[str, Any]:
    check_names(cfg)  # a config built by hand: reject unknown names before any work
    local_batch = distributed.per_rank_batch(cfg.batch_size, ctx)
    run_dir = Path(cfg.out)
    if ctx.is_main:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    # weight init and dropout only; attacks and methods use their own generators
    torch.manual_seed(derive_seed(cfg.seed, "init"))

    # data: subset, held-out split, loaders that keep the uint8 set on the device; each rank
    # takes its share of every global batch and whole batches of the evaluation examples
    info = dataset_info(cfg.dataset, cfg.data.data_dir, cfg.data.image_size)
    train_split, test_split = load_dataset(cfg.dataset, cfg.data.data_dir, cfg.data.download,
                                           cfg.data.image_size)
    train_split = take_subset(train_split, cfg.data.train_subset, cfg.data.subset_seed)
    train_split, val_split = hold_out(train_split, cfg.data.val_size, cfg.seed)
    use_val = cfg.eval.split == "val" or (cfg.eval.split == "auto" and len(val_split) > 0)
    eval_split = val_split if use_val else test_split
    if cfg.eval.examples > 0:
        require_examples(eval_split, "the per-epoch check")
    eval_split = eval_split.subset(torch.arange(min(cfg.eval.examples, len(eval_split))))
    loader = Loader(train_split, local_batch, device, shuffle=True, augment=cfg.data.augment,
                    seed=cfg.seed, drop_last=len(train_split) > cfg.batch_size,
                    rank=ctx.rank, world_size=ctx.world_size)
    eval_shard = distributed.shard_batches(len(eval_split), cfg.eval.batch_size, ctx.rank,
                                           ctx.world_size)
    eval_loader = Loader(eval_split.subset(eval_shard), cfg.eval.batch_size, device)

    # model and optimisation (on the plain model, whose weights checkpoints hold)
    try:
        net = create_model(cfg.arch, info.num_classes, input_shape=info.input_shape,
                           mean=info.mean, std=info.std, **cfg.model_kwargs).to(device)
    except TypeError as e:  # an option the architecture's constructor does not take
        raise ConfigError(f"model_kwargs {cfg.model_kwargs} do not fit {cfg.arch}: {e}") from None
    if cfg.init_weights and not (resume and (run_dir / ckpt_io.LAST).exists()):
        # fine-tuning: start from these weights (a resumed run continues from its checkpoint)
        ckpt_io.load_weights(net, cfg.init_weights, unsafe_load=unsafe_load)
        log.info("initial weights from %s", cfg.init_weights)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda" and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): tuned kernels pay off
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loader)))
    amp = amp_factory(device, cfg.bf16)

    start_epoch, best = (0, -1.0)
    metrics: dict[str, Any] = {}  # a finished run that is resumed returns its last epoch's
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        start_epoch, best, metrics = _resume(run_dir, cfg, net, optimizer, scheduler,
                                             unsafe_load)
        found = distributed.gather_objects(start_epoch)
        if len(set(found)) > 1:
            raise CheckpointError(
                f"--resume: the processes found different checkpoints in {run_dir} (epochs "
                f"{found} by rank); put --out on storage every machine sees"
            )
        if ctx.is_main:
            _truncate_metrics(metrics_path, start_epoch)
    if ctx.is_main:  # after the resume check, which must not replace the run's own config
        save_yaml(cfg, run_dir / "config.yaml")

    # the forward attacks and objectives call: compiled if asked (CompiledModel falls back to
    # eager under perturbation hooks), and DDP-wrapped for the gradient all-reduce
    fwd: nn.Module = net
    if cfg.compile:
        try:
            fwd = CompiledModel(net, cfg.compile_backend, cfg.compile_mode)
        except RuntimeError as e:  # torch._dynamo's InvalidBackend for an unknown backend
            raise ConfigError(f"compile_backend {cfg.compile_backend!r}: {e}") from None

    # the method: training attack if it needs one and its own randomness (one generator,
    # reseeded per epoch and rank) and objective; attacks need no gradient sync, so they run
    # on the unwrapped forward
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
    if isinstance(fwd, CompiledModel) and start_epoch < cfg.epochs and len(loader) > 0:
        loader.set_epoch(start_epoch)
        x0, y0 = next(iter(loader))
        probe(fwd, objective, _memory_format(x0, channels_last), y0, amp)
    model = distributed.wrap_ddp(fwd, ctx, device)

    tb = TensorBoardLog(run_dir, cfg.to_dict()) if cfg.logging.tensorboard and ctx.is_main \
        else None
    if ctx.is_main:
        log.info("training %s on %s with %s for %d epochs on %s x %d (%d train, %d eval "
                 "examples, global batch %d)", cfg.arch, cfg.dataset, cfg.method, cfg.epochs,
                 device, ctx.world_size, len(train_split), len(eval_split), cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loader.set_epoch(epoch)
        method_gen.manual_seed(derive_seed(cfg.seed, "method", epoch, ctx.rank))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and ctx.is_main), leave=False)
        for step, (x, y) in enumerate(bar):
            loss, logits = train_step(model, objective, optimizer,
                                      _memory_format(x, channels_last), y, amp)
            scheduler.step()
            # accumulate on the device: no host sync inside the loop
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % cfg.log_every == 0 and (tb is not None or progress and ctx.is_main):
                value = loss.item()  # one host sync per log_every steps
                if progress and ctx.is_main:
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
                   "lr": optimizer.param_groups[0]["lr"], "train_time_s": round(train_time, 3),
                   "images_per_s": round(seen_all / train_time, 1)}
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            # the same starts every epoch
            eval_gen.manual_seed(derive_seed(cfg.seed, "eval-attack", ctx.rank))
            metrics.update(evaluate(fwd, eval_loader, eval_attack, amp,
                                    reduce_ranks=ctx.enabled))

        robust = metrics.get("robust_acc", float("nan"))
        is_best = math.isfinite(robust) and robust > best
        best = robust if is_best else best
        if ctx.is_main:
            log.info("epoch %d: %s", epoch + 1, json.dumps(metrics))
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if tb is not None:
                tb.epoch(metrics)
            state = _checkpoint_dict(cfg, net, optimizer, scheduler, epoch + 1, best, metrics,
                                     info)
            ckpt_io.atomic_save(state, run_dir / ckpt_io.LAST)
            if is_best:
                ckpt_io.atomic_save(state, run_dir / ckpt_io.BEST)
        distributed.barrier()  # the checkpoint exists before any rank goes on
        for cb in callbacks:
            cb(epoch + 1, metrics)
    if tb is not None:
        tb.close()
    if ctx.is_main:
        write_curves(run_dir)  # RUN/curves.png: loss, accuracy and learning rate per epoch
    return metrics


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
