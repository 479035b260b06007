"""Atomic file writes: a reader never sees a half-written file, and a crash never destroys the old one."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp's are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, fsyncs it, then renames it over ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either the old or the new
    content, whatever happens mid-write (including ``kill -9``); the directory is fsynced after
    it, so that a host crash or power loss cannot undo a rename that has returned.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable; a no-op where the file system cannot sync a
    directory (some FUSE and network mounts answer EINVAL or ENOTSUP): the file is written
    either way, and failing here would discard finished work."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Writes JSON with sorted keys and a trailing newline (byte-for-byte reproducible)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_temporaries(directory: str | Path) -> int:
    """Deletes the temporary files :func:`atomic_write` left in ``directory`` when a process was killed
    mid-write (``.<name>.<random>.tmp``); call it only while no writer can be active there. Returns
    how many were removed."""
    removed = 0
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
