"""AutoAttack (Croce & Hein 2020) through the official attack code, never a reimplementation.

Two distributions carry the same attacks under different wrappers; :func:`autoattack_backend`
picks the first importable one:

- ``autoattack`` (github.com/fra31/auto-attack, installed from its repository):
  ``AutoAttack(model, norm=, eps=, seed=, verbose=, attacks_to_run=, version=, device=)`` and
  ``run_standard_evaluation(x, y, bs=, return_labels=)``; its checks print "Warning: ..." lines.
- ``pyautoattack`` (PyPI): ``AutoAttack(model, attacks=, device=, eps=, norm=, seed=, version=)``
  and ``run_standard_evaluation(x, y, batch_size=)`` returning ``(x_adv, y_adv)``; its checks
  log to the ``auto-attack`` logger.

The adapter runs the attacks of a version one at a time (version parameters such as restarts and
target classes are those AutoAttack sets for the version), each only on the examples every
earlier attack failed to break, exactly as ``run_standard_evaluation`` does on a batch. Running
one attack per call lets a killed evaluation continue after the last finished attack with the
same result as an uninterrupted run (the attacks reseed from ``seed`` at every call). AutoAttack
reseeds torch's global RNG; the adapter restores it afterwards. AutoAttack's own checks
(randomised or dynamic defence, probabilities instead of logits, too many target classes, Square
beating the gradient attacks) stay on; their messages are collected into the result.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as metadata
import inspect
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_amo.errors import RobustAmoError
from robust_amo.runtime import eval_mode

log = logging.getLogger(__name__)

BACKENDS = ("autoattack", "pyautoattack")
VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSION_ATTACKS = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}
_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


@dataclass(frozen=True)
class AutoAttackSettings:
    """One AutoAttack evaluation.

    Attributes:
        eps: radius in [0, 1] pixel units.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"``, ``"rand"`` or
            ``"custom"`` (the attacks in ``attacks``).
        attacks: the attack list for ``version="custom"`` (names in :data:`ATTACKS`).
        seed: AutoAttack's seed (it reseeds every attack call with it).
        backend: ``"autoattack"``, ``"pyautoattack"`` or None for the first installed.
        individual: run every attack on every clean-correct example (AutoAttack's
            ``run_standard_evaluation_individual``) instead of only on those the earlier
            attacks left standing; each attack's own robust set is then known, and the
            robust set of the whole is their intersection (default False: the cascade).
    """

    eps: float
    norm: str = "linf"
    version: str = "standard"
    attacks: tuple[str, ...] = ()
    seed: int = 0
    backend: str | None = None
    individual: bool = False

    def __post_init__(self) -> None:
        if self.norm not in _NORMS:
            raise RobustAmoError(f"AutoAttack norm {self.norm!r} is not one of "
                                 f"{', '.join(_NORMS)}")
        if self.version not in VERSIONS:
            raise RobustAmoError(f"AutoAttack version {self.version!r} is not one of "
                                 f"{', '.join(VERSIONS)}")
        if self.version == "custom":
            bad = [a for a in self.attacks if a not in ATTACKS]
            if not self.attacks or bad:
                raise RobustAmoError(
                    f"AutoAttack custom version needs a list of attacks from {', '.join(ATTACKS)}"
                    f" (e.g. aa_attacks apgd-ce,square); got {list(self.attacks)}",
                    params=("aa_attacks",))
        elif self.attacks:
            raise RobustAmoError(f"AutoAttack version {self.version!r} fixes its attacks; use "
                                 "the custom version to choose them")
        if self.backend is not None and self.backend not in BACKENDS:
            raise RobustAmoError(f"AutoAttack backend {self.backend!r} is not one of "
                                 f"{', '.join(BACKENDS)}")

    @property
    def attack_list(self) -> list[str]:
        """The attacks run, in order."""
        return list(self.attacks) if self.version == "custom" else VERSION_ATTACKS[self.version]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports and state files (backend resolved by the caller)."""
        d = asdict(self)
        d["attacks"] = self.attack_list
        if not self.individual:  # the cascade's settings read as they did before the option
            del d["individual"]
        return d


@dataclass
class AutoAttackResult:
    """Per-example outcome of :func:`autoattack_robust` on B examples.

    Attributes:
        clean: (B,) bool, classified correctly without attack.
        robust: (B,) bool, not broken by any attack of the list.
        after_attack: attack name -> (B,) bool, robust after that attack and all before it.
        x_adv: (B, ...) the adversarial point of each broken example (the first attack's that
            broke it), else the input; examples broken before a resume keep the input unless
            the state held their points (``adv``).
        warnings: the messages of AutoAttack's checks (deduplicated, in order).
        done: the attacks finished so far (all of them unless interrupted).
        individual: with ``settings.individual``, attack name -> (B,) bool, robust under that
            attack alone (run on every clean-correct example); else empty.
    """

    clean: torch.Tensor
    robust: torch.Tensor
    after_attack: dict[str, torch.Tensor]
    x_adv: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    individual: dict[str, torch.Tensor] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """What must be saved to continue after ``done`` (CPU masks, no images: the broken
        examples' points are :meth:`adv`, saved only when wanted)."""
        return {"clean": self.clean.cpu(), "robust": self.robust.cpu(),
                "after_attack": {k: v.cpu() for k, v in self.after_attack.items()},
                "individual": {k: v.cpu() for k, v in self.individual.items()},
                "warnings": list(self.warnings), "done": list(self.done)}

    def adv(self) -> torch.Tensor:
        """The adversarial points of the broken examples (``clean & ~robust``, in order)."""
        return self.x_adv[self.clean & ~self.robust].cpu()


def autoattack_backend(preferred: str | None = None) -> tuple[str, Any]:
    """``(name, module)`` of the AutoAttack distribution to use.

    Raises:
        RobustAmoError: none is installed (or not the preferred one).
    """
    names = [preferred] if preferred else list(BACKENDS)
    for name in names:
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    raise RobustAmoError(
        "AutoAttack is not installed: `pip install pyautoattack`, or install the official "
        "repository with `pip install git+https://github.com/fra31/auto-attack`"
        + (f" (asked for backend {preferred!r})" if preferred else ""))


def backend_version(name: str, module: Any) -> str:
    """``name version`` for reports: ``pyautoattack 0.2.0``, ``autoattack 0.1 (git 1a2b3c4d5e6f)``.

    The version comes from the installed distribution that provides the module (its metadata),
    else the module's ``__version__``; the commit from the distribution's ``direct_url.json``
    (``pip install git+https://...``) or, for a module imported from a git checkout, from that
    checkout's ``HEAD``. ``unknown`` only when none of these exists.
    """
    version = _dist_version(name)
    if version is not None:  # installed: its metadata says what it is
        commit = _pip_commit(name)
    else:  # imported from a folder on the path, such as a clone of the repository
        version = getattr(module, "__version__", None)
        commit = _checkout_commit(getattr(module, "__file__", None))
    if version and commit:
        return f"{name} {version} (git {commit[:12]})"
    if commit:
        return f"{name} git {commit[:12]}"
    return f"{name} {version or 'unknown'}"


def _distributions(module_name: str) -> list[str]:
    """The installed distributions that may provide ``module_name``: the one of that name (both
    AutoAttack distributions are named as their module), else those whose files hold it."""
    try:
        metadata.distribution(module_name)
        return [module_name]
    except metadata.PackageNotFoundError:
        return _providers().get(module_name, [])


@functools.lru_cache(maxsize=1)
def _providers() -> dict[str, list[str]]:
    # reads every installed distribution's file list (a second or so): once per process
    return dict(metadata.packages_distributions())


def _dist_version(module_name: str) -> str | None:
    for dist in _distributions(module_name):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _pip_commit(module_name: str) -> str | None:
    """The commit a distribution was installed from (PEP 610 ``direct_url.json``), if any."""
    for dist in _distributions(module_name):
        try:
            text = metadata.distribution(dist).read_text("direct_url.json")
        except metadata.PackageNotFoundError:
            continue
        if text:
            try:
                commit = json.loads(text).get("vcs_info", {}).get("commit_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(commit, str) and commit:
                return commit
    return None


def _checkout_commit(module_file: str | None) -> str | None:
    """The ``HEAD`` commit of the git checkout holding ``module_file`` (read from ``.git``
    without running git), or None; never for a file of an installed environment, which may lie
    inside an unrelated checkout (pyenv's, a home folder's)."""
    if not module_file or {"site-packages", "dist-packages"} & set(Path(module_file).parts):
        return None
    for folder in Path(module_file).resolve().parents:
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = git.read_text(errors="replace").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (folder / text.split(":", 1)[1].strip()).resolve()
        if git.is_dir():
            return _head_commit(git)
    return None


def _head_commit(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        # a worktree keeps its HEAD but shares the refs of the main repository
        common = git / "commondir"
        roots = [git] + ([(git / common.read_text().strip()).resolve()]
                         if common.is_file() else [])
        for root in roots:
            if (root / ref).is_file():
                return (root / ref).read_text().strip() or None
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
    except OSError:
        return None
    return None


class LogitsOnly(nn.Module):
    """The model as AutoAttack wants it: eval mode, float32 logits only, no extra outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()


class _Collect(logging.Handler):
    """Collects the records AutoAttack logs at WARNING or above."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def _capture(sink: list[str]):
    """Route AutoAttack's check messages (logger, warnings, printed 'Warning:' lines) to sink."""
    handler = _Collect(sink)
    aa_log = logging.getLogger("auto-attack")
    aa_log.addHandler(handler)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            yield
    finally:
        aa_log.removeHandler(handler)
        for w in caught:
            # AutoAttack's checks warn with the bare Warning class; library noise stays out
            if w.category is Warning:
                sink.append(str(w.message))
            else:
                log.debug("warning during AutoAttack: %s", w.message)
        for line in out.getvalue().splitlines():
            if "warning" in line.lower():
                sink.append(line.split(":", 1)[1].strip() if ":" in line else line.strip())


class _Runner:
    """One constructed AutoAttack object and a uniform ``run(attack, x, y) -> (x_adv, y_adv)``."""

    def __init__(self, model: nn.Module, settings: AutoAttackSettings, device: torch.device):
        self.name, mod = autoattack_backend(settings.backend)
        self.version = backend_version(self.name, mod)
        norm = _NORMS[settings.norm]
        version = settings.version
        if self.name == "pyautoattack":
            self.aa = mod.AutoAttack(
                model, attacks=settings.attack_list if version == "custom" else None,
                device=device, eps=settings.eps, norm=norm, seed=settings.seed, version=version)
        else:
            self.aa = mod.AutoAttack(
                model, norm=norm, eps=settings.eps, seed=settings.seed, verbose=False,
                attacks_to_run=settings.attack_list if version == "custom" else [],
                version=version, device=device)
        params = inspect.signature(self.aa.run_standard_evaluation).parameters
        self._labels = "return_labels" in params
        self._bs_kw = "batch_size" if "batch_size" in params else "bs"

    def run(self, attack: str, x: torch.Tensor, y: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        self.aa.attacks_to_run = [attack]
        kw: dict[str, Any] = {self._bs_kw: len(y)}
        if self._labels:
            kw["return_labels"] = True
        out = self.aa.run_standard_evaluation(x, y, **kw)
        if isinstance(out, tuple):
            return out[0], out[1]
        with torch.no_grad():
            return out, self.aa.model(out).argmax(1)


def autoattack_robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AutoAttackSettings,
    *,
    state: dict[str, Any] | None = None,
    adv: torch.Tensor | None = None,
    on_step: Callable[[AutoAttackResult], None] | None = None,
) -> AutoAttackResult:
    """AutoAttack on one batch (B ≤ a few hundred: it is AutoAttack's batch).

    Args:
        model: classifier returning logits for inputs in [0, 1]; wrapped in :class:`LogitsOnly`
            and run in eval mode (mode restored afterwards), float32.
        x: clean inputs (B, C, H, W) in [0, 1]; y: labels (B,).
        settings: the version, eps, norm and seed.
        state: a :meth:`AutoAttackResult.state` saved by ``on_step`` of an interrupted call;
            the attacks in its ``done`` are not run again.
        adv: the :meth:`AutoAttackResult.adv` saved with ``state`` (the points of the examples
            broken before the interruption), or None (they keep the input).
        on_step: called after every finished attack (save the state there to make the run
            resumable).

    Returns:
        :class:`AutoAttackResult` with per-example masks.
    """
    x, y = x.detach().float(), y.detach()
    dev = x.device
    with eval_mode(model):
        wrapped = LogitsOnly(model).eval()
        if state is None:
            with torch.no_grad():
                clean = wrapped(x).argmax(1) == y
            res = AutoAttackResult(clean, clean.clone(), {}, x.clone())
        else:
            res = AutoAttackResult(
                state["clean"].to(dev), state["robust"].to(dev),
                {k: v.to(dev) for k, v in state["after_attack"].items()},
                x.clone(), list(state["warnings"]),
                list(state["done"]),
                {k: v.to(dev) for k, v in state.get("individual", {}).items()})
            if adv is not None:
                res.x_adv[res.clean & ~res.robust] = adv.to(dev, x.dtype)
        runner = None
        for attack in settings.attack_list:
            if attack in res.done:
                continue
            # the cascade attacks what is still standing; individual, every clean-correct one
            # (as run_standard_evaluation_individual does)
            todo = res.clean if settings.individual else res.robust
            idx = todo.nonzero().squeeze(1)
            alone = res.clean.clone()
            if idx.numel() > 0:
                runner = runner or _Runner(wrapped, settings, dev)
                found: list[str] = []
                with _capture(found), torch.random.fork_rng(devices=_cuda_devices(dev)):
                    xa, ya = runner.run(attack, x[idx], y[idx])
                for msg in found:
                    if msg not in res.warnings:
                        res.warnings.append(msg)
                broken = ya.to(dev) != y[idx]
                alone[idx[broken]] = False
                # an example keeps the point of the first attack that broke it
                first = idx[broken & res.robust[idx]]
                res.x_adv[first] = xa.to(dev)[broken & res.robust[idx]]
                res.robust[idx[broken]] = False
            if settings.individual:
                res.individual[attack] = alone
            res.after_attack[attack] = res.robust.clone()
            res.done.append(attack)
            if on_step is not None:
                on_step(res)
        return res


def _cuda_devices(dev: torch.device) -> list[int]:
    if dev.type == "cuda":
        return [dev.index if dev.index is not None else torch.cuda.current_device()]
    return []
