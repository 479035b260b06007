"""Offline target features: every sample's last hidden states (bf16) in sharded files with an index.

Layout of the cache directory:

    shard-000000.npy    uint16 [tokens, D]: the bfloat16 bits of the features of one scoring chunk
    shard-000000.json   {"fingerprint", "samples": [[sample index, start row, length], ...]}
    index.json          {"fingerprint", "hidden_size", "shards": [...]} written last

Shards are written atomically one scoring chunk at a time, so an interrupted pass keeps
every finished shard and a re-run writes only the missing ones. A shard counts only with
its sidecar's fingerprint and a readable array of the rows the sidecar lists (and, for a
resuming pass, exactly the samples of the chunk it would write there: a pass with another
``score.flush_every`` cuts other chunks), and the index only while every shard it lists
does: a pass with other settings that was interrupted after overwriting some shards leaves
no index that a reader would take for complete. Readers memory-map the shards, so random
access costs one page-in per sample, not a load of the whole cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path

import ml_dtypes
import numpy as np

from flatspec_jax.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}"


def _shard_problem(directory: Path, shard: str, fingerprint: str,
                   samples: Collection[int] | None = None) -> str | None:
    """Why ``shard`` is not a complete shard of ``fingerprint`` (None when it is), holding exactly
    the sample indices ``samples`` when they are given."""
    try:
        sidecar = json.loads((directory / f"{shard}.json").read_text())
        rows = sum(length for _, _, length in sidecar["samples"])
        array = np.load(directory / f"{shard}.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if sidecar["fingerprint"] != fingerprint:
        return "written by a pass with other settings"
    if array.ndim != 2 or array.shape[0] != rows:
        return f"holds an array of shape {array.shape}, its sidecar lists {rows} rows"
    if samples is not None and sorted(sample for sample, _, _ in sidecar["samples"]) != sorted(samples):
        return "holds other samples than its chunk (written with another score.flush_every)"
    return None


def shard_is_current(directory: Path, chunk: int, fingerprint: str, samples: Collection[int]) -> bool:
    """Shard ``chunk`` is complete, ``fingerprint``'s, and holds exactly the sample indices ``samples``."""
    return _shard_problem(directory, shard_name(chunk), fingerprint, samples) is None


def write_shard(directory: Path, chunk: int, features: dict[int, np.ndarray], fingerprint: str) -> None:
    """Writes one shard: sample index -> [length, D] features (any float dtype; stored as bfloat16)."""
    order = sorted(features)
    stacked = np.concatenate([features[i].astype(ml_dtypes.bfloat16) for i in order]).view(np.uint16)
    starts = np.cumsum([0] + [len(features[i]) for i in order[:-1]])
    samples = [[int(i), int(s), int(len(features[i]))] for i, s in zip(order, starts)]

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # np.save on a path would append ".npy" to the temporary name
            np.save(handle, stacked, allow_pickle=False)

    # The sidecar goes first and comes back last: a pass killed in between leaves an array without
    # one (not current), never a new array beside an old pass's sidecar of the same row count.
    (directory / f"{shard_name(chunk)}.json").unlink(missing_ok=True)
    atomic_write(directory / f"{shard_name(chunk)}.npy", save)
    atomic_write_json(directory / f"{shard_name(chunk)}.json", {"fingerprint": fingerprint, "samples": samples})


def write_index(directory: Path, chunks: list[int], hidden_size: int, fingerprint: str) -> None:
    """Seals the cache once every shard exists."""
    atomic_write_json(directory / INDEX_FILE, {"fingerprint": fingerprint, "hidden_size": hidden_size,
                                               "shards": [shard_name(c) for c in chunks]})


def index_is_current(directory: Path, fingerprint: str) -> bool:
    """The index is ``fingerprint``'s and every shard it lists is complete."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
        return index["fingerprint"] == fingerprint and all(
            _shard_problem(directory, shard, fingerprint) is None for shard in index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def unseal(directory: Path) -> None:
    """Removes the index, so shards a new pass overwrites can never pass for the old cache."""
    (directory / INDEX_FILE).unlink(missing_ok=True)


class FeatureCache:
    """Random access to cached features: ``cache[sample_index] -> [length, D] bfloat16``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX_FILE).read_text())
            self.fingerprint, self.hidden_size, shards = index["fingerprint"], index["hidden_size"], index["shards"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FileNotFoundError(f"{self.directory / INDEX_FILE}: no complete feature cache index "
                                    f"({type(err).__name__}: {err}); run `flatspec cache` (or `flatspec score` "
                                    "with train.features=offline)") from err
        self._where: dict[int, tuple[str, int, int]] = {}
        for shard in shards:
            problem = _shard_problem(self.directory, shard, self.fingerprint)
            if problem is not None:
                raise FileNotFoundError(f"{self.directory / shard}.npy: {problem}; run `flatspec cache` (or "
                                        "`flatspec score` with train.features=offline) to rebuild it")
            for sample, start, length in json.loads((self.directory / f"{shard}.json").read_text())["samples"]:
                self._where[sample] = (shard, start, length)
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, sample: int) -> np.ndarray:
        try:
            shard, start, length = self._where[sample]
        except KeyError:
            raise KeyError(f"sample {sample} is not in the feature cache {self.directory}") from None
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.directory / f"{shard}.npy", mmap_mode="r")
        return np.asarray(self._arrays[shard][start:start + length]).view(ml_dtypes.bfloat16)

    def __getstate__(self) -> dict:
        # Memory maps do not pickle (Grain worker processes); they reopen lazily.
        return {**self.__dict__, "_arrays": {}}
