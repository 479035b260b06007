"""Grain pipelines that stream packed training rows of the selected samples.

    TokenizedDataset (tokens.npz)  --filter: selection manifest, minus held-out tail-->
    best-fit packing plan (fixed rows of row_length)  -->  grain.MapDataset.source(rows)
    -> shuffle(seed) -> repeat() (reshuffled each epoch) -> [process slice]
    -> map(materialise row) -> batch(rows per process) -> to_iter_dataset() [-> mp_prefetch]

Rows are planned once from the sample lengths, so every epoch sees the same fixed-shape
rows in a new order. The stream is a random-access ``MapDataset`` of global batches, so the
iterator's state is one number, the global batches yielded so far (:class:`TrainingBatches`):
the same on every process, and valid for any ``data.num_workers`` and any number of
processes. Orbax saves it with every checkpoint, so a resumed run replays exactly the
batches an uninterrupted run would have seen. Each JAX process reads only its own slice
of every global batch.

Shape legend: R rows per batch (this process's share), L row length, M segment slots.
"""

from __future__ import annotations

import signal
from typing import Any, Sequence

import grain
import jax
import ml_dtypes
import numpy as np

from flatspec_jax.config import ConfigError
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.data.packing import pack_rows, plan_rows, segment_slots
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.selection import ManifestError


def train_and_heldout_indices(dataset: TokenizedDataset, heldout: int,
                              selected_ids: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices to train on (the selection, or all) and the held-out tail.

    The last ``heldout`` samples in file order are never trained on, whatever the
    selection says, so held-out metrics stay honest.

    Raises:
      ValueError: naming an id of the selection that the tokenized data does not have.
    """
    n = len(dataset)
    if heldout >= n:
        raise ConfigError(f"data.heldout={heldout} leaves no training sample out of {n}")
    heldout_indices = np.arange(n - heldout, n)
    if selected_ids is None:
        return np.arange(n - heldout), heldout_indices
    position = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    missing = [s for s in selected_ids if s not in position]
    if missing:
        raise ManifestError(f"the selection manifest (data.selection) names sample {missing[0]!r} ({len(missing)} in "
                            "all) that the tokenized data does not contain; was it made from another data config?")
    chosen = np.asarray(sorted(position[s] for s in selected_ids), np.int64)
    return chosen[chosen < n - heldout], heldout_indices


def plan_training_rows(dataset: TokenizedDataset, indices: np.ndarray, row_length: int) -> list[tuple[int, ...]]:
    """Best-fit packing of the given samples (truncated to ``row_length``) into rows of dataset indices."""
    lengths = [min(int(dataset.lengths[i]), row_length) for i in indices]
    rows = plan_rows(lengths, row_length, segment_slots(row_length))
    return [tuple(int(indices[j]) for j in row) for row in rows]


class _MaterializeRow(grain.transforms.Map):
    """Row of sample indices -> packed arrays: ``tokens``, ``positions``, ``segment_ids``, ``loss_mask``
    ([L] int32) and, with a feature cache, ``features`` ([L, D] bfloat16, zeros on padding)."""

    def __init__(self, dataset: TokenizedDataset, row_length: int, features: FeatureCache | None):
        self._dataset = dataset
        self._row_length = row_length
        self._features = features

    def _sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self._dataset[index]
        return ids[:self._row_length], mask[:self._row_length]

    def map(self, row: tuple[int, ...]) -> dict[str, np.ndarray]:
        packed = pack_rows([row], self._sample, self._row_length, segment_slots(self._row_length))
        out = {"tokens": packed.tokens[0], "positions": packed.positions[0],
               "segment_ids": packed.segment_ids[0], "loss_mask": packed.loss_mask[0]}
        if self._features is not None:
            features = np.zeros((self._row_length, self._features.hidden_size), ml_dtypes.bfloat16)
            offset = 0
            for index in row:
                sample = self._features[index][:self._row_length]
                features[offset:offset + len(sample)] = sample
                offset += len(sample)
            out["features"] = features
        return out


_MAX_BATCHES = 2**50
"""Global batches an endless training stream is said to hold: far more than any run takes."""


class _ProcessRows(grain.MapDataset):
    """This process's share of every global batch of an (infinite) row stream.

    Global batch b is rows [b*G, (b+1)*G) of the stream; the process reads the rows at
    ``positions`` of each, the rows its devices hold (:func:`~flatspec_jax.sharding.process_rows`).
    So every row sits at the same place of the same global batch however many processes share
    the work, and multi-process runs reproduce single-process ones.
    """

    def __init__(self, parent: grain.MapDataset, global_rows: int, positions: np.ndarray):
        super().__init__(parent)
        self._global = global_rows
        self._positions = np.asarray(positions, np.int64)
        # The endless stream's length (sys.maxsize) capped to what grain's batching keeps exact: it counts
        # batches with a float ceil, and 2**63 - 1 rows in batches of one rounded up past an index.
        self._length = min(len(parent) // global_rows, _MAX_BATCHES) * len(self._positions)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        block, row = divmod(index, len(self._positions))
        return self._parent[block * self._global + int(self._positions[row])]


class TrainingBatches:
    """An endless iterator over a ``MapDataset`` of batches, checkpointed as the number it has yielded.

    Grain's own iterator state depends on the worker count (per-worker positions with
    ``mp_prefetch``) and is saved per process, so a run could not resume with another
    ``data.num_workers`` or on another number of hosts. Batch ``b`` of the dataset is global
    batch ``b`` on every process, so ``{"next_batch": b}`` is the whole state: restoring it
    restarts the stream at that batch, with ``num_workers`` worker processes (0: in process).
    """

    STATE_KEY = "next_batch"

    def __init__(self, batches: grain.MapDataset, num_workers: int = 0):
        self._batches = batches
        self._num_workers = num_workers
        self._position = 0
        self._iterator = self._start()

    def _start(self) -> Any:
        stream = self._batches.slice(slice(self._position, None)).to_iter_dataset()
        if self._num_workers > 0:
            _allow_grain_workers()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers),
                                        worker_init_fn=_leave_stop_signals_to_the_main_process)
        return iter(stream)

    def __iter__(self) -> "TrainingBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {self.STATE_KEY: self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restarts the stream at ``state["next_batch"]`` (from :meth:`get_state`).

        Raises:
          ValueError: for a state that is not ``{"next_batch": int >= 0}``.
        """
        position = state.get(self.STATE_KEY) if isinstance(state, dict) else None
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"not a training data state: {state!r} (expected {{{self.STATE_KEY!r}: int >= 0}})")
        self._position = position
        self._iterator.close()  # stops the old stream's worker processes
        self._iterator = self._start()


def _leave_stop_signals_to_the_main_process(worker_index: int, worker_count: int) -> None:
    """A scheduler's SIGTERM reaches the whole process group, and so does a terminal's Ctrl-C; the main process
    stops at its next step and saves (``runtime.reached_preemption``), but a worker they killed would fail that
    step's batch first. Grain stops its workers itself (an event, then SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _allow_grain_workers() -> None:
    """Grain's worker processes read an absl flag, which raises unless absl's flags are marked parsed;
    ``flatspec`` never parses absl flags, so mark them (their defaults) as parsed."""
    from absl import flags  # noqa: PLC0415 - grain's dependency, needed only with workers

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def training_iterator(dataset: TokenizedDataset, rows: list[tuple[int, ...]], *, row_length: int,
                      global_rows_per_batch: int, seed: int, num_workers: int = 0,
                      features: FeatureCache | None = None, positions: np.ndarray | None = None) -> TrainingBatches:
    """An endless, checkpointable iterator over this process's share of each global batch.

    ``positions``: the rows of a global batch this process feeds (its devices' rows,
    :func:`~flatspec_jax.sharding.process_rows`); None, in a single-process job only: all of them.
    Yields dicts of ``[len(positions), L, ...]`` arrays (see ``_MaterializeRow`` for the keys),
    read by ``num_workers`` worker processes (0: in process).
    """
    if positions is None:
        if jax.process_count() > 1:
            raise ValueError("a multi-process job must give each process's rows (positions)")
        positions = np.arange(global_rows_per_batch)
    if len(rows) < global_rows_per_batch:
        raise ConfigError(f"only {len(rows)} packed rows of training data; a batch needs {global_rows_per_batch}. "
                         "Select more samples or lower train.batch_tokens")
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
    ds = _ProcessRows(ds, global_rows_per_batch, positions)
    ds = ds.map(_MaterializeRow(dataset, row_length, features)).batch(len(positions))
    return TrainingBatches(ds, num_workers)


def fixed_batches(dataset: TokenizedDataset, indices: np.ndarray, *, row_length: int, rows_per_batch: int,
                  features: FeatureCache | None = None) -> list[dict[str, np.ndarray]]:
    """The held-out samples as a fixed list of packed global batches (last one padded with empty rows)."""
    rows = plan_training_rows(dataset, indices, row_length)
    while len(rows) % rows_per_batch:
        rows.append(())
    transform = _MaterializeRow(dataset, row_length, features)
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        items = [transform.map(row) for row in rows[start:start + rows_per_batch]]
        batches.append({k: np.stack([item[k] for item in items]) for k in items[0]})
    return batches
