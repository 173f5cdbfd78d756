"""Atomic file writes: a file with its final name is always complete.

Every writer fills a temporary file beside the target (``.{name}.tmp-{pid}``), flushes and fsyncs it,
renames it over the target and fsyncs the directory, so a crash or a full disk leaves either the old
file or the new one, never a torn one; on failure the temporary file is removed. Temporary names
start with a dot and hold ``.tmp-``, so directory listings (``*.npz``, ``*.tar``) never pick them up
and :func:`remove_stale_temporaries` can clear those left by a killed process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_MARK = ".tmp-"


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a temporary binary file beside ``path``, then rename it into place.

    The parent directory is created if needed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return commit_temporary(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
