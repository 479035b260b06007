"""Flatness scoring: every sample through the frozen target, one parquet row of statistics per sample.

Samples are packed into fixed ``[rows, row_length]`` batches by a best-fit plan computed
once from their lengths (:mod:`flatspec_jax.data.packing`), so the jitted step compiles
once per batch shape (full batches, and a smaller last one for the leftover rows) and a
resumed run rebuilds exactly the same batches. The step runs the target without
materialising logits and feeds the final hidden states to the fused, vocabulary-chunked
statistics of :mod:`flatspec_jax.flatness`; batches are sharded over the mesh's batch axes
(``data`` x ``fsdp``) and parameters follow the sharding rules.

Progress is saved every ``score.flush_every`` batches as an atomically written parquet part
tagged with a fingerprint of everything the scores depend on. Re-running after an
interruption (``kill -9`` included) skips the batches whose part exists, and the merged
``scores.parquet`` equals an uninterrupted run's, because each batch is computed by the
same program from the same inputs either way (on the same backend and mesh: parts scored on
other devices differ from this run's at rounding level and are merged as they are).

Conventions: the statistics at position t describe the target's prediction of token t+1;
a sample's ``flatness`` averages the positions whose next token is an assistant token (the
tokens a draft is trained on), ``flatness_all`` every position with a next token in the
same sample.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from flatspec_jax.config import ConfigError, ScoreConfig
from flatspec_jax.data import feature_cache
from flatspec_jax.data.packing import PackedRows, pack_rows, padding_fraction, plan_rows, segment_slots
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.flatness import segment_stats, token_stats_from_hidden, token_stats_vocab_parallel
from flatspec_jax.io import atomic_write
from flatspec_jax.models.llama import Llama
from flatspec_jax.models.masks import segment_causal_mask
from flatspec_jax.profiling import StepProfiler
from flatspec_jax.runtime import Preempted, process_zero_says, reached_preemption, stop_cause
from flatspec_jax.sharding import ShardingRules, batch_sharding, batch_shards, process_rows

log = logging.getLogger(__name__)

STAT_COLUMNS = ("flatness", "flatness_all", "entropy", "top1_prob", "nll")
"""Per-sample means written to scores.parquet (float64 columns; NaN where nothing to average)."""
FINGERPRINT_KEY = b"flatspec_fingerprint"
POSITION_KEY = "flatspec_position_flatness"
INPUTS_KEY = "flatspec_score_inputs"
LAYOUT_SETTINGS = ("vocab_chunk", "row_length", "rows_per_batch", "flush_every")
"""The score.* settings that cut the pass into work and leave what it computes as it is: a sample's
statistics and features do not depend on its row or batch (attention stays within each sample), and the
vocabulary chunking changes them at rounding level only, as another mesh does."""


@dataclasses.dataclass(frozen=True)
class ScorePlan:
    """Which samples share which row of which batch.

    Attributes:
      batches: per batch, its rows; a row is a tuple of sample indices (empty = padding row).
      max_segments: M, segment slots per row.
      padding: share of the computed token slots that hold padding, empty rows included.
    """

    batches: list[list[tuple[int, ...]]]
    max_segments: int
    padding: float


def make_plan(lengths: np.ndarray, cfg: ScoreConfig, row_multiple: int = 1) -> ScorePlan:
    """Packs samples (already at most ``cfg.row_length`` long) into batches of ``cfg.rows_per_batch`` rows.

    The rows left over after the full batches form one smaller last batch, filled with empty rows
    only up to a multiple of ``row_multiple`` (the data-parallel shards, which must divide every
    batch), so a small dataset does not pay for a mostly empty batch; the step compiles once
    for each of the (at most two) batch shapes.
    """
    max_segments = segment_slots(cfg.row_length)
    rows = plan_rows([int(n) for n in lengths], cfg.row_length, max_segments)
    while len(rows) % cfg.rows_per_batch % row_multiple:
        rows.append(())
    batches = [rows[i:i + cfg.rows_per_batch] for i in range(0, len(rows), cfg.rows_per_batch)]
    return ScorePlan(batches, max_segments, padding_fraction(rows, lengths, cfg.row_length))


def check_mesh_fits(cfg: ScoreConfig, mesh: Mesh) -> None:
    shards = batch_shards(mesh)
    if cfg.rows_per_batch % shards:
        raise ConfigError(f"score.rows_per_batch={cfg.rows_per_batch} is not a multiple of the {shards} "
                          "data-parallel shards (mesh.data x mesh.fsdp)")


def _score_rows(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
                segment_ids: jax.Array, loss_mask: jax.Array, *, num_segments: int, temperature: float,
                vocab_chunk: int, return_features: bool, mesh: Mesh, rules: ShardingRules) -> dict[str, jax.Array]:
    """Per-segment statistics of packed rows: [R, L] inputs -> dict of [R, M] arrays, plus
    ``position_flatness_sum`` / ``position_count`` [L]: token flatness summed by position in the sample,
    and with ``return_features`` the last hidden states ``features`` [R, L, D] in bfloat16.

    When the rules split the LM head's vocabulary over the mesh (``mesh.tensor`` > 1), each device
    reduces only its own rows of it (:func:`~flatspec_jax.flatness.token_stats_vocab_parallel`)."""
    model: Llama = nnx.merge(graphdef, params)
    with jax.named_scope("target_forward"):
        hidden = model(tokens, positions, segment_causal_mask(segment_ids), return_logits=False).hidden
    next_tokens = jnp.roll(tokens, -1, axis=1)
    next_segment = jnp.roll(segment_ids, -1, axis=1).at[:, -1].set(0)
    has_next = (segment_ids > 0) & (next_segment == segment_ids)
    next_trained = has_next & (jnp.roll(loss_mask, -1, axis=1) > 0)
    head = model.lm_head_weight()
    vocab_axes = rules.spec(("vocab", "embed"), head.shape, mesh)[0]
    with jax.named_scope("flatness"):
        if vocab_axes is None:
            stats = token_stats_from_hidden(hidden, head, next_tokens, temperature, vocab_chunk)
        else:
            stats = token_stats_vocab_parallel(hidden, head, next_tokens, mesh, vocab_axes,
                                               rules.spec(("batch",), mesh=mesh)[0], temperature, vocab_chunk)
    per_sample = segment_stats(stats, next_trained, jnp.where(has_next, segment_ids, 0), num_segments)
    # Token flatness by position inside the sample, summed over the batch (for the report's plot).
    length = tokens.shape[1]
    per_sample["position_flatness_sum"] = jnp.zeros(length).at[positions].add(
        jnp.where(has_next, stats.flatness, 0.0))
    per_sample["position_count"] = jnp.zeros(length, jnp.int32).at[positions].add(has_next.astype(jnp.int32))
    if return_features:
        per_sample["features"] = hidden.astype(jnp.bfloat16)
    return per_sample


def compile_score_step(graphdef: nnx.GraphDef, cfg: ScoreConfig, num_segments: int, mesh: Mesh,
                       rules: ShardingRules, param_shardings: nnx.State, return_features: bool
                       ) -> Callable[..., dict[str, jax.Array]]:
    """The jitted scoring step with explicit shardings: rows over the batch axes, the statistics
    replicated (they are small), so every process can read them.

    The hidden states (``return_features``, [R, L, D]) stay split by rows on one host, which
    gathers them from its devices, rather than every device receiving the whole batch's copy; in a
    multi-process job they are replicated like the statistics, since process 0 writes them all.
    """
    rows = batch_sharding(mesh, rules, 2)
    replicated = NamedSharding(mesh, PartitionSpec())
    feature_sharding = batch_sharding(mesh, rules, 3) if jax.process_count() == 1 else replicated
    step = functools.partial(_score_rows, graphdef, num_segments=num_segments, temperature=cfg.temperature,
                             vocab_chunk=cfg.vocab_chunk, return_features=return_features, mesh=mesh, rules=rules)

    def stats_and_features(*args: jax.Array) -> tuple[dict[str, jax.Array], jax.Array | None]:
        stats = step(*args)
        return stats, stats.pop("features", None)

    jitted = jax.jit(stats_and_features, in_shardings=(param_shardings, rows, rows, rows, rows),
                     out_shardings=(replicated, feature_sharding))

    def run(*args: jax.Array) -> dict[str, jax.Array]:
        stats, hidden = jitted(*args)
        return stats if hidden is None else {**stats, "features": hidden}

    return run


def _global_rows(packed: PackedRows, sharding: NamedSharding, local: np.ndarray) -> tuple[jax.Array, ...]:
    """The batch's rows as global arrays; each process contributes only the rows its devices hold
    (``local``: :func:`~flatspec_jax.sharding.process_rows` of the batch's shape)."""
    arrays = (packed.tokens, packed.positions, packed.segment_ids, packed.loss_mask)
    return tuple(jax.make_array_from_process_local_data(sharding, a[local], a.shape) for a in arrays)


def _rows_to_table(packed: PackedRows, stats: dict[str, np.ndarray], dataset: TokenizedDataset,
                   fingerprint: str) -> pa.Table:
    slots = packed.sample_index >= 0
    index = packed.sample_index[slots]
    columns = {"index": index.astype(np.int64), "id": dataset.ids[index],
               "n_tokens": dataset.lengths[index].astype(np.int64),
               "n_trained_tokens": stats["n_trained_tokens"][slots].astype(np.int64)}
    for name in STAT_COLUMNS:
        columns[name] = stats[name][slots].astype(np.float64)
    columns["config_hash"] = np.full(len(index), fingerprint)
    return pa.table(columns)


def _write_parquet(path: Path, table: pa.Table, fingerprint: str, extra: dict[str, str] | None = None) -> None:
    metadata = {FINGERPRINT_KEY: fingerprint.encode()}
    metadata.update({k.encode(): v.encode() for k, v in (extra or {}).items()})
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint a scores file or part was written with; None if unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def read_inputs(path: Path) -> dict[str, Any] | None:
    """The inputs a scores file was made with (``score_dataset``'s ``inputs``); None when unreadable
    or not recorded."""
    try:
        value = (pq.read_schema(path).metadata or {}).get(INPUTS_KEY.encode())
        return json.loads(value) if value else None
    except (OSError, pa.ArrowInvalid, ValueError):
        return None


def _chunks(num_batches: int, flush_every: int) -> Iterator[range]:
    for start in range(0, num_batches, flush_every):
        yield range(start, min(start + flush_every, num_batches))


def _chunk_samples(plan: ScorePlan, chunk: range) -> list[int]:
    """The sample indices the batches of ``chunk`` score (what its part and feature shard hold)."""
    return [i for b in chunk for row in plan.batches[b] for i in row]


def _part_fingerprint(fingerprint: str, cfg: ScoreConfig) -> str:
    """Parts are chunks of ``flush_every`` batches of the plan the layout settings give: a part counts
    only for the layout it was cut with (so that a pass never merges rows computed with two)."""
    return fingerprint + "".join(f"/{name}={getattr(cfg, name)}" for name in LAYOUT_SETTINGS)


def _sample_features(packed: PackedRows, features: np.ndarray) -> dict[int, np.ndarray]:
    """Splits packed [R, L, D] features back into per-sample [length, D] arrays."""
    out = {}
    for row, slot in zip(*np.nonzero(packed.sample_index >= 0)):
        out[int(packed.sample_index[row, slot])] = features[row, packed.segment_ids[row] == slot + 1]
    return out


def score_dataset(model: Llama, dataset: TokenizedDataset, cfg: ScoreConfig, mesh: Mesh, rules: ShardingRules,
                  out_path: Path, fingerprint: str, feature_dir: Path | None = None,
                  inputs: dict[str, Any] | None = None, profiler: StepProfiler | None = None) -> pa.Table:
    """Scores every sample of ``dataset`` and writes ``out_path`` (parquet, one row per sample, file order).

    Args:
      model: the target, placed on ``mesh`` by ``rules``.
      fingerprint: identifies everything the scores depend on; stored in the file and its parts.
      inputs: what the fingerprint hashes (JSON); stored in the file (:func:`read_inputs`) so that a
        stale file's error can name the setting that changed.
      feature_dir: also cache every sample's last hidden states there (same pass, no extra forward);
        see :mod:`flatspec_jax.data.feature_cache`.
      profiler: traces some of the batches this call scores (:mod:`flatspec_jax.profiling`).

    Returns:
      The scores table (also when everything was already current and nothing ran).
    """
    parts_dir = out_path.with_name(out_path.name + ".parts")
    scores_current = bool(process_zero_says(read_fingerprint(out_path) == fingerprint))
    if scores_current and (feature_dir is None or process_zero_says(
            feature_cache.index_is_current(feature_dir, fingerprint))):
        log.info("scores in %s are current; nothing to do", out_path)
        if jax.process_index() == 0 and parts_dir.exists():
            shutil.rmtree(parts_dir)  # left by a run killed after its last write (a features pass needs none)
        return pq.read_table(out_path)
    if dataset.lengths.max() > cfg.row_length:
        raise ConfigError(f"score.row_length={cfg.row_length} is shorter than the longest sample "
                          f"({dataset.lengths.max()} tokens); set it >= data.max_length")
    check_mesh_fits(cfg, mesh)
    # Every batch splits into equal row slices per data-parallel shard; each process feeds its devices' (_global_rows).
    plan = make_plan(dataset.lengths, cfg, batch_shards(mesh))
    log.info("scoring %d samples in %d batches of up to %d x %d tokens (padding %.1f%% of computed slots)",
             len(dataset), len(plan.batches), cfg.rows_per_batch, cfg.row_length, 100 * plan.padding)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if feature_dir is not None and jax.process_index() == 0:
        feature_cache.unseal(feature_dir)  # this pass may overwrite shards of an older one
    graphdef, params = nnx.split(model)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    step = compile_score_step(graphdef, cfg, plan.max_segments, mesh, rules, param_shardings,
                              return_features=feature_dir is not None)
    row_sharding = batch_sharding(mesh, rules, 2)
    local_rows = functools.cache(lambda shape: process_rows(row_sharding, shape))  # per batch shape (at most two)
    is_writer = jax.process_index() == 0
    progress = tqdm(total=len(dataset), unit="sample", desc="score", file=sys.stderr, disable=not is_writer,
                    dynamic_ncols=True)
    tokens_done, start = 0, time.perf_counter()
    part_fingerprint = _part_fingerprint(fingerprint, cfg)
    chunks = list(_chunks(len(plan.batches), cfg.flush_every))
    # With current scores only the feature shards are missing: a chunk whose shard is written needs no part.
    written = process_zero_says([
        (scores_current or read_fingerprint(parts_dir / f"part-{chunk.start:06d}.parquet") == part_fingerprint) and (
            feature_dir is None
            or feature_cache.shard_is_current(feature_dir, chunk.start, fingerprint, _chunk_samples(plan, chunk)))
        for chunk in chunks])
    if written.any():
        log.info("resuming: %d of %d parts (of %d batches each) are already written in %s", int(written.sum()),
                 len(chunks), cfg.flush_every, parts_dir)
    profiler = profiler or StepProfiler(None)
    steps_run = 0
    with profiler:
        for chunk, done in zip(chunks, written):
            part = parts_dir / f"part-{chunk.start:06d}.parquet"
            if reached_preemption():  # the parts before this chunk are written
                progress.close()
                raise Preempted(f"{stop_cause()} while scoring: the parts written so far are kept in {parts_dir}; "
                                "the same command resumes from them")
            if done:
                progress.update(len(_chunk_samples(plan, chunk)))
                continue
            tables, features = [], {}
            position_sum, position_count = np.zeros(cfg.row_length), np.zeros(cfg.row_length, np.int64)
            for b in chunk:
                packed = pack_rows(plan.batches[b], dataset.__getitem__, cfg.row_length, plan.max_segments)
                steps_run += 1
                with profiler.step(steps_run):
                    batch = _global_rows(packed, row_sharding, local_rows(packed.tokens.shape))
                    stats = jax.tree.map(np.asarray, step(params, *batch))
                profiler.step_done(steps_run, stats)
                position_sum += stats.pop("position_flatness_sum")
                position_count += stats.pop("position_count")
                if feature_dir is not None:
                    features.update(_sample_features(packed, stats.pop("features")))
                tables.append(_rows_to_table(packed, stats, dataset, fingerprint))
                tokens_done += packed.num_tokens
                progress.update(int((packed.sample_index >= 0).sum()))
                progress.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - start):.0f}")
            if is_writer:
                if feature_dir is not None:
                    feature_cache.write_shard(feature_dir, chunk.start, features, fingerprint)
                _write_parquet(part, pa.concat_tables(tables), part_fingerprint,
                               {POSITION_KEY: json.dumps([position_sum.tolist(), position_count.tolist()])})
    progress.close()
    multihost_utils.sync_global_devices("flatspec: score parts written")
    if is_writer:
        if not scores_current:
            table, positions = _merge_parts(parts_dir, part_fingerprint, len(dataset))
            _write_parquet(out_path, table, fingerprint, {"padding_fraction": f"{plan.padding:.6f}",
                                                          POSITION_KEY: json.dumps(positions),
                                                          INPUTS_KEY: json.dumps(inputs, sort_keys=True)})
            log.info("wrote %s (%d samples)", out_path, table.num_rows)
        if feature_dir is not None:
            feature_cache.write_index(feature_dir, [c.start for c in _chunks(len(plan.batches), cfg.flush_every)],
                                      model.arch.hidden_size, fingerprint)
            log.info("cached features of %d samples in %s", len(dataset), feature_dir)
        shutil.rmtree(parts_dir)  # last: until the index is sealed a re-run merges the parts again
    multihost_utils.sync_global_devices("flatspec: scores written")
    return pq.read_table(out_path)


def _merge_parts(parts_dir: Path, fingerprint: str, num_samples: int) -> tuple[pa.Table, list[list[float]]]:
    """All parts of this fingerprint, sorted into file order without the bookkeeping column,
    and their summed position statistics ([sums, counts])."""
    parts = [p for p in sorted(parts_dir.glob("part-*.parquet")) if read_fingerprint(p) == fingerprint]
    table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("index")
    if table.num_rows != num_samples or not np.array_equal(table["index"].to_numpy(), np.arange(num_samples)):
        raise RuntimeError(f"scoring parts in {parts_dir} cover {table.num_rows} of {num_samples} samples; "
                           "delete the directory and re-run")
    positions = np.sum([read_position_stats(p) for p in parts], axis=0)
    return table.drop(["index"]).replace_schema_metadata(None), positions.tolist()


def read_position_stats(path: Path) -> np.ndarray:
    """[2, L]: token flatness summed by position in the sample, and the token counts, of a scores file."""
    return np.asarray(json.loads(pq.read_schema(path).metadata[POSITION_KEY.encode()]))
