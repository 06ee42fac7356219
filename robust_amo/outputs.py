"""Output folders: created and checked before any work, never silently overwritten.

Every command that writes results (``train``, ``eval``, ``margins``, ``convert-checkpoint``)
checks its output folder here first, so an unwritable ``out`` is a one-line error before minutes
of work, and a folder that already holds results is refused unless the user says how to go on
(``resume`` to continue, ``overwrite`` to start over). docs/checkpoints.md, "Reruns".

Every file a command writes goes through :func:`disk_writes` (or the writers here that use it),
so a full disk (ENOSPC) or an exhausted quota (EDQUOT) is the same one-line
:class:`~robust_amo.errors.OutputError` wherever it happens, and no write leaves half a file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, RobustAmoError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are not locked there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TEMP_GLOB = ".*.tmp"
"""Names of the temporary files :func:`robust_amo.checkpoint.atomic_save` writes before its
rename; one left behind was cut short by a kill."""


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
"""The errors of a write that more space would fix: a full device, an exhausted quota."""


def write_error(path: str | Path, error: OSError, *, kept: str | None = None) -> OutputError:
    """The one-line OutputError for a failed write of ``path``.

    Args:
        path: the file (or folder) being written.
        error: what the operating system said.
        kept: the file that is still intact (the previous checkpoint), for the message.
    """
    intact = f"; the previous {kept} is intact" if kept else ""
    if error.errno in DISK_FULL:
        return OutputError(f"no space left on the device holding {path}{intact}: free space and "
                           "run the command again (with resume to continue a run)",
                           params=("resume",))
    return OutputError(f"cannot write {path} ({error.strerror or error}){intact}; choose an out "
                       "folder you can write", params=("out",))


@contextlib.contextmanager
def disk_writes(path: str | Path, *, kept: str | None = None) -> Iterator[None]:
    """Turn an OSError of the writes inside into :func:`write_error`'s OutputError.

    The one handling of a full disk for every file a command writes (the lock file, metrics,
    pictures, checkpoints, reports); errors of ours that are OSErrors pass unchanged.

    Args:
        path: what the writes inside write, for the message.
        kept: the file that a failure leaves intact, for the message.
    """
    try:
        yield
    except RobustAmoError:
        raise
    except OSError as e:
        raise write_error(path, e, kept=kept) from None


def write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the open file ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``, all or nothing.

    The line goes out in one write; when the disk fills midway the file is cut back to its
    previous length, so a reader never meets half a line.

    Raises:
        OutputError: the line could not be written (:func:`write_error`).
    """
    data = (line + "\n").encode()
    with disk_writes(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                write_fd(fd, data)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


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
        if e.errno in DISK_FULL:
            raise write_error(p, e) from None
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
    file or the new one, never half of one (the temporary name matches :data:`TEMP_GLOB`).

    Raises:
        OutputError: the file could not be written (:func:`write_error`); the old one is kept.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    raw = data if isinstance(data, bytes) else data.encode()
    with disk_writes(p, kept=p.name if p.exists() else None):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_fd(fd, raw)
            finally:
                os.close(fd)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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


def _holder(fd: int) -> str:
    """The pid a lock file records (:func:`folder_lock` writes it), or ``unknown``."""
    return os.read(fd, 32).decode(errors="replace").strip() or "unknown"


def lock_holder(folder: str | Path) -> str | None:
    """The pid (as the lock file records it, else ``unknown``) of the live process holding
    ``folder``'s :func:`folder_lock`, or None when it is free (or on Windows, unlocked)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)  # releases the probe's own lock
    return None


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
    with disk_writes(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            raise OutputError(f"{p} is in use by another {what} (pid {holder}); wait for it to "
                              "finish or stop it, then run again") from None
        with disk_writes(path):
            os.ftruncate(fd, 0)
            write_fd(fd, str(os.getpid()).encode())  # who holds it, for the message above
        yield p
    finally:
        os.close(fd)  # releases the lock
