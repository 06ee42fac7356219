"""Running a list of attacks over an evaluation set in chunks, with a resumable state file.

The evaluation set (n examples) is cut into chunks of ``batch_size`` consecutive examples; chunk c
holds global indices ``[c·B, (c+1)·B)``. Each attack computes per-example boolean masks chunk by
chunk (:func:`evaluation.pgd_eval.pgd_robust`, :func:`evaluation.autoattack_adapter.
autoattack_robust`); the reduction to accuracies is separate (:func:`summarize`), so chunks could
as well be spread over processes and their masks gathered. After every chunk (and, for
AutoAttack, after every attack of a chunk) the masks are written atomically to the state file; a
killed run started again with ``resume=True`` skips what is there and ends with the masks an
uninterrupted run gives.

Under torchrun each rank attacks its share of the chunks and the masks are gathered, so every
rank ends with the single-process result (evaluation/sharding.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.checkpoint import atomic_save
from robust_amo.errors import CheckpointError, ConfigError, RobustAmoError

from . import sharding
from .autoattack_adapter import AutoAttackSettings, autoattack_robust
from .pgd_eval import PGDSettings, pgd_robust

log = logging.getLogger(__name__)

STATE_FORMAT = "robust-amo-eval-state"
PGD_DEFAULT_RESTARTS = {50: 10}
AA_VERSIONS = {"autoattack": "standard", "autoattack-plus": "plus", "autoattack-rand": "rand",
               "autoattack-custom": "custom"}


@dataclass(frozen=True)
class AttackSpec:
    """One entry of ``--attack``: its name, kind and settings."""

    name: str
    kind: str  # "clean" | "pgd" | "autoattack"
    pgd: PGDSettings | None = None
    aa: AutoAttackSettings | None = None

    def settings(self) -> dict[str, Any]:
        """The settings as a plain dict (report and state)."""
        if self.pgd is not None:
            return self.pgd.to_dict()
        if self.aa is not None:
            return self.aa.to_dict()
        return {}


def parse_attack(
    name: str,
    *,
    eps: float,
    norm: str = "linf",
    step_size: float | None = None,
    restarts: int | None = None,
    loss: str = "ce",
    seed: int = 0,
    aa_attacks: tuple[str, ...] = (),
    aa_backend: str | None = None,
) -> AttackSpec:
    """An :class:`AttackSpec` from a name such as ``clean``, ``pgd20``, ``pgd50``, ``autoattack``.

    ``pgdK`` is K steps of size ``step_size`` (default eps / 4, i.e. 2/255 at 8/255) with
    ``restarts`` random restarts (default 10 for pgd50 as in paper F.2, else 1).
    ``autoattack``/``autoattack-plus``/``autoattack-rand`` are AutoAttack's versions and
    ``autoattack-custom`` runs ``aa_attacks``.

    Raises:
        ConfigError: an unknown name or bad values.
    """
    key = name.strip().lower()
    if key == "clean":
        return AttackSpec("clean", "clean")
    m = re.fullmatch(r"pgd(\d+)", key)
    try:
        if m:
            steps = int(m.group(1))
            r = restarts if restarts is not None else PGD_DEFAULT_RESTARTS.get(steps, 1)
            alpha = step_size if step_size is not None else eps / 4
            return AttackSpec(key, "pgd", pgd=PGDSettings(eps, alpha, steps, r, norm, loss,
                                                          seed=seed))
        if key in AA_VERSIONS:
            version = AA_VERSIONS[key]
            attacks = tuple(aa_attacks) if version == "custom" else ()
            return AttackSpec(key, "autoattack", aa=AutoAttackSettings(
                eps, norm, version, attacks, seed, aa_backend))
    except ValueError as e:
        raise ConfigError(f"--attack {name}: {e}") from None
    raise ConfigError(f"unknown attack {name!r}; use clean, pgdK (e.g. pgd20, pgd50), "
                      f"{', '.join(AA_VERSIONS)}")


@dataclass
class AttackOutcome:
    """Masks and figures of one attack over the whole evaluation set (n examples)."""

    spec: AttackSpec
    clean: torch.Tensor  # (n,) bool
    robust: torch.Tensor  # (n,) bool
    steps: dict[str, torch.Tensor] = field(default_factory=dict)  # curve points -> (n,) masks
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    resumed_chunks: int = 0
    backend: str | None = None


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes (model weights, evaluation data) for the state file."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        # flattened: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """Digest of a model's state dict."""
    return tensor_digest(*[v for _, v in sorted(model.state_dict().items())])


class EvalState:
    """The state file: per attack and chunk, the masks computed so far."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": STATE_FORMAT, "fingerprint": fingerprint,
                                     "attacks": {}}
        if path is None or not path.exists():
            return
        if not resume:
            log.info("ignoring the earlier evaluation state %s (no --resume)", path)
            return
        try:
            old = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise CheckpointError(f"evaluation state {path} is unreadable ({e}); delete it and "
                                  "run again without --resume") from None
        if not isinstance(old, dict) or old.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not an evaluation state file; delete it")
        if old.get("fingerprint") != fingerprint:
            raise RobustAmoError(
                f"evaluation state {path} was written for another model, data or batch size "
                f"({old.get('fingerprint')} vs {fingerprint}); run without --resume to start "
                "afresh, or use another --out")
        self.data = old
        log.info("resuming the evaluation from %s", path)

    def attack(self, spec: AttackSpec) -> dict[int, Any]:
        """The chunk entries of ``spec`` (dropped if its settings changed)."""
        entry = self.data["attacks"].get(spec.name)
        if entry is None or entry["settings"] != spec.settings():
            entry = {"settings": spec.settings(), "chunks": {}}
            self.data["attacks"][spec.name] = entry
        return entry["chunks"]

    def save(self) -> None:
        if self.path is not None:
            atomic_save(self.data, self.path)


def chunks(n: int, batch_size: int) -> list[slice]:
    """The chunk slices of an n-example set."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _amp(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    from robust_amo.train import autocast

    return lambda: autocast(device, bf16)


def evaluate_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[AttackSpec],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    state_path: str | Path | None = None,
    resume: bool = False,
    bf16: bool = False,
    progress: bool = False,
    fingerprint: dict[str, Any] | None = None,
    interrupt: Callable[[str, int], None] | None = None,
) -> list[AttackOutcome]:
    """Run ``specs`` on (x, y), chunk by chunk; per-example masks per attack.

    Args:
        model: the classifier (eval mode is used; its mode is restored).
        x: (n, C, H, W) in [0, 1] on any device; y: (n,) labels.
        specs: the attacks, run in order.
        batch_size: chunk size (also AutoAttack's batch).
        device: where the attacks run.
        state_path: state file for resuming (None: no state).
        resume: continue from ``state_path`` when it exists and matches.
        bf16: bf16 autocast for PGD forward passes on CUDA (AutoAttack stays float32).
        progress: tqdm bar per attack.
        fingerprint: extra identity of the run stored in (and checked against) the state.
        interrupt: test hook called as ``interrupt(attack, chunk)`` after each saved step.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    n = len(y)
    fp = {"model": model_digest(model), "data": tensor_digest(x, y), "n": n,
          "batch_size": batch_size, **(fingerprint or {})}
    state = EvalState(sharding.state_file(state_path), fp, resume)
    amp = _amp(device, bf16)
    outcomes = []
    for spec in specs:
        done = state.attack(spec)
        parts = chunks(n, batch_size)
        mine = sharding.my_chunks(n, batch_size)  # all chunks unless run under torchrun
        resumed = sum(1 for c in mine if done.get(c, {}).get("finished"))
        for c in tqdm(mine, desc=spec.name, disable=not progress, leave=False):
            sl = parts[c]
            entry = done.get(c)
            if entry is not None and entry.get("finished"):
                continue
            xb, yb = x[sl].to(device), y[sl].to(device)
            spent = entry.get("time", 0.0) if entry is not None else 0.0
            t0 = time.perf_counter()
            if spec.kind == "clean":
                with torch.no_grad(), amp():
                    was = model.training
                    model.eval()
                    try:
                        ok = (model(xb).argmax(1) == yb).cpu()
                    finally:
                        model.train(was)
                done[c] = {"clean": ok, "robust": ok, "steps": {}, "finished": True}
            elif spec.kind == "pgd":
                idx = torch.arange(sl.start, sl.stop)
                r = pgd_robust(model, xb, yb, idx, spec.pgd, amp)
                done[c] = {"clean": r.clean.cpu(), "robust": r.robust.cpu(),
                           "steps": {f"restart {i + 1}": m.cpu()
                                     for i, m in enumerate(r.after_restart)},
                           "finished": True}
            else:
                prev = entry.get("aa") if entry is not None else None

                def save_step(res, c=c, spent=spent, t0=t0, name=spec.name, done=done):
                    done[c] = {"aa": res.state(), "time": spent + time.perf_counter() - t0,
                               "finished": False}
                    state.save()
                    if interrupt is not None:
                        interrupt(name, c)

                r = autoattack_robust(model, xb, yb, spec.aa, state=prev, on_step=save_step)
                done[c] = {"clean": r.clean.cpu(), "robust": r.robust.cpu(),
                           "steps": {k: v.cpu() for k, v in r.after_attack.items()},
                           "warnings": r.warnings, "finished": True}
            done[c]["time"] = spent + time.perf_counter() - t0
            state.save()
            if interrupt is not None:
                interrupt(spec.name, c)
        outcome = _collect(spec, [done[c] for c in mine], resumed)
        outcomes.append(sharding.gather_outcome(outcome, n, batch_size))
    return outcomes


def _collect(spec: AttackSpec, entries: list[dict[str, Any]], resumed: int) -> AttackOutcome:
    none = [torch.zeros(0, dtype=torch.bool)]  # a rank may get no chunk
    clean = torch.cat([e["clean"] for e in entries] or none)
    robust = torch.cat([e["robust"] for e in entries] or none)
    names = list(entries[0]["steps"]) if entries else []
    steps = {k: torch.cat([e["steps"][k] for e in entries]) for k in names}
    warns: list[str] = []
    for e in entries:
        for w in e.get("warnings", []):
            if w not in warns:
                warns.append(w)
    backend = None
    if spec.kind == "autoattack":
        from .autoattack_adapter import autoattack_backend, backend_version

        backend = backend_version(*autoattack_backend(spec.aa.backend))
    return AttackOutcome(spec, clean, robust, steps, warns,
                         sum(e.get("time", 0.0) for e in entries), resumed, backend)


def summarize(outcome: AttackOutcome) -> dict[str, Any]:
    """Accuracies of one attack from its masks (the reduction step)."""
    n = max(len(outcome.robust), 1)
    return {
        "clean_accuracy": outcome.clean.float().sum().item() / n,
        "robust_accuracy": outcome.robust.float().sum().item() / n,
        "n_robust": int(outcome.robust.sum()),
        "curve": {k: m.float().sum().item() / n for k, m in outcome.steps.items()},
    }


def large_eps_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    *,
    n_max: int = 200,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[float, float]:
    """Robust accuracy under PGD-20 with an eps that reaches a constant gray image from any x.

    In L∞ eps = 0.5 (every x ∈ [0, 1]^d is within 0.5 of the all-0.5 image); in L2 eps = 0.5·√d.
    No classifier can be right on two classes at the same point, so robust accuracy must fall
    to (about) 0; if it does not, the gradients are masked.

    Returns:
        ``(eps, robust accuracy)`` on the first ``n_max`` examples.
    """
    device = torch.device(device)
    x, y = x[:n_max], y[:n_max]
    eps = 0.5 if norm == "linf" else 0.5 * math.sqrt(x[0].numel())
    settings = PGDSettings(eps, 2.5 * eps / 20, 20, 1, norm, seed=seed)
    robust = 0
    for sl in chunks(len(y), batch_size):
        r = pgd_robust(model, x[sl].to(device), y[sl].to(device), torch.arange(sl.start, sl.stop),
                       settings)
        robust += int(r.robust.sum())
    return eps, robust / max(len(y), 1)
