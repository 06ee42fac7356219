"""Output folders: created and checked before any work, never silently overwritten.

Every command that writes results (``train``, ``eval``, ``margins``, ``convert-checkpoint``)
checks its output folder here first, so an unwritable ``out`` is a one-line error before minutes
of work, and a folder that already holds results is refused unless the user says how to go on
(``resume`` to continue, ``overwrite`` to start over). docs/checkpoints.md, "Reruns".
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are not locked there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TEMP_GLOB = ".*.tmp"
"""Names of the temporary files :func:`robust_amo.checkpoint.atomic_save` writes before its
rename; one left behind was cut short by a kill."""


def writable_dir(path: str | Path, param: str = "out") -> Path:
    """``path`` as a folder that exists and can be written; OutputError otherwise.

    Args:
        path: the output folder (created with its parents).
        param: the parameter that named it, for the message (a front end says it its way).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} ({param}) is a file, not a folder; choose a folder",
                          params=(param,))
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write into {p} ({param}: {e.strerror or e}); choose a folder "
                          "you can write", params=(param,)) from None
    return p


def existing(folder: Path, names: Iterable[str]) -> list[str]:
    """Which of ``names`` exist in ``folder``."""
    return [n for n in names if (folder / n).exists()]


def refuse_overwrite(folder: Path, names: Iterable[str], what: str, *, overwrite: bool,
                     ways: str = "replace it (overwrite) or write elsewhere (out)",
                     params: tuple[str, ...] = ("overwrite", "out")) -> list[str]:
    """OutputError when ``folder`` holds any of ``names`` and ``overwrite`` is false.

    Args:
        folder: the output folder.
        names: the files that would be overwritten.
        what: what they are, for the message (``"report"``).
        overwrite: replace them.
        ways: how to go on, in parameter names.
        params: the parameters ``ways`` names (:class:`robust_amo.errors.RobustAmoError`).

    Returns:
        the names found (to delete when ``overwrite`` is true).
    """
    found = existing(folder, names)
    if found and not overwrite:
        raise OutputError(f"{folder} already holds a {what} ({', '.join(found)}); {ways}",
                          params=params)
    return found


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``path`` through a temporary file beside it and a rename: a kill leaves the old
    file or the new one, never half of one (the temporary name matches :data:`TEMP_GLOB`)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, p)
    return p


def remove_temp_files(folder: Path) -> int:
    """Delete temporary files left in ``folder`` by a write cut short; returns how many."""
    n = 0
    for t in folder.glob(TEMP_GLOB):
        if t.is_file():
            t.unlink(missing_ok=True)
            log.info("removed %s, left by a write that was cut short", t)
            n += 1
    return n


LOCK_NAME = ".robust-amo.lock"
"""The lock file :func:`folder_lock` holds in a folder while a command writes into it."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, param: str = "out") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` while a command writes into it.

    Two processes writing one run or study folder (a second ``robust-amo train --resume`` or
    ``reproduce`` started while the first still runs) would interleave their metrics and
    checkpoints; the second is refused instead. The lock is the operating system's (``flock``):
    it goes away with the process, however it ends, so a killed command never leaves a stale
    lock. Not available on Windows, where folders are not locked.

    Raises:
        OutputError: another process holds the lock (naming its pid when it wrote one).
    """
    p = writable_dir(folder, param)
    if fcntl is None:
        yield p
        return
    path = p / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise OutputError(f"{p} is in use by another {what} (pid {holder}); wait for it to "
                              "finish or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield p
    finally:
        os.close(fd)  # releases the lock
