"""A tokenized dataset on disk: every sample's token ids and assistant loss mask, random access.

Tokenizing ShareGPT with the chat template is done once per run and saved in the run
directory; scoring, training and the held-out metrics all read the same arrays, so they
agree on every sample's tokens by construction. The file is an ``.npz`` written atomically
and tagged with what it was built from; a stale or foreign file is rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from flatspec_jax.io import atomic_write

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
    """N samples stored flat.

    Attributes:
      ids: [N] sample ids (the record ids of the source).
      offsets: [N + 1] int64 start of each sample in ``tokens``.
      tokens: [total] int32 token ids.
      loss_mask: [total] int8, 1 on tokens the assistant wrote.
      truncated: [N] bool, True where the sample was cut to the max length.
      fingerprint: what the dataset was built from (source, limit, max length, tokenizer).
    """

    ids: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    loss_mask: np.ndarray
    truncated: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [S] int32, loss_mask [S] int8) of sample ``index``."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.loss_mask[start:end]

    @property
    def lengths(self) -> np.ndarray:
        """[N] tokens per sample."""
        return np.diff(self.offsets)

    @property
    def trained_counts(self) -> np.ndarray:
        """[N] assistant tokens per sample."""
        return np.add.reduceat(self.loss_mask.astype(np.int64), self.offsets[:-1]) if len(self) else np.zeros(0)

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[str, np.ndarray, np.ndarray, bool]],
                     fingerprint: str) -> "TokenizedDataset":
        """Builds from (id, input_ids, loss_mask, truncated) tuples."""
        ids, tokens, masks, truncated = [], [], [], []
        for sample_id, input_ids, loss_mask, was_truncated in samples:
            ids.append(sample_id)
            tokens.append(np.asarray(input_ids, np.int32))
            masks.append(np.asarray(loss_mask, np.int8))
            truncated.append(was_truncated)
        offsets = np.zeros(len(ids) + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in tokens])
        return cls(ids=np.asarray(ids, dtype=object).astype(str), offsets=offsets,
                   tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                   loss_mask=np.concatenate(masks) if masks else np.zeros(0, np.int8),
                   truncated=np.asarray(truncated, bool), fingerprint=fingerprint)

    def save(self, path: str | Path) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, ids=self.ids, offsets=self.offsets, tokens=self.tokens,
                         loss_mask=self.loss_mask, truncated=self.truncated,
                         fingerprint=np.asarray(self.fingerprint))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "TokenizedDataset | None":
        """Reads a saved dataset; None if absent, unreadable or built from something else."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                loaded = cls(ids=data["ids"], offsets=data["offsets"], tokens=data["tokens"],
                             loss_mask=data["loss_mask"], truncated=data["truncated"],
                             fingerprint=str(data["fingerprint"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("ignoring unreadable tokenized dataset %s (%s); rebuilding", path, err)
            return None
        if fingerprint is not None and loaded.fingerprint != fingerprint:
            log.info("tokenized dataset %s was built from other settings; rebuilding", path)
            return None
        return loaded
