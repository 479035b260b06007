"""Packing variable-length samples into fixed-length rows (segment ids + per-segment positions).

Scoring and training both see fixed ``[rows, row_length]`` batches, so each jitted step
compiles once. Best-fit-decreasing over the whole (finite, known) sample set wastes far
less padding than streaming packers, and the plan is a pure function of the sample
lengths, so a resumed run rebuilds exactly the same batches.

Shape legend: R rows, L row length, M segment slots per row.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Sequence

import numpy as np


MIN_SAMPLE_TOKENS = 16
"""Rows hold at most row_length // MIN_SAMPLE_TOKENS samples, which bounds the segment slots."""


def segment_slots(row_length: int) -> int:
    """M, the segment slots of a row: the most samples one row may hold."""
    return max(1, row_length // MIN_SAMPLE_TOKENS)


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """A batch of packed rows.

    Attributes:
      tokens: [R, L] int32 token ids (0 on padding).
      segment_ids: [R, L] int32, 1..k for the k samples of a row, 0 on padding.
      positions: [R, L] int32 position of each token inside its own sample.
      loss_mask: [R, L] int32, 1 on tokens the assistant wrote.
      sample_index: [R, M] int32 index of the sample in each segment slot (slot j holds
        segment j + 1), -1 for empty slots.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    sample_index: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())


def plan_rows(lengths: Sequence[int], row_length: int, max_segments: int) -> list[tuple[int, ...]]:
    """Assigns every sample to a row by best-fit decreasing.

    Samples are placed longest first, each into the open row with the least free space
    that still fits it (a new row if none does). Rows holding ``max_segments`` samples
    close. Free rows are kept in a sorted list, so planning 10^5 samples takes well
    under a second.

    Args:
      lengths: token count of each sample (each in 1..row_length).
      row_length: L.
      max_segments: M, the most samples one row may hold.

    Returns:
      Rows as tuples of sample indices, each row's samples in increasing index order,
      rows ordered by their smallest sample index (so the plan roughly follows file
      order). Ties are broken by index, which makes the plan deterministic.

    Raises:
      ValueError: naming the first sample that is empty or longer than a row.
    """
    bad = [i for i, n in enumerate(lengths) if n > row_length or n <= 0]
    if bad:
        raise ValueError(f"sample {bad[0]} has {lengths[bad[0]]} tokens; rows hold 1..{row_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    open_rows: list[tuple[int, int]] = []  # sorted (free space, row id)
    members: list[list[int]] = []
    for i in order:
        at = bisect.bisect_left(open_rows, (lengths[i], -1))
        if at < len(open_rows):
            free, row = open_rows.pop(at)
        else:
            free, row = row_length, len(members)
            members.append([])
        members[row].append(i)
        free -= lengths[i]
        if free > 0 and len(members[row]) < max_segments:
            bisect.insort(open_rows, (free, row))
    rows = [tuple(sorted(m)) for m in members]
    return sorted(rows, key=lambda r: r[0])


def pack_rows(rows: Sequence[Sequence[int]], get_sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
              row_length: int, max_segments: int) -> PackedRows:
    """Materialises planned rows.

    Args:
      rows: sample indices per row (an empty row is all padding).
      get_sample: index -> (input_ids [S], loss_mask [S]).
    """
    r = len(rows)
    tokens = np.zeros((r, row_length), np.int32)
    segment_ids = np.zeros((r, row_length), np.int32)
    positions = np.zeros((r, row_length), np.int32)
    loss_mask = np.zeros((r, row_length), np.int32)
    sample_index = np.full((r, max_segments), -1, np.int32)
    for row, members in enumerate(rows):
        offset = 0
        for slot, index in enumerate(members):
            ids, mask = get_sample(index)
            end = offset + len(ids)
            tokens[row, offset:end] = ids
            segment_ids[row, offset:end] = slot + 1
            positions[row, offset:end] = np.arange(len(ids))
            loss_mask[row, offset:end] = mask
            sample_index[row, slot] = index
            offset = end
    return PackedRows(tokens, segment_ids, positions, loss_mask, sample_index)


def padding_fraction(rows: Sequence[Sequence[int]], lengths: Sequence[int], row_length: int) -> float:
    """Share of row slots that hold padding (0 = perfectly packed)."""
    if not rows:
        return 0.0
    used = sum(lengths[i] for row in rows for i in row)
    return 1.0 - used / (len(rows) * row_length)
