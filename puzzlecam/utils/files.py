"""Atomic file writes: a file with its final name is always complete.

Every writer fills a temporary file beside the target (``.{name}.tmp-{pid}``), flushes and fsyncs it,
renames it over the target and fsyncs the directory, so a crash or a full disk leaves either the old
file or the new one, never a torn one; on failure the temporary file is removed. Temporary names
start with a dot and hold ``.tmp-``, so directory listings (``*.npz``, ``*.tar``) never pick them up
and :func:`remove_stale_temporaries` can clear those left by a killed process.

A write that fails because the disk is full, over quota or read-only raises
:class:`~puzzlecam.errors.DiskError` with one line naming the device and the path
(:func:`disk_problem`), after the temporary file is gone.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from puzzlecam.errors import DiskError, UsageError

TEMP_MARK = ".tmp-"
# What the errno of a failed write says about the disk.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EROFS: "read-only file system",
}
# Writers that lose the errno (torch.save's C++ stream: "basic_ios::clear: iostream error") are judged by
# the file system itself: this little space left right after the failure means it was full.
_NEARLY_FULL_BYTES = 1 << 20


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def is_temporary(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_temporary(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a finished temporary file over ``path`` and make the rename durable."""
    path = Path(path)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    return path


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _device_of(mount: Path) -> str:
    """The device mounted at ``mount`` (the last matching line of /proc/self/mounts is the one in effect)."""
    device = str(mount)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1] == str(mount):
                    device = fields[0]
    except OSError:
        pass
    return device


def _exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_problem(path: str | os.PathLike, exc: BaseException) -> str | None:
    """One line saying why writing ``path`` failed when the disk is the cause (full, over quota,
    read-only), else None. Call it before removing what the failed write left, so that a full disk
    still looks full."""
    path = Path(path)
    mount = _mount_point(path)
    where = f"{_device_of(mount)} (mounted at {mount}) while writing {path}"
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return f"{_DISK_ERRNOS[e.errno]} {where}"
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    try:
        st = os.statvfs(mount)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return f"read-only file system {where}"
    if st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES:
        return f"no space left on {where}"
    return None


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file if it is there; a clean-up after a failure must not raise a second error
    (a read-only file system refuses even the removal of a file that does not exist)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def raise_disk_problem(path: str | os.PathLike, exc: BaseException) -> None:
    """Raise :class:`DiskError` (from ``exc``) when the disk made writing ``path`` fail; else return."""
    message = disk_problem(path, exc)
    if message is not None:
        raise DiskError(message) from exc


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a temporary binary file beside ``path``, then rename it into place.

    The parent directory is created if needed. Returns ``path``. A full or read-only disk raises
    :class:`~puzzlecam.errors.DiskError` naming the device and ``path``; nothing is left behind.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return commit_temporary(tmp, path)
    except BaseException as exc:
        message = disk_problem(path, exc) if isinstance(exc, Exception) else None
        remove_quietly(tmp)
        if message is not None:
            raise DiskError(message) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / Inf float replaced by None: JSON has no such numbers (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with a final newline; NaN / Inf are written as null (:func:`json_safe`)."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` left in ``directory`` by a crashed run.

    Call it only where no other process is writing into ``directory`` at the time.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.is_file() and is_temporary(p)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


@contextmanager
def output_directory(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Check that ``path`` can be an output directory (a usage error naming ``flag`` if a file is in the way);
    if the block fails, the directories it created and left empty are removed again.

    The directory itself is created by the first file written into it (:func:`atomic_write`).
    """
    path = Path(path)
    existing, created = path, []
    while not existing.exists() and existing.parent != existing:
        created.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = f"{flag} {path}" if existing == path else f"{flag} {path}: {existing}"
        raise UsageError(f"{where} is not a directory")
    try:
        yield path
    except BaseException:
        for directory in created:  # innermost first; a directory that holds anything stays
            try:
                directory.rmdir()
            except OSError:
                break
        raise
