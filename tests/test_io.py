"""Atomic writes: the file is replaced whole and its directory synced where the file system can."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from flatspec_jax import io


def directory_fsyncs_fail_with(monkeypatch, code: int) -> list[int]:
    """Makes os.fsync of a directory raise OSError(code); returns the directory fds it was called with."""
    real_fsync, seen = os.fsync, []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(fd)
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    return seen


def test_atomic_write_replaces_the_file_and_syncs_its_directory(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    real_fsync, synced_directories = os.fsync, []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_directories.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert synced_directories == [tmp_path.stat().st_ino]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_cannot_sync_directories_keeps_the_write(tmp_path, monkeypatch, code):
    seen = directory_fsyncs_fail_with(monkeypatch, code)
    io.atomic_write_text(tmp_path / "out.json", "new")
    assert seen and (tmp_path / "out.json").read_text() == "new"


def test_other_directory_sync_errors_are_raised(tmp_path, monkeypatch):
    directory_fsyncs_fail_with(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        io.atomic_write_text(tmp_path / "out.json", "new")
