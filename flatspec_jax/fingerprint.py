"""Content identities of input files, for the fingerprints that tell a stage its outputs are current.

Identities depend on bytes and file names only (a data source's names are its files' paths below
their common directory), never on absolute paths or modification times, so every host of a pod
computes the same fingerprint from its own copy of the data and the model, and a moved run keeps
its outputs; editing a file in place changes them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable

from flatspec_jax.data.sources import source_files
from flatspec_jax.weights.reader import model_files

FULL_HASH_BYTES = 1 << 30
"""Files up to this size are identified by the sha256 of all their bytes."""
EDGE_BYTES = 16 << 20
"""Larger files (multi-GB weight shards) by their size and the sha256 of this many bytes at each end."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes; computed once per process for an unchanged file."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, None)


def file_identity(path: str | Path) -> str:
    """Hex digest identifying a file's contents: :func:`file_sha256` up to ``FULL_HASH_BYTES``, beyond
    that the size and the first and last ``EDGE_BYTES`` (rewritten weights change both ends)."""
    stat = os.stat(path)
    edges = None if stat.st_size <= FULL_HASH_BYTES else EDGE_BYTES
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, edges)


def files_identity(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """Hex digest of several files' names and contents, independent of their order; a name is the
    path below ``root`` (default: the file's base name, so the directories do not count)."""
    entries = sorted((Path(p).name if root is None else Path(p).relative_to(root).as_posix(), file_identity(p))
                     for p in paths)
    return hashlib.sha256(repr(entries).encode()).hexdigest()


def source_identity(source: str) -> str:
    """Identity of the files a ``data.source`` reads: contents and paths below their common directory
    (a glob over subdirectories reads them in path order, which decides ids and ``data.limit``)."""
    files = source_files(source)
    return files_identity(files, os.path.commonpath([Path(f).parent for f in files]))


def model_identity(model_path: str | Path) -> str:
    """Identity of the files a target model (GGUF file or HF directory) is loaded from."""
    return files_identity(model_files(model_path))


@functools.lru_cache(maxsize=512)
def _sha256(path: str, size: int, mtime_ns: int, edges: int | None) -> str:
    """Keyed on size and mtime as well, so a file rewritten during the process is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if edges is None:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f"{size}:".encode())
            digest.update(handle.read(edges))
            handle.seek(size - edges)
            digest.update(handle.read(edges))
    return digest.hexdigest()
