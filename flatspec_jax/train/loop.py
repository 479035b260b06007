"""The draft training loop: data, state placement, jitted steps, metrics, checkpoints and resume.

A run resumes from its latest checkpoint automatically: parameters, optimizer state, step
and the data iterator's position are restored, the noise key is derived from the step,
and the metrics log is cut back to that step, so a resumed run continues exactly as an
uninterrupted run would have (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from flatspec_jax.checkpoint.manager import (CHECKPOINT_DIR, DraftCheckpointer, draft_meta, opt_state_shardings,
                                             read_meta)
from flatspec_jax.config import Config, ConfigError, TrainConfig
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.data.pipeline import fixed_batches, plan_training_rows, train_and_heldout_indices, training_iterator
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import Llama
from flatspec_jax.profiling import StepProfiler
from flatspec_jax.runtime import Preempted, process_zero_says, reached_preemption, stop_cause
from flatspec_jax.sharding import (ShardingRules, batch_sharding, batch_shards, place_state,
                                   process_rows, state_shardings)
from flatspec_jax.train.metrics import HELDOUT_PREFIX, METRICS_FILE, MetricsLog, device_peak_gib, read_metrics
from flatspec_jax.train.optim import build_optimizer, learning_rate_schedule
from flatspec_jax.train.resume import check_resumable, refuse_imported_head, training_inputs
from flatspec_jax.train.step import StepSettings, TrainState, batch_spec, compile_steps, trained_counts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    steps: int
    train_samples: int
    train_tokens_per_step: int
    final: dict[str, float]
    heldout: dict[str, float]
    left_out: int = 0
    """Training samples left out: nothing to train within ``train.row_length``."""


def _global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """Process-local rows (those of :func:`~flatspec_jax.sharding.process_rows`) -> global arrays of
    ``global_rows`` rows (rows are the second axis: [A, R, L])."""

    def to_global(array: np.ndarray) -> jax.Array:
        shape = (array.shape[0], global_rows) + array.shape[2:]
        return jax.make_array_from_process_local_data(sharding, array, shape)

    return {name: to_global(array) for name, array in local.items()}


def _next_micro_batches(iterator: Any, count: int) -> dict[str, np.ndarray]:
    batches = [next(iterator) for _ in range(count)]
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def evaluate_heldout(evaluate, params: nnx.State, target_params: nnx.State, batches: Sequence[dict[str, np.ndarray]],
                     sharding: NamedSharding, unroll: int) -> dict[str, float]:
    """Held-out metrics (``eval_`` prefixed): every draft's masked means over all of ``batches`` (global
    [R, L] batches, placed with ``sharding``, that of [1, R, L] micro-batches), each draft's over its own
    trained positions, one batch in memory at a time."""
    counts = sum(np.asarray(trained_counts({name: value[None] for name, value in batch.items()}, unroll))
                 for batch in batches)
    totals = jax.device_put(np.asarray(counts, np.float32), NamedSharding(sharding.mesh, PartitionSpec()))
    sums: dict[str, float] = {}
    for batch in batches:
        arrays = {name: jax.device_put(value[None], sharding) for name, value in batch.items()}
        for name, value in jax.tree.map(float, evaluate(params, target_params, arrays, totals)).items():
            sums[name] = sums.get(name, 0.0) + value
    return {f"{HELDOUT_PREFIX}{name}": value for name, value in sums.items()}


def _untrained_metrics(evaluate, params: nnx.State, target_params: nnx.State,
                       batches: dict[str, jax.Array]) -> dict[str, float]:
    """The untrained head's loss terms on the first training batch ([A, R, L] global arrays), without
    the feature noise of a training step."""
    return jax.tree.map(float, evaluate(params, target_params, batches, None))


def _check_rows_fit_mesh(tcfg: TrainConfig, mesh: Mesh) -> None:
    """Every micro-batch's rows must split evenly over the mesh's batch shards (that every process holds
    some of the mesh's devices is checked where the mesh is made, ``RunContext.mesh``)."""
    shards = batch_shards(mesh)
    if tcfg.rows_per_step % shards:
        raise ConfigError(f"train.batch_tokens / (train.row_length x train.grad_accum) = {tcfg.rows_per_step} "
                          f"rows per micro-batch is not a multiple of the {shards} data-parallel shards "
                          "(mesh.data x mesh.fsdp)")


def train_draft(cfg: Config, run_dir: Path, mesh: Mesh, rules: ShardingRules, target: Llama,
                dataset: TokenizedDataset, selected_ids: Sequence[str] | None, target_vocab_hash: str,
                features: FeatureCache | None = None, draft_ids: np.ndarray | None = None) -> TrainSummary:
    """Trains (or resumes training) the EAGLE head on the selected samples; checkpoints under run_dir.

    With ``features`` (train.features=offline) the target's hidden states come from the cache
    instead of a target forward inside the step. ``draft_ids`` [N] (``draft.vocab``): the reduced
    vocabulary the head is trained over, saved in every checkpoint's metadata.
    """
    tcfg = cfg.train
    _check_rows_fit_mesh(tcfg, mesh)
    inputs = training_inputs(dataset, selected_ids)
    train_indices, heldout_indices = train_and_heldout_indices(dataset, cfg.data.heldout, selected_ids)
    lengths = dataset.lengths[train_indices]
    left_out = 0
    if (lengths > tcfg.row_length).any():  # scored and selected whole, trained on their first row_length tokens
        # A draft is trained at t where x_{t+2} is an assistant token (step.trained_positions): a sample whose
        # first row_length tokens hold none after its first two would only fill rows.
        untrained = np.array([not dataset[i][1][2:tcfg.row_length].any() for i in train_indices], bool)
        log.warning("%d of %d training samples are longer than train.row_length=%d: %d of their %d tokens are cut "
                    "(data.max_length=%d)%s", int((lengths > tcfg.row_length).sum()), len(lengths), tcfg.row_length,
                    int(np.maximum(lengths - tcfg.row_length, 0).sum()), int(lengths.sum()), cfg.data.max_length,
                    f"; {int(untrained.sum())} keep no assistant token to train on and are left out"
                    if untrained.any() else "")
        if untrained.all():
            raise ConfigError(f"train.row_length={tcfg.row_length} leaves no assistant token to train on in any of "
                              f"the {len(train_indices)} training samples")
        train_indices, left_out = train_indices[~untrained], int(untrained.sum())
    inputs["left_out"] = left_out  # how the rows are planned: compared on resume (train.resume)
    rows = plan_training_rows(dataset, train_indices, tcfg.row_length)
    log.info("training on %d samples packed into %d rows of %d tokens; %d held out", len(train_indices), len(rows),
             tcfg.row_length, len(heldout_indices))
    iterator = training_iterator(dataset, rows, row_length=tcfg.row_length, global_rows_per_batch=tcfg.rows_per_step,
                                 seed=cfg.data.shuffle_seed, num_workers=cfg.data.num_workers, features=features,
                                 positions=process_rows(batch_sharding(mesh, rules, 1), (tcfg.rows_per_step,)))
    heldout = (fixed_batches(dataset, heldout_indices, row_length=tcfg.row_length, rows_per_batch=tcfg.rows_per_step,
                             features=features) if len(heldout_indices) else [])

    checkpoints = DraftCheckpointer(run_dir / CHECKPOINT_DIR, tcfg.keep_checkpoints)
    # Process 0's view of the directory, for all: processes resuming from different steps would
    # part ways at the first restore or save.
    on_disk = checkpoints.latest_step()
    latest = int(process_zero_says(-1 if on_disk is None else on_disk))
    start = max(latest, 0)
    if latest == 0:  # only `flatspec import` writes a step 0
        checkpoints.close()
        refuse_imported_head(checkpoints.directory)
    if start:  # before any compilation: a run that may not resume fails at once
        check_resumable(checkpoints.directory, read_meta(checkpoints.directory, start)[1], cfg, inputs, start)
    if start >= tcfg.steps:  # nothing left to train: report what the finished run logged
        log.log(logging.INFO if start == tcfg.steps else logging.WARNING,
                "%s holds step %d (train.steps=%d): nothing to train; the head of step %d is the run's",
                checkpoints.directory, start, tcfg.steps, start)
        checkpoints.close()
        return _finished_summary(run_dir / METRICS_FILE, start, tcfg, len(train_indices), left_out)
    # JAX's preemption sync settles on one check past the furthest any process reported: check once before
    # the first step, so a SIGTERM during restore and compilation stops this run at its first step.
    if reached_preemption():
        checkpoints.close()
        raise Preempted(f"{stop_cause()} before training resumed; {checkpoints.directory} holds step {start}, "
                        "from which the same command resumes")
    head = create_eagle_head(target.arch, cfg.draft.num_layers, seed=cfg.seed, dtype=tcfg.compute_dtype)
    head_graphdef, params = nnx.split(head)
    param_shardings = state_shardings(params, mesh, rules)
    params = place_state(params, mesh, rules)
    tx = build_optimizer(tcfg)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(params))
    target_graphdef, target_params = nnx.split(target)
    target_shardings = jax.tree.map(lambda a: a.sharding, target_params)
    train_step, evaluate = compile_steps(head_graphdef, target_graphdef, tx, StepSettings.from_config(tcfg, cfg.seed),
                                         shardings, target_shardings, mesh, rules, draft_ids)

    if start:
        state = checkpoints.restore(start, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                                    shardings, tx, iterator)
        log.info("resumed from %s/%d", checkpoints.directory, start)
    meta = draft_meta(cfg.to_dict(), head.arch, target.arch, target_vocab_hash, fc_bias=head.fc_bias is not None,
                      draft_vocab=draft_ids, inputs=inputs)
    metrics_log = MetricsLog(run_dir, resume_step=start)
    schedule = learning_rate_schedule(tcfg)
    rows_sharding = batch_spec(mesh, rules, 1)  # [A, R, L] micro-batches, rows over the batch axes
    final: dict[str, float] = {}
    heldout_metrics: dict[str, float] = {}
    progress = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    window_start, window_counts = time.perf_counter(), []
    try:  # a failed save (a full disk) must not leave orbax's save thread holding the process at exit
        with StepProfiler.for_stage(cfg.profile, run_dir, "train") as profiler:
            for step in range(start + 1, tcfg.steps + 1):
                local = _next_micro_batches(iterator, tcfg.grad_accum)
                batches = _global_batch(local, rows_sharding, tcfg.rows_per_step)
                if step == 1:  # the untrained head: the baseline of the curves
                    heldout_metrics = (evaluate_heldout(evaluate, state.params, target_params, heldout, rows_sharding,
                                                        tcfg.unroll) if heldout else {})
                    metrics_log.write({"step": 0, **_untrained_metrics(evaluate, state.params, target_params, batches),
                                       **heldout_metrics})
                evaluated = bool(heldout) and (step % tcfg.eval_every == 0 or step == tcfg.steps)
                logged = step % tcfg.log_every == 0 or step == tcfg.steps or evaluated
                with profiler.step(step - start):
                    state, metrics = train_step(state, target_params, batches, logged)
                profiler.step_done(step - start, (state, metrics))
                progress.update(1)
                if step == start + 1:  # this process's first step compiled train_step: its time is no throughput
                    jax.block_until_ready(state)
                    window_start = time.perf_counter()
                else:
                    window_counts.append(metrics["tokens"])  # a device scalar: read when the step is logged
                eval_metrics = None
                if evaluated:
                    jax.block_until_ready(state.params)  # the steps so far count as training time, the evaluation not
                    paused = time.perf_counter()
                    eval_metrics = evaluate_heldout(evaluate, state.params, target_params, heldout, rows_sharding,
                                                    tcfg.unroll)
                    heldout_metrics = eval_metrics
                    window_start += time.perf_counter() - paused
                if logged:
                    final = {name: float(value) for name, value in metrics.items()}  # waits for the step to finish
                    final["lr"] = float(schedule(step - 1))
                    if window_counts:  # none when the first step is logged
                        window_tokens = sum(float(count) for count in window_counts)
                        final["tokens_per_s"] = window_tokens / (time.perf_counter() - window_start)
                    peak = device_peak_gib()
                    if peak is not None:
                        final["device_peak_gib"] = peak
                    progress.set_postfix(loss=f"{final['loss']:.4f}", top1=f"{final['top1']:.3f}")
                    window_start, window_counts = time.perf_counter(), []
                    metrics_log.write({"step": step, **final, **(eval_metrics or {})})  # one record per step
                # Told to stop (SIGTERM or Ctrl-C; in a multi-process job at the step the processes agree on): save
                # this step and stop, and a re-run resumes from it.
                preempted = reached_preemption()
                if step % tcfg.save_every == 0 or step == tcfg.steps or preempted:
                    checkpoints.save(step, state, iterator, meta,
                                     metrics=None if eval_metrics is None else {"eval_loss": eval_metrics["eval_loss"]})
                if preempted and step < tcfg.steps:  # at the last step the run is simply done
                    checkpoints.wait()
                    raise Preempted(f"{stop_cause()} at step {step}: saved it to {checkpoints.directory}; the same "
                                    "command resumes from it")
        checkpoints.wait()
    finally:
        progress.close()
        checkpoints.close()
        metrics_log.close()
    return TrainSummary(steps=tcfg.steps, train_samples=len(train_indices), train_tokens_per_step=tcfg.batch_tokens,
                        final=final, heldout=heldout_metrics, left_out=left_out)


def _finished_summary(metrics_path: Path, steps: int, tcfg: TrainConfig, train_samples: int,
                      left_out: int) -> TrainSummary:
    """The summary of a run whose last checkpoint, of step ``steps``, ends its training, from what it logged."""
    records = [r for r in read_metrics(metrics_path) if r["step"] <= steps]  # not what a lost tail logged
    last_logged = next((r for r in reversed(records) if "loss" in r), {})
    last_evaluated = next((r for r in reversed(records) if "eval_loss" in r), {})
    final = {name: value for name, value in last_logged.items()
             if name != "step" and not name.startswith(HELDOUT_PREFIX)}
    heldout = {name: value for name, value in last_evaluated.items() if name.startswith(HELDOUT_PREFIX)}
    return TrainSummary(steps=steps, train_samples=train_samples, train_tokens_per_step=tcfg.batch_tokens,
                        final=final, heldout=heldout, left_out=left_out)
