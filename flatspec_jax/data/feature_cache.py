"""Offline target features: every sample's last hidden states (bf16) in sharded files with an index.

Layout of the cache directory:

    shard-000000.npy    uint16 [tokens, D]: the bfloat16 bits of the features of one scoring chunk
    shard-000000.json   {"fingerprint", "samples": [[sample index, start row, length], ...]}
    index.json          {"fingerprint", "hidden_size", "shards": [...]} written last

Shards are written atomically one scoring chunk at a time, so an interrupted pass keeps
every finished shard and a re-run writes only the missing ones. Readers memory-map the
shards, so random access costs one page-in per sample, not a load of the whole cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np

from flatspec_jax.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}"


def shard_is_current(directory: Path, chunk: int, fingerprint: str) -> bool:
    sidecar = directory / f"{shard_name(chunk)}.json"
    try:
        return json.loads(sidecar.read_text())["fingerprint"] == fingerprint and \
            (directory / f"{shard_name(chunk)}.npy").exists()
    except (OSError, ValueError, KeyError):
        return False


def write_shard(directory: Path, chunk: int, features: dict[int, np.ndarray], fingerprint: str) -> None:
    """Writes one shard: sample index -> [length, D] features (any float dtype; stored as bfloat16)."""
    order = sorted(features)
    stacked = np.concatenate([features[i].astype(ml_dtypes.bfloat16) for i in order]).view(np.uint16)
    starts = np.cumsum([0] + [len(features[i]) for i in order[:-1]])
    samples = [[int(i), int(s), int(len(features[i]))] for i, s in zip(order, starts)]
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # np.save on a path would append ".npy" to the temporary name
            np.save(handle, stacked, allow_pickle=False)

    atomic_write(directory / f"{shard_name(chunk)}.npy", save)
    atomic_write_json(directory / f"{shard_name(chunk)}.json", {"fingerprint": fingerprint, "samples": samples})


def write_index(directory: Path, chunks: list[int], hidden_size: int, fingerprint: str) -> None:
    """Seals the cache once every shard exists."""
    atomic_write_json(directory / INDEX_FILE, {"fingerprint": fingerprint, "hidden_size": hidden_size,
                                               "shards": [shard_name(c) for c in chunks]})


def index_is_current(directory: Path, fingerprint: str) -> bool:
    try:
        return json.loads((directory / INDEX_FILE).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


class FeatureCache:
    """Random access to cached features: ``cache[sample_index] -> [length, D] bfloat16``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX_FILE).read_text())
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{self.directory} holds no complete feature cache ({err}); run "
                                    "`flatspec cache` (or `flatspec score` with train.features=offline)") from err
        self.fingerprint = index["fingerprint"]
        self.hidden_size = index["hidden_size"]
        self._where: dict[int, tuple[str, int, int]] = {}
        for shard in index["shards"]:
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
