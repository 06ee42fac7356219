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

from robust_amo import distributed
from robust_amo.checkpoint import atomic_save, read_file
from robust_amo.config import Norm, ThreatModel
from robust_amo.errors import CheckpointError, RobustAmoError
from robust_amo.runtime import amp_factory, eval_mode

from . import sharding
from .attacks import EvalAttack
from .outcome import AttackOutcome
from .pgd_eval import PGDSettings, pgd_robust
from .report import FiniteLogits

log = logging.getLogger(__name__)

STATE_FORMAT = "robust-amo-eval-state"
STATE_ADVICE = ("delete it to start the evaluation afresh, or run without resume to ignore it "
                "(a new one replaces it)")
"""What to do about a state file that cannot be resumed from."""


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
        except CheckpointError:
            # read_file's advice is about checkpoints (another one, unsafe_load); a state file
            # is ours and never needs unpickling: the fix is to start this evaluation afresh
            raise CheckpointError(f"evaluation state {path} is damaged or was not written by "
                                  f"an evaluation; {STATE_ADVICE}", params=("resume",)) from None
        if not isinstance(old, dict) or old.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not an evaluation state file; {STATE_ADVICE}",
                                  params=("resume",))
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
    parts = chunks(n, batch_size)
    mine = sharding.my_chunks(n, batch_size)  # all chunks unless run under torchrun
    outcomes = []
    with PassCounter(model) as passes:
        for spec in specs:
            done = state.attack(spec)
            # a chunk counts as resumed when any of its work was saved: finished, or
            # (AutoAttack) part of its attacks
            resumed = sum(1 for c in mine if c in done)
            tally = _Progress(spec.name, len(parts), passes, done)
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
                                 done: dict[int, Any] = done, bar: Any = bar,
                                 tally: _Progress = tally) -> None:
                    done[c] = {**part, "time": spent + time.perf_counter() - t0,
                               "finished": False}
                    state.save()
                    # AutoAttack saves after each of its attacks: show which have finished
                    bar.set_postfix_str("done: " + ", ".join(map(str, part.get("done", []))))
                    tally.sub_step(c, part)
                    if interrupt is not None:
                        interrupt(name, c)

                done[c] = spec.run_chunk(model, x[sl].to(device), y[sl].to(device),
                                         torch.arange(sl.start, sl.stop), amp=amp,
                                         partial=entry, save_partial=save_partial)
                done[c].update(finished=True, time=spent + time.perf_counter() - t0)
                state.save()
                tally.chunk(c)
                if interrupt is not None:
                    interrupt(spec.name, c)
            outcome = _collect(spec, [done[c] for c in mine], resumed)
            outcome.forward_passes = passes.n - tally.passes_at_start
            outcome = sharding.gather_outcome(outcome, n, batch_size)
            tally.finished(outcome)
            outcomes.append(outcome)
    return outcomes


class PassCounter:
    """Counts a model's forward passes in example units (a batch of 128 is 128) while in use.

    A forward pre-hook on the model, so it costs one addition per call and sees every call,
    AutoAttack's included (they go through the model). Backward passes are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.n = 0
        self._handle: Any = None

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            self.n += int(args[0].shape[0])

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class _Progress:
    """The log lines of one attack, which appear with or without progress bars: after each
    AutoAttack sub-attack of a chunk, after each other chunk (when there are several) and when
    the attack is done. Under torchrun only rank 0 logs, and its chunk lines are about its
    chunks."""

    def __init__(self, name: str, n_chunks: int, passes: PassCounter,
                 done: dict[int, Any]) -> None:
        self.name, self.n_chunks, self.passes, self.done = name, n_chunks, passes, done
        self.passes_at_start = passes.n
        self.t0 = time.perf_counter()
        self.stepped: set[int] = set()  # chunks whose sub-steps had a line each

    def _so_far(self, extra: tuple[int, int] = (0, 0)) -> str:
        finished = [e for e in self.done.values() if e.get("finished")]
        robust = sum(int(e["robust"].sum()) for e in finished) + extra[0]
        seen = sum(len(e["robust"]) for e in finished) + extra[1]
        acc = 100 * robust / seen if seen else float("nan")
        return (f"robust accuracy so far {acc:.2f}% ({robust}/{seen} examples); "
                f"{self.passes.n - self.passes_at_start:,} forward passes; "
                f"{time.perf_counter() - self.t0:.1f} s")

    def sub_step(self, c: int, part: dict[str, Any]) -> None:
        """A sub-attack of chunk ``c`` finished (``part``: its ``done`` list, ``robust`` mask)."""
        steps, robust = part.get("done"), part.get("robust")
        if not distributed.is_main() or not steps or robust is None:
            return
        self.stepped.add(c)
        log.info("%s: %s done on chunk %d/%d; %s", self.name, steps[-1], c + 1, self.n_chunks,
                 self._so_far((int(robust.sum()), len(robust))))

    def chunk(self, c: int) -> None:
        """Chunk ``c`` finished (no line when its last sub-step had one)."""
        if self.n_chunks > 1 and c not in self.stepped and distributed.is_main():
            log.info("%s: chunk %d/%d done; %s", self.name, c + 1, self.n_chunks,
                     self._so_far())

    def finished(self, outcome: AttackOutcome) -> None:
        """The attack is done (``outcome``: gathered over the ranks)."""
        if not distributed.is_main():
            return
        n = len(outcome.robust)
        robust = int(outcome.robust.sum())
        acc = 100 * robust / n if n else float("nan")
        resumed = (f"; {outcome.resumed_chunks} chunk(s) resumed from the state file"
                   if outcome.resumed_chunks else "")
        log.info("%s done: robust accuracy %.2f%% (%d/%d examples); %s forward passes; "
                 "%.1f s%s", self.name, acc, robust, n, f"{outcome.forward_passes:,}",
                 time.perf_counter() - self.t0, resumed)


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


def finite_logits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> FiniteLogits:
    """How many examples get a NaN or infinite clean logit, and how many weights are NaN or
    infinite: a model that outputs NaN still has an argmax (class 0), so its accuracies look
    like chance instead of failing. One forward pass over ``x`` (float32, eval mode)."""
    device = torch.device(device)
    bad = 0
    with torch.no_grad(), eval_mode(model):
        for sl in chunks(len(x), batch_size):
            out = model(x[sl].to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            bad += int((~torch.isfinite(out.float().flatten(1))).any(1).sum())
        weights = sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values()
                      if t.is_floating_point() or t.is_complex())
    return FiniteLogits(len(x), bad, weights)


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
