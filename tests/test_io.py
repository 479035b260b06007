"""Atomic writes: the file is replaced whole and its directory synced where the file system can."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from flatspec_jax import io


def watch_directory_fsyncs(monkeypatch, fail_with: int | None = None) -> list[int]:
    """Records the inode of every directory os.fsync is called on, raising OSError(``fail_with``) for
    them when given; returns the list it fills."""
    real_fsync, synced = os.fsync, []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_ino)
            if fail_with is not None:
                raise OSError(fail_with, os.strerror(fail_with))
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    return synced


def test_atomic_write_replaces_the_file_and_syncs_its_directory(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    synced_directories = watch_directory_fsyncs(monkeypatch)
    io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert synced_directories == [tmp_path.stat().st_ino]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_cannot_sync_directories_keeps_the_write(tmp_path, monkeypatch, code):
    seen = watch_directory_fsyncs(monkeypatch, fail_with=code)
    io.atomic_write_text(tmp_path / "out.json", "new")
    assert seen and (tmp_path / "out.json").read_text() == "new"


def test_other_directory_sync_errors_are_raised(tmp_path, monkeypatch):
    watch_directory_fsyncs(monkeypatch, fail_with=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        io.atomic_write_text(tmp_path / "out.json", "new")
