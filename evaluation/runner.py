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

import functools
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
    keep_adv: bool = False,
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
        keep_adv: keep each attack's adversarial points of the examples it broke (in the
            state file too, so a resumed run still has them) for ``save_adv``.

    Each outcome carries its forward and backward passes (:class:`PassCounter`), work saved
    before a resume included.
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
            if keep_adv:
                # a chunk saved without its adversarial points (an earlier run without
                # save_adv) is attacked again
                for c in [c for c, e in done.items() if "adv" not in e]:
                    del done[c]
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
                meter = _ChunkMeter(passes, entry)

                def save_partial(part: dict[str, Any], c: int = c, meter: _ChunkMeter = meter,
                                 name: str = spec.name, done: dict[int, Any] = done,
                                 bar: Any = bar, tally: _Progress = tally) -> None:
                    meter.sub_step(part.get("done"))
                    done[c] = _kept({**part, **meter.figures(), "finished": False}, keep_adv)
                    state.save()
                    # AutoAttack saves after each of its attacks: show which have finished
                    bar.set_postfix_str("done: " + ", ".join(map(str, part.get("done", []))))
                    tally.sub_step(c, part)
                    if interrupt is not None:
                        interrupt(name, c)

                result = spec.run_chunk(model, x[sl].to(device), y[sl].to(device),
                                        torch.arange(sl.start, sl.stop), amp=amp,
                                        partial=entry, save_partial=save_partial)
                done[c] = _kept({**result, **meter.figures(), "finished": True}, keep_adv)
                state.save()
                tally.chunk(c)
                if interrupt is not None:
                    interrupt(spec.name, c)
            outcome = _collect(spec, [done[c] for c in mine], resumed)
            outcome = sharding.gather_outcome(outcome, n, batch_size)
            tally.finished(outcome)
            outcomes.append(outcome)
    return outcomes


class _ChunkMeter:
    """Time and passes of one chunk of one attack, work saved before a resume included, and
    the passes of each sub-step (AutoAttack's attacks) that reported itself done."""

    def __init__(self, passes: PassCounter, entry: dict[str, Any] | None) -> None:
        entry = entry or {}
        self.passes = passes
        self.t0 = time.perf_counter()
        self.start = passes.counts()
        self.mark = self.start
        self.spent = (entry.get("time", 0.0), entry.get("forward", 0), entry.get("backward", 0))
        self.sub: dict[str, list[int]] = {k: list(v)
                                          for k, v in entry.get("sub_passes", {}).items()}

    def sub_step(self, steps: list[str] | None) -> None:
        """The sub-step ``steps[-1]`` finished: the passes since the last one are its."""
        now = self.passes.counts()
        if steps:
            self.sub[steps[-1]] = [now[0] - self.mark[0], now[1] - self.mark[1]]
        self.mark = now

    def figures(self) -> dict[str, Any]:
        """The chunk entry's ``time``, ``forward``, ``backward`` (and ``sub_passes``)."""
        f, b = self.passes.counts()
        out: dict[str, Any] = {"time": self.spent[0] + time.perf_counter() - self.t0,
                               "forward": self.spent[1] + f - self.start[0],
                               "backward": self.spent[2] + b - self.start[1]}
        if self.sub:
            out["sub_passes"] = {k: list(v) for k, v in self.sub.items()}
        return out


def _kept(entry: dict[str, Any], keep_adv: bool) -> dict[str, Any]:
    """The chunk entry as saved: without the adversarial points unless they are wanted."""
    if not keep_adv:
        entry.pop("adv", None)
    return entry


class PassCounter:
    """Counts a model's forward and backward passes in example units while in use.

    A batch of 128 through the model is 128 forward passes; a gradient of 128 examples flowing
    back through it (``loss.backward()`` or ``torch.autograd.grad`` with respect to the input,
    as every attack takes it) is 128 backward passes, once per backward however many weights the
    model has. Forward passes are counted by a forward hook on the model, backward passes by a
    hook on the output tensor, which autograd calls when a gradient reaches that output. The
    model is wrapped once, so AutoAttack's calls (through the same module) count too; so does a
    backward of a part of the output (FAB's one backward per class is one pass per class).

    Attributes:
        forward, backward: the counts so far.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = 0
        self.backward = 0
        self._handle: Any = None

    @property
    def n(self) -> int:
        """The forward passes so far (the name the progress lines read)."""
        return self.forward

    def counts(self) -> tuple[int, int]:
        """``(forward, backward)`` so far."""
        return self.forward, self.backward

    def _count(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        batch = int(out.shape[0])
        self.forward += batch
        if out.requires_grad:
            out.register_hook(functools.partial(self._backward, batch))

    def _backward(self, batch: int, grad: torch.Tensor) -> None:
        self.backward += batch

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._count)
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
        log.info("%s done: robust accuracy %.2f%% (%d/%d examples); %s forward and %s backward "
                 "passes; %.1f s%s", self.name, acc, robust, n, f"{outcome.forward_passes:,}",
                 f"{outcome.backward_passes:,}", time.perf_counter() - self.t0, resumed)


def _collect(spec: EvalAttack, entries: list[dict[str, Any]], resumed: int) -> AttackOutcome:
    none = [torch.zeros(0, dtype=torch.bool)]  # a rank may get no chunk
    clean = torch.cat([e["clean"] for e in entries] or none)
    robust = torch.cat([e["robust"] for e in entries] or none)
    names = list(entries[0]["steps"]) if entries else []
    steps = {k: torch.cat([e["steps"][k] for e in entries]) for k in names}
    solo = list(entries[0].get("individual", {})) if entries else []
    individual = {k: torch.cat([e["individual"][k] for e in entries]) for k in solo}
    warns: list[str] = []
    sub: dict[str, list[int]] = {}
    for e in entries:
        for w in e.get("warnings", []):
            if w not in warns:
                warns.append(w)
        for k, (f, b) in e.get("sub_passes", {}).items():
            sub.setdefault(k, [0, 0])
            sub[k][0] += f
            sub[k][1] += b
    advs = [e["adv"] for e in entries if "adv" in e]
    adv = torch.cat(advs) if advs and len(advs) == len(entries) else None
    return AttackOutcome(spec, clean, robust, steps, warns,
                         sum(e.get("time", 0.0) for e in entries), resumed, spec.backend(),
                         forward_passes=sum(e.get("forward", 0) for e in entries),
                         backward_passes=sum(e.get("backward", 0) for e in entries),
                         sub_passes={k: (f, b) for k, (f, b) in sub.items()},
                         individual=individual, adv=adv)


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
