"""Tests for the packing plan (flatspec_jax.data.packing) and the scoring batches built from it.

* ``plan_rows`` (hypothesis): every sample lands in exactly one row, no row overflows its
  length or segment slots, the plan is deterministic and follows file order; a hand-checked
  best-fit-decreasing case; empty or over-long samples are errors naming the sample.
* ``pack_rows``: tokens, segment ids, per-sample positions, loss masks and slot indices of a
  hand-built plan.
* ``scoring.make_plan``: full batches, then one last batch trimmed to the leftover rows
  (rounded up to the row multiple), and padding counted over every computed slot.
* On the real data (ShareGPT through SmolLM2's chat template, <= 512 tokens), padding stays
  under 10% of the computed slots for the default scoring batches, small runs included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax import assets, scoring
from flatspec_jax.config import DataConfig, ScoreConfig
from flatspec_jax.data.packing import pack_rows, padding_fraction, plan_rows
from flatspec_jax.data.prepare import prepare_samples
from flatspec_jax.data.tokenizer import load_tokenizer

ROW = 32


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, ROW), min_size=0, max_size=60), max_segments=st.integers(1, 6))
def test_plan_places_every_sample_once_within_row_limits(lengths, max_segments):
    rows = plan_rows(lengths, ROW, max_segments)
    placed = [i for row in rows for i in row]
    assert sorted(placed) == list(range(len(lengths)))
    for row in rows:
        assert row and list(row) == sorted(row)
        assert sum(lengths[i] for i in row) <= ROW
        assert len(row) <= max_segments
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert plan_rows(lengths, ROW, max_segments) == rows


def test_plan_is_best_fit_decreasing():
    # Longest first, each into the open row with the least room that fits it: 20 opens row A
    # (12 free), 16 opens row B (16 free), 12 fills A, 10 goes to B (6 free), the first 6 fills B
    # and the second opens row C.
    lengths = [6, 20, 12, 16, 10, 6]
    assert plan_rows(lengths, ROW, max_segments=4) == [(0, 3, 4), (1, 2), (5,)]


def test_plan_closes_rows_at_the_segment_limit():
    assert plan_rows([1] * 5, ROW, max_segments=2) == [(0, 1), (2, 3), (4,)]


@pytest.mark.parametrize("lengths, bad", [([4, 0, 3], "sample 1 has 0 tokens"), ([4, ROW + 1], "sample 1 has 33")])
def test_plan_rejects_empty_and_overlong_samples_by_index(lengths, bad):
    with pytest.raises(ValueError, match=bad):
        plan_rows(lengths, ROW, max_segments=4)


def test_pack_rows_lays_out_segments():
    samples = {0: ([5, 6, 7], [0, 1, 1]), 1: ([8, 9], [1, 0]), 2: ([3], [1])}
    packed = pack_rows([(0, 2), (), (1,)], lambda i: tuple(map(np.asarray, samples[i])), row_length=6,
                       max_segments=3)
    np.testing.assert_array_equal(packed.tokens, [[5, 6, 7, 3, 0, 0], [0] * 6, [8, 9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 2, 0, 0], [0] * 6, [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 0, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed.loss_mask, [[0, 1, 1, 1, 0, 0], [0] * 6, [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed.sample_index, [[0, 2, -1], [-1, -1, -1], [1, -1, -1]])
    assert packed.num_tokens == 6


def test_padding_fraction_counts_empty_rows():
    assert padding_fraction([(0, 1), ()], [3, 5], row_length=8) == pytest.approx(1 - 8 / 16)
    assert padding_fraction([], [], row_length=8) == 0.0


@pytest.mark.parametrize("num_rows, rows_per_batch, row_multiple, shapes", [
    (7, 4, 1, [4, 3]),   # leftover rows form a smaller last batch
    (7, 4, 2, [4, 4]),   # ... rounded up to the row multiple
    (5, 4, 2, [4, 2]),
    (8, 4, 2, [4, 4]),   # no leftover, no extra batch
    (3, 8, 8, [8]),
])
def test_make_plan_trims_the_last_batch(num_rows, rows_per_batch, row_multiple, shapes):
    lengths = np.full(num_rows, ROW)  # one full-length sample per row
    plan = scoring.make_plan(lengths, ScoreConfig(row_length=ROW, rows_per_batch=rows_per_batch), row_multiple)
    assert [len(batch) for batch in plan.batches] == shapes
    assert sorted(i for batch in plan.batches for row in batch for i in row) == list(range(num_rows))
    assert plan.padding == pytest.approx(1 - num_rows / sum(shapes))


@pytest.fixture(scope="module")
def sharegpt_lengths(tmp_path_factory) -> np.ndarray:
    """Token counts of the first 512 ShareGPT conversations through SmolLM2's template (<= 512)."""
    path = str(assets.smollm2_gguf())
    dataset = prepare_samples(DataConfig(limit=512, max_length=512), path, load_tokenizer(path),
                              Path(tmp_path_factory.mktemp("sharegpt")))
    return dataset.lengths


@pytest.mark.parametrize("num_samples", [27, 100, 400])
@pytest.mark.parametrize("rows_per_batch", [4, 8])
def test_sharegpt_padding_is_under_ten_percent(sharegpt_lengths, num_samples, rows_per_batch):
    plan = scoring.make_plan(sharegpt_lengths[:num_samples], ScoreConfig(rows_per_batch=rows_per_batch))
    computed = sum(len(batch) for batch in plan.batches) * 512
    assert plan.padding == pytest.approx(1 - sharegpt_lengths[:num_samples].sum() / computed)
    assert plan.padding < 0.10
