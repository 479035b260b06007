"""Process-wide start-up shared by every CLI verb: logging, the JAX compilation cache, the cache root."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from flatspec_jax.config import ConfigError, DistributedConfig
from flatspec_jax.io import remove_temporaries

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Root of flatspec_jax's persistent caches (``$FLATSPEC_CACHE_DIR`` or ``~/.cache/flatspec_jax``)."""
    return Path(os.environ.get("FLATSPEC_CACHE_DIR", Path.home() / ".cache" / "flatspec_jax"))


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr (stdout is reserved for command results such as generated text);
    only JAX process 0 logs at INFO, the others only warnings."""
    level = logging.DEBUG if verbose else logging.INFO
    if jax.process_count() > 1 and jax.process_index() != 0:
        level = logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax._src", "orbax", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # orbax logs routine notices (read-only managers, async saves) as absl warnings.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # transformers (imported for the tokenizer only) advises at import that PyTorch is missing,
    # which no verb needs; a user's own setting of the variable wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if jax.process_count() > 1:  # initialize_distributed runs before logging is set up
        log.info("JAX process %d of %d (%d local devices)", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """An ``Event loop is closed`` RuntimeError raised where no Python object owns it: a TensorStore
    reader thread completing, after orbax's event loop has closed, one of the other reads of a
    restore that already failed (a damaged checkpoint step, reported by the verb on its own)."""
    exc = unraisable.exc_value
    return unraisable.object is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def ignore_closed_loop_callbacks() -> None:
    """Keeps those late callbacks (:func:`_is_closed_loop_callback`) out of stderr, where they
    buried the one-line error of a damaged checkpoint under tracebacks; every other unraisable
    exception still reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if _is_closed_loop_callback(unraisable):
            log.debug("ignored a callback onto a closed event loop: %s", unraisable.exc_value)
            return
        previous(unraisable)

    sys.unraisablehook = hook


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs across runs, so a second run skips compilation.

    Not over several CPU devices (forced host devices as in the multi-device tests, or CPU processes):
    there an executable XLA:CPU (jax 0.10.2) loads back from the cache can run a collective inside a
    while loop and an independent collective outside it in different orders on different devices, which
    deadlocks until XLA's 40 s rendezvous timeout aborts the process (about half of the warm-cache runs
    of a data 4 x tensor 2 scoring program; none freshly compiled). A single CPU device has no collectives.
    """
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        log.debug("persistent compilation cache left off over %d CPU devices", jax.device_count())
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _cluster_detected() -> bool:
    """True when the environment describes a multi-process job JAX can join by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # Inside an srun step (JAX's SLURM detection reads these); salloc / sbatch alone set only some of them.
    slurm_step = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in os.environ for name in slurm_step) and int(os.environ["SLURM_NTASKS"]) > 1:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Joins a multi-process JAX job when the config or the environment asks for one.

    Must run before anything touches a JAX backend. Fields left null are filled by JAX's
    own cluster detection (SLURM, Cloud TPU pods) or its ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` variables. On CPU the collectives go
    through gloo, so multi-process runs work without accelerators (tests, CI). A process
    that already joined (several CLI verbs run in one process) stays in its job.
    """
    enabled = cfg.enabled if cfg.enabled is not None else (
        cfg.coordinator_address is not None or _cluster_detected())
    if not enabled or jax.distributed.is_initialized():
        return
    num_processes = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, IndexError, TypeError) as err:  # what JAX raises for settings it cannot use
        raise ConfigError(f"distributed.*: cannot join the multi-process job with coordinator_address="
                          f"{cfg.coordinator_address!r}, num_processes={num_processes}, process_id={process_id} "
                          f"(null fields: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or cluster "
                          f"detection): {err}") from err


def _env_int(name: str) -> int | None:
    """The integer in environment variable ``name`` (None when unset or empty)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


LOCK_FILE = ".flatspec.lock"
STALE_TEMPORARIES_IN = (".", "features", "plots")
"""Run-directory folders whose atomic writes a killed run may have left half-written temporaries in:
the run directory itself, the feature cache (``stages.score.FEATURES_DIR``) and the plots
(``stages.report.PLOTS_DIR``)."""


class RunDirBusyError(RuntimeError):
    """Another flatspec process is working in the run directory."""


class Preempted(RuntimeError):
    """The job was told to stop (SIGTERM, e.g. a SLURM or TPU preemption, or a first Ctrl-C) and saved its work
    first."""


_told_to_stop = False
"""True once the job was told to stop: by SIGTERM or Ctrl-C under :func:`stop_when_told`, or at JAX's sync
point (a plain flag: the signal handler takes no lock the interrupted main thread might hold)."""
_stop_signal = signal.SIGTERM
"""The signal that told the job to stop: SIGINT when Ctrl-C came first, SIGTERM otherwise (JAX's sync point
is a preemption too)."""
_interrupted = False
"""True once Ctrl-C came under :func:`stop_when_told`: a second one stops the job at once."""
_checks = itertools.count()
"""The step ids :func:`reached_preemption` reports to JAX's preemption sync point."""


def told_to_stop() -> bool:
    """Whether :func:`reached_preemption` has said so (or a signal came since), without a check of its own."""
    return _told_to_stop


def stop_signal() -> int:
    """The signal the job stopped for (after :func:`reached_preemption` said so): the exit status is 128 + it."""
    return int(_stop_signal)


def stop_cause() -> str:
    """How messages name the stop: "interrupted (Ctrl-C)" or "preempted" (SIGTERM, JAX's sync point)."""
    return "interrupted (Ctrl-C)" if _stop_signal == signal.SIGINT else "preempted"


def _note_stop(signum: int, frame: Any) -> None:
    global _told_to_stop, _stop_signal, _interrupted
    if signum == signal.SIGINT:
        if _interrupted:
            raise KeyboardInterrupt
        _interrupted = True
        print("flatspec: Ctrl-C: stopping at the next point the work so far is saved (a training step, a part of "
              "scores or replies, an eval batch); Ctrl-C again stops at once", file=sys.stderr, flush=True)
    if not _told_to_stop:
        _stop_signal = signum
    _told_to_stop = True


@contextlib.contextmanager
def stop_when_told() -> Iterator[None]:
    """Inside the block a single-process job takes SIGTERM (a scheduler's preemption or ``kill``) and a first
    Ctrl-C (SIGINT) as a request to stop at the next :func:`reached_preemption` check, where its work is saved,
    instead of dying at once; a second Ctrl-C raises KeyboardInterrupt as usual.

    A process that joined a JAX job (``jax.distributed``, even of one process) leaves SIGTERM to JAX's
    preemption notifier, which makes the processes agree on the step to stop at, and Ctrl-C to Python.
    Outside the main thread (where Python cannot take signals) it does nothing.
    """
    if jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _note_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def reached_preemption() -> bool:
    """True once the job has been told to stop: the caller saves its work and raises :class:`Preempted`.
    Loops call it once per step (scoring and regeneration per part, training per step, eval per batch).

    A single process is told by SIGTERM or Ctrl-C under :func:`stop_when_told`. In a multi-process job SIGTERM goes
    to JAX's notifier and this is True from the check every process agreed on (JAX's preemption sync point,
    one past the furthest check any process had reached). JAX counts steps; here they are this process's
    checks so far, which every process makes in the same order, and which keep increasing through the
    loops of one command (a pipeline's score, train and eval); nothing else may report steps to it (the
    checkpoint manager's orbax calls are kept off it). Once True it stays True, so a later loop of the same
    command stops at its first check.
    """
    global _told_to_stop
    check = next(_checks)
    if _told_to_stop:
        return True
    try:
        reached = multihost_utils.reached_preemption_sync_point(check)
    except RuntimeError:  # jax_enable_preemption_service=False
        reached = False
    if reached:  # only ever set here: a signal noted meanwhile must not be overwritten
        _told_to_stop = True
    return _told_to_stop


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Holds an exclusive lock on ``run_dir`` (taken by JAX process 0) while a verb writes into it,
    so two commands on one run directory cannot interleave their outputs. The lock is released when
    the process ends, however it ends. Once it is held, temporaries a killed run left in the run
    directory and its ``features/`` and ``plots/`` are removed.

    Raises:
      RunDirBusyError: on every process when process 0 finds the directory locked, naming it and
        the holder's pid (process 0's answer is broadcast, so no process goes on alone); process 0
        raises its OSError when it cannot create or open the lock file.
    """
    with contextlib.ExitStack() as stack:
        refusal = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_locked(Path(run_dir)))
            except (RunDirBusyError, OSError) as err:  # OSError: the directory cannot be made or opened
                refusal = err
        if process_zero_says(refusal is not None):
            raise refusal or RunDirBusyError(f"run directory {run_dir} could not be locked by JAX process 0 (in "
                                             "use by another flatspec process, or not writable there)")
        yield


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    path = run_dir / LOCK_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirBusyError(f"run directory {run_dir} is in use by another flatspec process (pid {holder}); "
                                  "wait for it or use another --run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        removed = sum(remove_temporaries(run_dir / sub) for sub in STALE_TEMPORARIES_IN)
        if removed:
            log.info("removed %d temporary file(s) an interrupted run left in %s", removed, run_dir)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_zero_says(value: Any) -> np.ndarray:
    """Process 0's ``value`` (a bool or an array of the same shape on every process), on every process.

    Decisions read from the run directory (is an output current, which parts are written) must be
    the same on every process, or they would part ways and hang in a collective; the processes'
    views of a shared or bucket-mounted directory can lag behind process 0's writes.
    """
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
