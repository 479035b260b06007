"""Test helper: runs ``flatspec`` commands in this process and records the files they write.

    python tests/multihost_worker.py AUDIT_LOG VERB ARGS... [--then VERB ARGS...]...

Each command goes through ``flatspec_jax.cli.main`` exactly as ``python -m flatspec_jax.cli``
would run it; several commands share the process (and its ``jax.distributed`` job) to save
the start-up time, with a barrier between them, as between separate CLI invocations (every
rank finishes one verb before any starts the next). On the first failing command the process
exits at once with its status (not waiting in ``jax.distributed``'s shutdown for the others).

Used by ``test_multihost.py`` to check that only JAX process 0 writes a run's outputs. A
``sys.addaudithook`` hook records every path this Python process opens for writing
(``open``/``os.open`` with write flags), creates (``tempfile.mkstemp``/``mkdtemp``), renames
onto (``os.rename``/``os.replace``) or deletes. Writes done inside C++ libraries (pyarrow's
own file I/O, tensorstore behind orbax) are invisible to it, but every stage output goes
through ``flatspec_jax.io.atomic_write`` (``mkstemp`` + ``os.replace``) or Python ``open``,
which are seen. The records are written to AUDIT_LOG as JSON lines ``[verb, event, path]``
at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_records: list[tuple[str, str, str]] = []
_verb = ["start-up"]
_active = True


def _path(value) -> str | None:
    if isinstance(value, int) or value is None:
        return None
    try:
        return os.path.abspath(os.fsdecode(value))
    except TypeError:
        return None


def _hook(event: str, args: tuple) -> None:
    if not _active:
        return
    name = None
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS):
            name = _path(path)
    elif event == "os.rename":
        name = _path(args[1])
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp", "os.remove", "shutil.rmtree"):
        name = _path(args[0])
    if name:
        _records.append((_verb[0], event, name))


def _dump(log_path: str) -> None:
    global _active
    _active = False
    records = list(_records)
    with open(log_path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


def split_commands(argv: list[str]) -> list[list[str]]:
    commands, current = [], []
    for arg in argv:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    return [*commands, current]


def main() -> int:
    log_path = sys.argv[1]
    atexit.register(_dump, log_path)
    sys.addaudithook(_hook)
    from flatspec_jax import cli

    for command in split_commands(sys.argv[2:]):
        _verb[0] = command[0]
        code = cli.main(command)
        if code:
            # jax.distributed's shutdown at exit would wait for the other processes, which may
            # be stuck in a collective waiting for this one: leave at once.
            _dump(log_path)
            sys.stderr.flush()
            os._exit(code)
        import jax

        if jax.process_count() > 1:
            # Separate CLI invocations end together before the next verb starts (a launcher
            # waits for every rank); keep that boundary between the commands of this process.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"multihost_worker: {command[0]} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
