"""The Grain training-data pipeline (``flatspec_jax.data.pipeline``) on a synthetic tokenized dataset.

What is checked (no model, no JAX computation; seconds):

* the train/held-out split: the held-out tail is never trained on, whatever the selection says;
  a selection restricts training to its ids; an unknown id is an error naming it;
* the packing plan and the stream: every trained sample lies in exactly one planned row, and each
  epoch of the stream yields every planned row (hence every sample) exactly once;
* ``training_iterator`` is deterministic for a seed, differs across seeds, reshuffles across
  epochs, and ``get_state``/``set_state`` replays exactly the batches an uninterrupted iterator
  yields (also across an epoch boundary, and on a freshly built iterator);
* multi-process slicing, simulated by monkeypatching ``jax.process_count`` (2 and 4 processes):
  a process yields the rows at its ``positions`` of every global batch (contiguous blocks, or rows
  spread over the batch as a TPU slice's device layout gives), so the local batches put back at
  their positions are the single-process global batches; a process's iterator state restores its
  own rows; a multi-process iterator without positions is refused;
* with a feature cache written by ``feature_cache.write_shard``/``write_index``, each row carries
  ``features`` aligned with its tokens (bfloat16-exact), zeros on padding, truncated with the
  sample; the held-out ``fixed_batches`` do the same and cover every held-out sample once.
"""

from __future__ import annotations

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest

from flatspec_jax.data import feature_cache
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.data.pipeline import fixed_batches, plan_training_rows, train_and_heldout_indices, training_iterator
from flatspec_jax.data.tokenized import TokenizedDataset

NUM_SAMPLES = 40
HELDOUT = 5
ROW_LENGTH = 64
ROWS_PER_BATCH = 4
HIDDEN = 8
VOCAB = 50_000  # random ids from a big vocabulary: two samples never share their token sequence


def make_dataset(seed: int = 0) -> TokenizedDataset:
    """Samples of 5..60 tokens (two longer than a row: truncated when packed), random assistant masks."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(NUM_SAMPLES):
        length = 90 if i in (4, 21) else int(rng.integers(5, 61))
        ids = rng.integers(1, VOCAB, length)
        mask = (rng.random(length) < 0.5).astype(np.int8)
        samples.append((f"id-{i}", ids, mask, length > ROW_LENGTH))
    return TokenizedDataset.from_samples(samples, "synthetic")


@pytest.fixture(scope="module")
def dataset() -> TokenizedDataset:
    return make_dataset()


@pytest.mark.parametrize("cut", [0, 0.5])
def test_a_cut_tokens_file_is_rebuilt_not_an_error(dataset, tmp_path, cut):
    """tokens.npz cut short (an empty file, or half of it) loads as None: the caller rebuilds it."""
    path = dataset.save(tmp_path / "tokens.npz")
    assert TokenizedDataset.load(path, "synthetic") is not None
    path.write_bytes(path.read_bytes()[:int(cut * path.stat().st_size)])
    assert TokenizedDataset.load(path, "synthetic") is None


@pytest.fixture(scope="module")
def split(dataset):
    return train_and_heldout_indices(dataset, HELDOUT, None)


@pytest.fixture(scope="module")
def rows(dataset, split):
    return plan_training_rows(dataset, split[0], ROW_LENGTH)


def iterator(dataset, rows, seed=0, global_rows=ROWS_PER_BATCH, features=None, num_workers=0, positions=None):
    return training_iterator(dataset, rows, row_length=ROW_LENGTH, global_rows_per_batch=global_rows, seed=seed,
                             features=features, num_workers=num_workers, positions=positions)


def take(it, count: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(count)]


def stream_rows(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The batches flattened into their rows, in stream order."""
    return [{k: b[k][j] for k in b} for b in batches for j in range(len(b["tokens"]))]


def assert_batches_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def row_samples(dataset: TokenizedDataset, row: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The dataset indices packed in a materialised row, recovered from its tokens (checks each segment
    against the sample's own tokens, positions and mask)."""
    by_tokens = {dataset[i][0][:ROW_LENGTH].tobytes(): i for i in range(len(dataset))}
    found = []
    for segment in range(1, int(row["segment_ids"].max()) + 1):
        where = np.flatnonzero(row["segment_ids"] == segment)
        assert len(where) and np.all(np.diff(where) == 1), "a segment is not contiguous"
        index = by_tokens[row["tokens"][where].tobytes()]
        _, mask = dataset[index]
        np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
        np.testing.assert_array_equal(row["loss_mask"][where], mask[:ROW_LENGTH])
        found.append(index)
    padding = row["segment_ids"] == 0
    assert not row["tokens"][padding].any() and not row["loss_mask"][padding].any()
    assert padding.sum() == ROW_LENGTH - sum(min(int(dataset.lengths[i]), ROW_LENGTH) for i in found)
    return tuple(sorted(found))


# ----------------------------------------------------------------------------------------------
# Train / held-out split and selection
# ----------------------------------------------------------------------------------------------


def test_heldout_tail_is_never_trained(dataset, split):
    train, heldout = split
    np.testing.assert_array_equal(heldout, np.arange(NUM_SAMPLES - HELDOUT, NUM_SAMPLES))
    np.testing.assert_array_equal(train, np.arange(NUM_SAMPLES - HELDOUT))
    # A selection naming held-out samples still does not train on them.
    selected = [f"id-{i}" for i in (38, 1, 36, 7, 35, 2)]  # unsorted, three of them in the held-out tail
    train, heldout = train_and_heldout_indices(dataset, HELDOUT, selected)
    np.testing.assert_array_equal(train, [1, 2, 7])
    np.testing.assert_array_equal(heldout, np.arange(NUM_SAMPLES - HELDOUT, NUM_SAMPLES))


def test_selection_restricts_training_and_rows(dataset):
    selected = [f"id-{i}" for i in range(0, NUM_SAMPLES - HELDOUT, 3)]
    train, _ = train_and_heldout_indices(dataset, HELDOUT, selected)
    assert [dataset.ids[i] for i in train] == sorted(selected, key=lambda s: int(s.split("-")[1]))
    planned = plan_training_rows(dataset, train, ROW_LENGTH)
    assert sorted(i for row in planned for i in row) == train.tolist()


def test_unknown_selection_id_is_an_error_naming_it(dataset):
    with pytest.raises(ValueError, match="'no-such-sample'"):
        train_and_heldout_indices(dataset, HELDOUT, ["id-1", "no-such-sample", "id-2"])
    with pytest.raises(ValueError, match="heldout"):
        train_and_heldout_indices(dataset, NUM_SAMPLES, None)


# ----------------------------------------------------------------------------------------------
# Packing plan and epochs
# ----------------------------------------------------------------------------------------------


def test_plan_holds_each_trained_sample_once(dataset, split, rows):
    train = split[0]
    members = [i for row in rows for i in row]
    assert sorted(members) == train.tolist()
    for row in rows:
        assert sum(min(int(dataset.lengths[i]), ROW_LENGTH) for i in row) <= ROW_LENGTH
    assert len(rows) > ROWS_PER_BATCH


def test_each_epoch_yields_every_row_and_sample_exactly_once(dataset, split, rows):
    epochs = 3
    # Enough batches for three whole epochs of rows (the last batch of an epoch may start the next one).
    count = -(-epochs * len(rows) // ROWS_PER_BATCH)
    streamed = stream_rows(take(iterator(dataset, rows, seed=3), count))
    for epoch in range(epochs):
        chunk = streamed[epoch * len(rows):(epoch + 1) * len(rows)]
        got = sorted(row_samples(dataset, row) for row in chunk)
        assert got == sorted(rows), f"epoch {epoch} does not yield every planned row exactly once"
        samples = sorted(i for row in got for i in row)
        assert samples == split[0].tolist()


def test_a_batch_of_one_row_streams_every_row_and_restores(dataset, rows):
    """One row per batch (train.batch_tokens = row_length x grad_accum on one device): the endless
    stream's length must stay below what grain's batch count can hold."""
    streamed = take(iterator(dataset, rows, seed=3, global_rows=1), len(rows) + 2)
    assert sorted(row_samples(dataset, b) for b in stream_rows(streamed[:len(rows)])) == sorted(rows)
    restored = iterator(dataset, rows, seed=3, global_rows=1)
    restored.set_state({"next_batch": len(rows)})
    assert_batches_equal(take(restored, 2), streamed[len(rows):])


def test_batches_have_fixed_shapes_and_dtypes(dataset, rows):
    batch = next(iterator(dataset, rows))
    assert set(batch) == {"tokens", "positions", "segment_ids", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (ROWS_PER_BATCH, ROW_LENGTH), key
        assert value.dtype == np.int32, key


# ----------------------------------------------------------------------------------------------
# Determinism, reshuffling and checkpointed state
# ----------------------------------------------------------------------------------------------


def order_of(dataset, batches) -> list[tuple[int, ...]]:
    return [row_samples(dataset, row) for row in stream_rows(batches)]


def test_same_seed_same_batches_other_seed_other_order(dataset, rows):
    count = len(rows) // ROWS_PER_BATCH + 2
    first = take(iterator(dataset, rows, seed=11), count)
    assert_batches_equal(take(iterator(dataset, rows, seed=11), count), first)
    other = take(iterator(dataset, rows, seed=12), count)
    assert order_of(dataset, other) != order_of(dataset, first)


def test_epochs_are_reshuffled(dataset, rows):
    streamed = order_of(dataset, take(iterator(dataset, rows, seed=5), -(-3 * len(rows) // ROWS_PER_BATCH)))
    epochs = [streamed[e * len(rows):(e + 1) * len(rows)] for e in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])


@pytest.mark.parametrize("consumed", [0, 3, len(make_dataset()) // 2])
def test_state_restore_replays_the_same_batches(dataset, rows, consumed):
    """Save after ``consumed`` batches (the last case crosses an epoch boundary afterwards), restore into
    a freshly built iterator (as a resumed run does), and compare with the uninterrupted stream."""
    later = len(rows) // ROWS_PER_BATCH + 3  # the replayed part crosses into the next epoch
    original = iterator(dataset, rows, seed=7)
    take(original, consumed)
    state = original.get_state()
    want = take(original, later)

    restored = iterator(dataset, rows, seed=7)
    take(restored, 1)  # its own position is overwritten by set_state
    restored.set_state(state)
    assert_batches_equal(take(restored, later), want)
    assert restored.get_state() == original.get_state()


@pytest.mark.parametrize("saved_workers, restored_workers", [(0, 2), (2, 0)])
def test_worker_processes_yield_the_same_stream_and_states_move_between_worker_counts(
        dataset, rows, saved_workers, restored_workers):
    """``data.num_workers`` may change on resume: the state is the global batch count, whoever read them."""
    want = take(iterator(dataset, rows, seed=5), 9)
    original = iterator(dataset, rows, seed=5, num_workers=saved_workers)
    assert_batches_equal(take(original, 4), want[:4])
    assert original.get_state() == {"next_batch": 4}
    restored = iterator(dataset, rows, seed=5, num_workers=restored_workers)
    restored.set_state(original.get_state())
    assert_batches_equal(take(restored, 5), want[4:])


def test_worker_processes_outlive_a_sigterm_to_the_process_group(dataset, rows):
    """A scheduler signals every process of the job; the main process stops at its next step and saves
    (runtime.reached_preemption), so the batches its workers read must keep coming until then."""
    import multiprocessing
    import os
    import signal
    import time

    want = take(iterator(dataset, rows, seed=5), 6)
    batches = iterator(dataset, rows, seed=5, num_workers=2)
    got = take(batches, 2)
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    assert_batches_equal(got + take(batches, 4), want)


@pytest.mark.parametrize("state", [{}, {"next_index": 3}, {"next_batch": -1}, {"next_batch": "3"}, [3]])
def test_a_malformed_state_is_refused(dataset, rows, state):
    with pytest.raises(ValueError, match="not a training data state"):
        iterator(dataset, rows).set_state(state)


def test_not_enough_rows_is_an_error(dataset, rows):
    with pytest.raises(ValueError, match="packed rows"):
        iterator(dataset, rows[:2], global_rows=ROWS_PER_BATCH)


# ----------------------------------------------------------------------------------------------
# Multi-process slicing (simulated)
# ----------------------------------------------------------------------------------------------


def local_batches(monkeypatch, dataset, rows, positions, count: int, processes: int = 2, seed: int = 9):
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_count", lambda: processes)
        return take(iterator(dataset, rows, seed=seed, positions=np.asarray(positions)), count)


@pytest.mark.parametrize("layout", [
    [[0, 1], [2, 3]],  # two hosts, a block each
    [[0], [1], [2], [3]],  # four hosts
    [[0, 2], [1, 3]],  # two hosts whose devices interleave over the batch (a TPU torus layout)
    [[0, 1, 2, 3], [0, 1, 2, 3]],  # replicas (a tensor axis across both hosts): both feed every row
], ids=["blocks2", "blocks4", "interleaved", "replicas"])
def test_process_rows_assemble_the_global_batch(monkeypatch, dataset, rows, layout):
    """Each process yields the rows at its positions of every global batch, in order: put back at those
    positions (as ``jax.make_array_from_process_local_data`` does), they are the single-process batches
    (same rows, same order: a multi-process run trains on exactly what a single-process run does)."""
    count = len(rows) // ROWS_PER_BATCH + 2  # into the second epoch
    global_batches = take(iterator(dataset, rows, seed=9), count)
    local = [local_batches(monkeypatch, dataset, rows, p, count, processes=len(layout)) for p in layout]
    for b, want in enumerate(global_batches):
        for key in want:
            for positions, batches in zip(layout, local):
                np.testing.assert_array_equal(batches[b][key], want[key][positions], err_msg=f"batch {b} {key}")


def test_process_iterator_state_restores_on_another_process_count(monkeypatch, dataset, rows):
    """The state counts global batches, so a single-process run's state resumes each process of a
    two-process run at its own rows of the next global batch (and a run may change hosts)."""
    original = iterator(dataset, rows, seed=9)
    take(original, 4)
    state = original.get_state()
    later = take(original, 6)
    for positions in ([0, 2], [1, 3]):
        with monkeypatch.context() as patch:
            patch.setattr(jax, "process_count", lambda: 2)
            restored = iterator(dataset, rows, seed=9, positions=np.asarray(positions))
            restored.set_state(state)
            want = [{k: v[positions] for k, v in batch.items()} for batch in later]
            assert_batches_equal(take(restored, 6), want)


def test_a_multi_process_iterator_needs_its_rows(monkeypatch, dataset, rows):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="must give each process's rows"):
        iterator(dataset, rows)


# ----------------------------------------------------------------------------------------------
# Offline features from a feature cache
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
    """Every sample's random [length, HIDDEN] features, in three shards, as `flatspec cache` writes them."""
    directory = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(1)
    features = {i: rng.normal(size=(int(dataset.lengths[i]), HIDDEN)).astype(np.float32) for i in range(len(dataset))}
    chunks = [list(range(13)), list(range(13, 30)), list(range(30, NUM_SAMPLES))]
    for chunk, members in enumerate(chunks):
        feature_cache.write_shard(directory, chunk, {i: features[i] for i in members}, "fp")
    feature_cache.write_index(directory, list(range(len(chunks))), HIDDEN, "fp")
    return FeatureCache(directory), features


def test_a_shard_overwritten_by_another_pass_or_cut_short_breaks_the_cache(cache, tmp_path):
    """An interrupted pass with other settings may have overwritten shards; a kill or a full disk may
    leave one short. Neither may pass for the sealed cache: it is no longer current, and reading it
    names the shard instead of mixing two targets' features."""
    import shutil

    source, features = cache
    for damage in ("other_pass", "truncated"):
        directory = tmp_path / damage
        shutil.copytree(source.directory, directory)
        assert feature_cache.index_is_current(directory, "fp")
        if damage == "other_pass":
            feature_cache.write_shard(directory, 1, {i: features[i] for i in range(13, 30)}, "other")
            message = r"shard-000001\.npy: written by a pass with other settings"
        else:
            npy = directory / "shard-000002.npy"
            npy.write_bytes(npy.read_bytes()[:200])
            message = r"shard-000002\.npy: unreadable"
        assert not feature_cache.index_is_current(directory, "fp")
        with pytest.raises(FileNotFoundError, match=message + r".*run `flatspec cache`"):
            FeatureCache(directory)


def test_a_pass_killed_between_a_shards_array_and_sidecar_leaves_it_incomplete(cache, tmp_path, monkeypatch):
    """Another pass's array of the same row count must not pass for this pass's shard beside its old sidecar."""
    import shutil

    source, features = cache
    directory = tmp_path / "killed"
    shutil.copytree(source.directory, directory)
    same_rows = {i: features[i] * 2 for i in range(13, 30)}  # shard 1's samples, other values
    assert feature_cache.shard_is_current(directory, 1, "fp", range(13, 30))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.write_shard(directory, 1, same_rows, "other")
    assert not feature_cache.shard_is_current(directory, 1, "fp", range(13, 30))
    assert not feature_cache.shard_is_current(directory, 1, "other", range(13, 30))


def test_a_shard_of_another_chunking_is_not_current(cache):
    """A pass with another score.flush_every cuts other chunks: shard 1 of 13..29 is not shard 1 of
    a chunk of other samples, though fingerprint and arrays are intact (a resumed pass would
    otherwise seal a cache missing samples)."""
    source, _ = cache
    assert feature_cache.shard_is_current(source.directory, 1, "fp", range(13, 30))
    assert not feature_cache.shard_is_current(source.directory, 1, "fp", range(13, 25))
    assert not feature_cache.shard_is_current(source.directory, 1, "fp", range(13, 35))


def test_a_malformed_index_is_named(cache, tmp_path):
    import shutil

    source, _ = cache
    directory = tmp_path / "malformed"
    shutil.copytree(source.directory, directory)
    (directory / "index.json").write_text('{"fingerprint": "fp"}')
    with pytest.raises(FileNotFoundError, match=r"malformed/index\.json: no complete feature cache index "
                                                r"\(KeyError: 'hidden_size'\)"):
        FeatureCache(directory)


def check_features(dataset, row: dict[str, np.ndarray], features: dict[int, np.ndarray]) -> None:
    got = row["features"]
    assert got.shape == (ROW_LENGTH, HIDDEN) and got.dtype == ml_dtypes.bfloat16
    for segment, index in enumerate(row_samples(dataset, row), start=1):
        where = row["segment_ids"] == segment
        want = features[index][:ROW_LENGTH].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[where].view(np.uint16), want.view(np.uint16),
                                      err_msg=f"features of sample {index} misaligned with its tokens")
    assert not got[row["segment_ids"] == 0].astype(np.float32).any(), "padding features are not zero"


def test_cache_reads_back_each_sample(dataset, cache):
    features_cache, features = cache
    assert len(features_cache) == NUM_SAMPLES and features_cache.hidden_size == HIDDEN
    for i in (0, 12, 13, 39):
        np.testing.assert_array_equal(features_cache[i].astype(np.float32),
                                      features[i].astype(ml_dtypes.bfloat16).astype(np.float32))
    with pytest.raises(KeyError, match="sample 999"):
        features_cache[999]


def test_training_rows_carry_aligned_features(dataset, rows, cache):
    features_cache, features = cache
    plain = take(iterator(dataset, rows, seed=2), len(rows) // ROWS_PER_BATCH + 1)
    with_features = take(iterator(dataset, rows, seed=2, features=features_cache), len(plain))
    truncated_seen = False
    for a, b in zip(stream_rows(plain), stream_rows(with_features)):
        for key in a:  # the features do not change the rows or their order
            np.testing.assert_array_equal(a[key], b[key])
        check_features(dataset, b, features)
        truncated_seen |= bool(set(row_samples(dataset, b)) & {4, 21})
    assert truncated_seen, "the test data should include a sample longer than a row"


def test_heldout_fixed_batches_cover_heldout_once_with_features(dataset, split, cache):
    features_cache, features = cache
    heldout = split[1]
    batches = fixed_batches(dataset, heldout, row_length=ROW_LENGTH, rows_per_batch=ROWS_PER_BATCH,
                            features=features_cache)
    all_rows = stream_rows(batches)
    assert all(b["tokens"].shape == (ROWS_PER_BATCH, ROW_LENGTH) for b in batches)
    covered = [i for row in all_rows for i in row_samples(dataset, row)]
    assert sorted(covered) == heldout.tolist()
    for row in all_rows:
        check_features(dataset, row, features)
    # Deterministic: the same list on every call (held-out metrics compare across steps and runs).
    assert_batches_equal(fixed_batches(dataset, heldout, row_length=ROW_LENGTH, rows_per_batch=ROWS_PER_BATCH,
                                       features=features_cache), batches)


def test_iterator_state_restore_with_features_read_by_worker_processes(dataset, rows, cache):
    features_cache, _ = cache
    original = iterator(dataset, rows, seed=4, features=features_cache)
    take(original, 2)
    state = original.get_state()
    want = take(original, 3)
    restored = iterator(dataset, rows, seed=4, features=features_cache, num_workers=2)
    restored.set_state(state)
    got = take(restored, 3)
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(np.asarray(g[key]).view(np.uint8), np.asarray(w[key]).view(np.uint8))


def test_rows_are_planned_in_file_order_and_deterministically(dataset, split):
    a = plan_training_rows(dataset, split[0], ROW_LENGTH)
    b = plan_training_rows(dataset, split[0], ROW_LENGTH)
    assert a == b
    assert [row[0] for row in a] == sorted(row[0] for row in a)
    assert all(list(row) == sorted(row) for row in a)
    # No sample appears in two rows.
    assert len(set(itertools.chain.from_iterable(a))) == sum(len(r) for r in a)
