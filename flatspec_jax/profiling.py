"""Traces a few steps of a stage with ``jax.profiler``, for XProf or TensorBoard's profile plugin.

``profile.steps`` consecutive steps (scoring batches, training steps), starting at the
``profile.start``-th step the command runs, are traced on process 0 into
``run_dir/profile/<stage>/plugins/profile/<time>/<host>.xplane.pb`` (with a Perfetto
``trace.json.gz``). Each traced step is annotated with its number, so the trace viewer's step
view separates them; the trace ends after the last traced step's device work has finished.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, ContextManager

import jax

from flatspec_jax.config import ProfileConfig

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces steps ``first`` .. ``first + count - 1`` (1-based, counted among the steps this command
    runs) into ``directory``; with ``directory`` None or ``count`` 0 it does nothing.

    Use as a context manager around the loop (a loop that ends early still closes the trace), with
    :meth:`step` around each step and :meth:`step_done` after it.
    """

    def __init__(self, directory: Path | None, first: int = 1, count: int = 0, name: str = "step"):
        self._directory = directory if count > 0 else None
        self._first, self._last = first, first + count - 1
        self._name = name
        self._tracing = False
        self._traced = 0

    @classmethod
    def for_stage(cls, cfg: ProfileConfig, run_dir: Path, stage: str) -> StepProfiler:
        """The profiler of ``stage`` (``run_dir/profile/<stage>``); only process 0 traces."""
        directory = run_dir / PROFILE_DIR / stage if jax.process_index() == 0 else None
        return cls(directory, cfg.start, cfg.steps, stage)

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tracing:
            self._stop()

    def step(self, number: int) -> ContextManager[Any]:
        """The context of step ``number``: starts the trace at the first traced step and annotates it."""
        if self._directory is not None and number == self._first:
            self._directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._directory))
            self._tracing = True
        if not self._tracing:
            return contextlib.nullcontext()
        self._traced = number
        return jax.profiler.StepTraceAnnotation(self._name, step_num=number)

    def step_done(self, number: int, outputs: Any) -> None:
        """After step ``number``: at the last traced step, waits for ``outputs`` (a pytree of arrays)
        and ends the trace."""
        if self._tracing and number >= self._last:
            jax.block_until_ready(outputs)
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self._tracing = False
        log.info("wrote a trace of %s steps %d-%d to %s", self._name, self._first, self._traced, self._directory)
