"""The run folder of ``robust-amo train``: its file names, its metrics log, its lock, and the
checks before a run starts, continues or is started over in it.

A run folder holds ``checkpoint.pt`` (the last epoch), ``best.pt`` (the best robust accuracy of
the per-epoch check), ``metrics.jsonl`` (one JSON object per epoch), ``config.yaml`` (the
resolved config), ``curves.png`` and, with TensorBoard, ``tb/``. :class:`RunDir` is the one
place that knows these names; the trainer, the pictures, ``robust-amo plot``, the checkpoint
reader and the studies ask it. docs/architecture.md, "Run folder".
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig, rename_deprecated
from .errors import CheckpointError, ConfigError, OutputError
from .outputs import (
    LOCK_NAME,
    append_line,
    atomic_write,
    folder_lock,
    refuse_overwrite,
    remove_temp_files,
    writable_dir,
)

log = logging.getLogger(__name__)

LAST = "checkpoint.pt"
"""The checkpoint of the last finished epoch (what ``resume`` continues from)."""
BEST = "best.pt"
"""The checkpoint of the epoch with the best robust accuracy of the per-epoch check."""
METRICS = "metrics.jsonl"
"""One JSON object per finished epoch, appended as the run goes."""
CONFIG = "config.yaml"
"""The resolved config of the run."""
CURVES = "curves.png"
"""Loss, accuracy and learning rate per epoch, drawn at the end of training."""
TB_FOLDER = "tb"
"""TensorBoard's event files (``logging.tensorboard``)."""
LOCK = LOCK_NAME
"""The lock file a training process holds while it writes the folder."""

RUN_FILES = (LAST, BEST, METRICS)
"""What makes a folder hold a run: training into it needs ``resume`` or ``overwrite``."""

RESUME_FREE = frozenset({"epochs", "device", "out", "log_every", "logging.tensorboard",
                         "data.data_dir",
                         "data.download", "eval.batch_size", "eval.co_drop", "compile",
                         "compile_backend",
                         "compile_mode"})
"""Config keys a resumed run may change: more epochs, and what does not alter the trajectory
(where the data lies and the run is written, the device, progress output, compilation, the
evaluation batch size)."""

RESUME_ADVICE = ("start over (overwrite), or continue from the best epoch: copy best.pt over "
                 "checkpoint.pt and continue (resume)")
"""What to do when the last checkpoint cannot be resumed."""
RESUME_ADVICE_PARAMS = ("overwrite", "resume")
"""The parameters :data:`RESUME_ADVICE` names."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("model_kwargs", "method_args"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys (dotted) in which ``now`` differs from the ``saved`` config of a run.

    Keys of :data:`RESUME_FREE` are not compared, nor keys a file of an older version lacks.

    Returns:
        ``"KEY (SAVED -> NOW)"`` per differing key, sorted.
    """
    a, b = _flatten(rename_deprecated(saved, warn=False)), _flatten(now)
    return [f"{k} ({a[k]!r} -> {b.get(k)!r})" for k in sorted(a)
            if k in b and k not in RESUME_FREE and a[k] != b[k]]


def _parse(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Every non-blank line of a metrics file with its row, None for an unreadable line.

    A row is a JSON object with an ``epoch``; anything else (not JSON, not UTF-8) is a line a
    kill (or a full disk) cut short, or not ours.

    Raises:
        OutputError: the file exists but cannot be read.
    """
    lines: list[tuple[str, dict[str, Any] | None]] = []
    if not path.is_file():
        return lines
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OutputError(f"cannot read {path} ({e.strerror or e})") from None
    for b in raw.splitlines():
        ln = b.decode("utf-8", errors="replace")
        if not ln.strip():
            continue
        try:
            row = json.loads(b.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        lines.append((ln, row if isinstance(row, dict) and "epoch" in row else None))
    return lines


def read_metrics(run_or_file: str | Path) -> list[dict[str, Any]]:
    """The readable rows of a run's metrics.jsonl, in file order.

    Args:
        run_or_file: a run folder, or its metrics file itself.

    Returns:
        one dict per epoch logged (none when the file does not exist); unreadable lines are
        skipped.
    """
    p = Path(run_or_file)
    path = p if p.is_file() else RunDir(p).metrics
    return [row for _, row in _parse(path) if row is not None]


def epochs_done(rows: list[dict[str, Any]]) -> int:
    """The last epoch among metrics rows (:func:`read_metrics`); 0 for none."""
    return max((int(r.get("epoch", 0)) for r in rows), default=0)


@dataclass(frozen=True)
class RunDir:
    """One run folder: where its files are, and what it holds.

    A value object over the folder's path, so the trainer, the studies and ``plot`` pass one
    thing around and every file name comes from here. Nothing is created until
    :meth:`prepare`, :meth:`lock` or a write.
    """

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def last(self) -> Path:
        """The last epoch's checkpoint."""
        return self.path / LAST

    @property
    def best(self) -> Path:
        """The best epoch's checkpoint."""
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        """The metrics log."""
        return self.path / METRICS

    @property
    def config(self) -> Path:
        """The resolved config."""
        return self.path / CONFIG

    @property
    def curves(self) -> Path:
        """The training curves picture."""
        return self.path / CURVES

    @property
    def tb(self) -> Path:
        """The TensorBoard folder."""
        return self.path / TB_FOLDER

    def holds_run(self) -> bool:
        """A checkpoint or metrics are here: starting a run needs resume or overwrite."""
        return any((self.path / n).exists() for n in RUN_FILES)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The readable rows of metrics.jsonl (:func:`read_metrics`)."""
        return read_metrics(self.path)

    def epochs_done(self) -> int:
        """The last epoch logged in metrics.jsonl (0 for none)."""
        return epochs_done(self.read_metrics())

    def finished(self, epochs: int) -> bool:
        """All ``epochs`` are logged in metrics.jsonl."""
        return self.epochs_done() >= epochs

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row to metrics.jsonl, one JSON object on one line, all or
        nothing (:func:`robust_amo.outputs.append_line`: a full disk leaves the earlier lines
        as they were)."""
        append_line(self.metrics, json.dumps(row))

    def truncate_metrics(self, after_epoch: int) -> None:
        """Drop the lines of epochs past ``after_epoch`` (a run killed after logging them, before
        its checkpoint) and, with a warning, unreadable lines (one cut short by the kill)."""
        if not self.metrics.exists():
            return
        keep = []
        for ln, row in _parse(self.metrics):
            if row is None:
                log.warning("resume: dropping an unreadable line of %s: %.80s", self.metrics,
                            ln)
            elif row["epoch"] <= after_epoch:
                keep.append(ln)
        atomic_write(self.metrics, "".join(ln + "\n" for ln in keep))

    def read_config(self) -> dict[str, Any] | None:
        """The run's config.yaml as a mapping, for pictures and listings; None when it is
        missing or unreadable (a run's own checks read the checkpoint's config instead)."""
        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def write_config(self, cfg: TrainConfig) -> None:
        """Write the run's resolved config (config.yaml), atomically
        (:func:`robust_amo.outputs.atomic_write`: a full disk is one line and no half file);
        the text is :func:`robust_amo.config.save_yaml`'s."""
        atomic_write(self.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    @contextlib.contextmanager
    def lock(self) -> Iterator[Path]:
        """Hold the folder's lock while training writes it: a second trainer is refused
        (:func:`robust_amo.outputs.folder_lock`)."""
        with folder_lock(self.path, "robust-amo train") as p:
            yield p

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Check the folder before any work: writable, and not holding another run unless
        ``resume`` (continue it) or ``overwrite`` (delete its checkpoints, metrics, curves and
        TensorBoard events first); temporary files a kill left behind are removed.

        Raises:
            ConfigError: both ``resume`` and ``overwrite``.
            OutputError: the folder cannot be written, or holds a run and neither is given.
        """
        if resume and overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run or "
                              "start it over", params=("resume", "overwrite"))
        writable_dir(self.path)
        remove_temp_files(self.path)
        found = refuse_overwrite(
            self.path, RUN_FILES, "run", overwrite=overwrite or resume,
            ways="continue it (resume) or start over (overwrite, deletes it)",
            params=("resume", "overwrite"))
        if overwrite:
            for name in found:
                (self.path / name).unlink()
                log.info("overwrite: deleted %s", self.path / name)
            # the old run's pictures and TensorBoard events would mix with the new run's
            self.curves.unlink(missing_ok=True)
            if self.tb.is_dir():
                shutil.rmtree(self.tb)
                log.info("overwrite: deleted %s", self.tb)

    def check_resume(self, checkpoint: Mapping[str, Any], cfg: TrainConfig) -> None:
        """The last checkpoint (already read) may be continued under ``cfg``.

        Raises:
            CheckpointError: the config differs outside :data:`RESUME_FREE` (whether an older
                version drew the data differently is the data's question:
                :func:`robust_amo.data.check_split_version`).
        """
        differ = config_differences(checkpoint.get("config") or {}, cfg.to_dict())
        if differ:
            raise CheckpointError(
                f"cannot resume {self.last}: this run's config differs from the checkpoint's in "
                f"{', '.join(differ)}; resume with the run's own settings (its config.yaml), or "
                "start a new run (another out, or overwrite)", params=("out", "overwrite")
            )
