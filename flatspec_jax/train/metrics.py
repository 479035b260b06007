"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events.

A logged step's record holds the training batch's metrics (``loss``, ``loss_*``, agreement,
``grad_norm``, ``lr``, ``tokens``: the step's non-padding tokens over all processes, and
``tokens_per_s`` since the previous logged step, held-out evaluation time and a process's first step
(which compiles) excluded, so a record of that first step has none, and on
backends that keep allocator statistics (GPU, TPU; not CPU) ``device_peak_gib``: the peak memory
in use on any of process 0's devices so far, GiB) and, when
the step is evaluated (an evaluated step is always logged), the held-out ones (``eval_``
prefixed). The step-0 record is the untrained head's baseline: its loss terms and agreement on
the first training batch and its held-out metrics.

Only JAX process 0 writes. On resume the log is cut back to the restored step, so the
resumed run's log equals an uninterrupted run's instead of holding the lost steps twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax

from flatspec_jax.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
HELDOUT_PREFIX = "eval_"
"""Prefix of the held-out metrics' keys (``eval_loss``, ``eval_top1``, ...)."""


def device_peak_gib(devices: list[jax.Device] | None = None) -> float | None:
    """The highest ``peak_bytes_in_use`` of ``devices`` (default: this process's), in GiB; None where
    the backend keeps no allocator statistics (CPU)."""
    stats = [device.memory_stats() for device in (devices or jax.local_devices())]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) / 2**30 if peaks else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``: one JSON object per line.

    A line that is not a complete JSON object -- the last line of a killed run, or one a resumed
    run appended after it -- is skipped with a warning naming the file and line.
    """
    path = Path(path)
    records, bad = [], []
    if not path.exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        log.warning("%s: skipped %d incomplete or invalid line(s) (line %s)", path, len(bad),
                    ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else ""))
    return records


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and TensorBoard scalars to ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / METRICS_FILE
        self._writer = None
        if not self.enabled:
            return
        # Records past the restored step are redone; so is the untrained baseline (step 0) of a run
        # that restarts without a checkpoint.
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= resume_step] if resume_step else []
        if kept != records or not self._holds_exactly(kept):
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, writer process only

        self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _holds_exactly(self, records: list[dict[str, Any]]) -> bool:
        """The file is these records' lines and nothing else (a killed run can leave a cut last line,
        which the next record would be appended onto)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return text == "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
