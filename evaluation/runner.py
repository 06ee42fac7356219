"""Running a list of attacks over an evaluation set in chunks, with a resumable state file.

The evaluation set (n examples) is cut into chunks of ``batch_size`` consecutive examples; chunk c
holds global indices ``[c·B, (c+1)·B)``. Each attack (an :class:`~robust_amo.evaluation.attacks.
EvalAttack` of the registry) computes per-example boolean masks chunk by chunk; the reduction to
accuracies is separate (:func:`~robust_amo.evaluation.outcome.summarize`), so chunks could
as well be spread over processes and their masks gathered. After every chunk (and, for
AutoAttack, after every attack of a chunk) the masks are written atomically to the state file; a
killed run started again with ``resume=True`` skips what is there and ends with the masks an
uninterrupted run gives.

Under torchrun each rank attacks its share of the chunks and the masks are gathered, so every
rank ends with the single-process result (:mod:`robust_amo.evaluation.sharding`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robust_amo.checkpoint import atomic_save, read_file
from robust_amo.config import Norm, ThreatModel
from robust_amo.errors import CheckpointError, RobustAmoError
from robust_amo.runtime import amp_factory

from . import sharding
from .attacks import EvalAttack
from .outcome import AttackOutcome
from .pgd_eval import PGDSettings, pgd_robust

log = logging.getLogger(__name__)

STATE_FORMAT = "robust-amo-eval-state"


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
            log.info("ignoring the earlier evaluation state %s (resume not asked for)", path)
            return
        try:
            old = read_file(path)
        except CheckpointError as e:
            raise CheckpointError(f"evaluation state {path} is unreadable ({e}); delete it and "
                                  "run again without resume", params=("resume",)) from None
        if not isinstance(old, dict) or old.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not an evaluation state file; delete it")
        if old.get("fingerprint") != fingerprint:
            raise RobustAmoError(
                f"evaluation state {path} was written for another model, data or batch size "
                f"({old.get('fingerprint')} vs {fingerprint}); run without resume to start "
                "afresh, or use another out", params=("resume", "out"))
        self.data = old
        log.info("resuming the evaluation from %s", path)

    def attack(self, spec: EvalAttack) -> dict[int, Any]:
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


def evaluate_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[EvalAttack],
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
    device = torch.device(device)
    n = len(y)
    fp = {"model": model_digest(model), "data": tensor_digest(x, y), "n": n,
          "batch_size": batch_size, **(fingerprint or {})}
    state = EvalState(sharding.state_file(state_path), fp, resume)
    amp = amp_factory(device, bf16)
    outcomes = []
    for spec in specs:
        done = state.attack(spec)
        parts = chunks(n, batch_size)
        mine = sharding.my_chunks(n, batch_size)  # all chunks unless run under torchrun
        # a chunk counts as resumed when any of its work was saved: finished, or (AutoAttack)
        # part of its attacks
        resumed = sum(1 for c in mine if c in done)
        bar = tqdm(mine, desc=spec.name, disable=not progress, leave=False)
        for c in bar:
            sl = parts[c]
            entry = done.get(c)
            if entry is not None and entry.get("finished"):
                continue
            spent = entry.get("time", 0.0) if entry is not None else 0.0
            t0 = time.perf_counter()

            def save_partial(part: dict[str, Any], c: int = c, spent: float = spent,
                             t0: float = t0, name: str = spec.name,
                             done: dict[int, Any] = done, bar: Any = bar) -> None:
                done[c] = {**part, "time": spent + time.perf_counter() - t0, "finished": False}
                state.save()
                # AutoAttack saves after each of its attacks: show which have finished
                bar.set_postfix_str("done: " + ", ".join(map(str, part.get("done", []))))
                if interrupt is not None:
                    interrupt(name, c)

            done[c] = spec.run_chunk(model, x[sl].to(device), y[sl].to(device),
                                     torch.arange(sl.start, sl.stop), amp=amp, partial=entry,
                                     save_partial=save_partial)
            done[c].update(finished=True, time=spent + time.perf_counter() - t0)
            state.save()
            if interrupt is not None:
                interrupt(spec.name, c)
        outcome = _collect(spec, [done[c] for c in mine], resumed)
        outcomes.append(sharding.gather_outcome(outcome, n, batch_size))
    return outcomes


def _collect(spec: EvalAttack, entries: list[dict[str, Any]], resumed: int) -> AttackOutcome:
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
    return AttackOutcome(spec, clean, robust, steps, warns,
                         sum(e.get("time", 0.0) for e in entries), resumed, spec.backend())


def large_eps_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm,
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
    settings = PGDSettings(ThreatModel(norm, eps, 2.5 * eps / 20, 20), seed=seed)
    robust = 0
    for sl in chunks(len(y), batch_size):
        r = pgd_robust(model, x[sl].to(device), y[sl].to(device), torch.arange(sl.start, sl.stop),
                       settings)
        robust += int(r.robust.sum())
    return eps, robust / max(len(y), 1)
