"""Tests for flatspec_jax.scoring and the ``flatspec score`` stage, on a tiny random Llama.

The tiny model (:mod:`tiny_target`) is an HF directory saved next to SmolLM2's tokenizer, so
``model.path=<dir>`` serves both the weights and the chat template. What is checked:

* the scores do not depend on the mesh (8 fake CPU devices, data and fsdp sharding, vs one);
* packed rows give the scores of each sample run alone, and both equal an independent
  float64 NumPy computation (softmax, cosine with the uniform vector, masked means over the
  positions whose *next* token is trained);
* ``flatspec score`` killed with SIGKILL mid-run resumes from its parts, recomputes only
  the missing batches, and ends with the same file as an uninterrupted run;
* re-running a finished score does nothing; changing ``score.temperature`` recomputes;
* configuration errors name the key at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

from flatspec_jax import scoring
from flatspec_jax.config import ConfigError, MeshConfig, ScoreConfig, load_config
from flatspec_jax.data import feature_cache
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.data.prepare import prepare_samples
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.flatness import sample_stats, token_stats_from_logits
from flatspec_jax.models.llama import create_model
from flatspec_jax.models.masks import causal_mask
from flatspec_jax.runtime import Preempted
from flatspec_jax.scoring import STAT_COLUMNS, read_fingerprint, score_dataset
from flatspec_jax.sharding import ShardingRules, make_mesh
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import score_fingerprint
from flatspec_jax.weights.arch import ArchSpec
from flatspec_jax.weights.to_nnx import load_target_model
from random_weights import random_module
from tiny_target import cli_env, save_tiny_llama

TOL = 1e-5
NUM_SAMPLES = 30
MAX_SAMPLE = 60
ROWS = 8  # rows_per_batch: a multiple of the 8 data-parallel shards used below


# ----------------------------------------------------------------------------------------------
# Fixtures: the tiny model (HF directory with SmolLM2's tokenizer) and a synthetic dataset
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def synthetic_dataset(num_samples: int = NUM_SAMPLES, vocab: int = 49152, seed: int = 0) -> TokenizedDataset:
    """Random token ids of random lengths 1..MAX_SAMPLE with random assistant masks, plus edge cases:
    a one-token sample (no prediction position), a sample with no trained token, one all trained."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        length = 1 if i == 5 else MAX_SAMPLE if i == 7 else int(rng.integers(2, MAX_SAMPLE + 1))
        ids = rng.integers(0, vocab, length)
        mask = (rng.random(length) < 0.6).astype(np.int8)
        if i == 3:
            mask[:] = 0
        if i == 9:
            mask[:] = 1
        samples.append((f"sample-{i}", ids, mask, False))
    return TokenizedDataset.from_samples(samples, "synthetic")


@pytest.fixture(scope="module")
def dataset() -> TokenizedDataset:
    return synthetic_dataset()


def score_on(model_dir: Path, dataset: TokenizedDataset, mesh_cfg: MeshConfig, out: Path,
             devices=None, **score_kw) -> dict[str, np.ndarray]:
    mesh = make_mesh(mesh_cfg, devices)
    rules = ShardingRules()
    model = load_target_model(str(model_dir), mesh, rules)
    table = score_dataset(model, dataset, ScoreConfig(**score_kw), mesh, rules, out, "test-fingerprint")
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def single_device() -> list[jax.Device]:
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def single_run(tiny_dir, dataset, tmp_path_factory) -> tuple[dict[str, np.ndarray], Path]:
    """The reference: one device, row_length 64 (up to 4 samples per row); the scores and their file."""
    out = tmp_path_factory.mktemp("single") / "scores.parquet"
    return score_on(tiny_dir, dataset, MeshConfig(), out, single_device(), row_length=64, rows_per_batch=ROWS), out


@pytest.fixture(scope="module")
def single_scores(single_run) -> dict[str, np.ndarray]:
    return single_run[0]


def assert_scores_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float = TOL) -> None:
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, equal_nan=True, err_msg=name)
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(want[name]), err_msg=name)
    for name in ("n_tokens", "n_trained_tokens"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(got["id"], want["id"])


# ----------------------------------------------------------------------------------------------
# Mesh independence
# ----------------------------------------------------------------------------------------------


def test_single_device_scores_are_in_file_order_and_sane(single_scores, dataset):
    np.testing.assert_array_equal(single_scores["id"], dataset.ids)
    np.testing.assert_array_equal(single_scores["n_tokens"], dataset.lengths)
    flat = single_scores["flatness_all"]
    finite = flat[~np.isnan(flat)]
    assert np.all((finite >= 49152 ** -0.5) & (finite <= 1.0))
    assert finite.std() > 1e-3, "the tiny model's distributions should not all be equally flat"
    assert np.isnan(single_scores["flatness_all"][5])  # one token: nothing predicted
    assert np.isnan(single_scores["flatness"][3]) and single_scores["n_trained_tokens"][3] == 0


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=4), MeshConfig(data=4, tensor=2),
                                      MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "data2_fsdp4", "data4_tensor2", "data2_fsdp2_tensor2"])
def test_sharded_scores_equal_single_device(tiny_dir, dataset, single_scores, mesh_cfg, tmp_path):
    assert jax.device_count() == 8
    got = score_on(tiny_dir, dataset, mesh_cfg, tmp_path / "scores.parquet", row_length=64, rows_per_batch=ROWS)
    assert_scores_close(got, single_scores)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=4, tensor=2), MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["data4_tensor2", "data2_fsdp2_tensor2"])
def test_a_tensor_parallel_scoring_step_never_gathers_the_lm_head(tiny_dir, mesh_cfg):
    """With the head's vocabulary split over mesh.tensor each device reduces its own rows of it: the
    compiled step holds no [V, D] buffer (the gathered head of the single-device path would be one)."""
    mesh, rules = make_mesh(mesh_cfg), ShardingRules()
    graphdef, params = nnx.split(load_target_model(str(tiny_dir), mesh, rules))
    vocab, dim = nnx.merge(graphdef, params).lm_head_weight().shape
    rows = [np.zeros((ROWS, 64), np.int32), np.tile(np.arange(64, dtype=np.int32), (ROWS, 1)),
            np.ones((ROWS, 64), np.int32), np.ones((ROWS, 64), np.int32)]
    step = jax.jit(functools.partial(scoring._score_rows, graphdef, num_segments=4, temperature=1.0, vocab_chunk=1024,
                                     return_features=False, mesh=mesh, rules=rules))
    assert f"f32[{vocab},{dim}]" not in step.lower(params, *rows).compile().as_text()


def test_sharded_feature_cache_equals_single_device_and_stays_split_by_rows(tiny_dir, dataset, tmp_path,
                                                                           monkeypatch):
    shardings = []
    original = scoring.compile_score_step

    def recording(*args, **kwargs):
        step = original(*args, **kwargs)

        def run(*inputs):
            out = step(*inputs)
            shardings.append(out["features"].sharding)
            return out
        return run

    def cached(mesh_cfg: MeshConfig, devices, name: str) -> FeatureCache:
        mesh, rules = make_mesh(mesh_cfg, devices), ShardingRules()
        model = load_target_model(str(tiny_dir), mesh, rules)
        score_dataset(model, dataset, ScoreConfig(row_length=64, rows_per_batch=ROWS), mesh, rules,
                      tmp_path / name / "scores.parquet", "test-fingerprint", feature_dir=tmp_path / name / "features")
        return FeatureCache(tmp_path / name / "features")

    want = cached(MeshConfig(), single_device(), "single")
    monkeypatch.setattr(scoring, "compile_score_step", recording)
    got = cached(MeshConfig(data=8), None, "data8")
    # Each device holds its own rows of the hidden states, not a copy of the whole batch.
    assert shardings and all(not s.is_fully_replicated and s.spec[0] is not None for s in shardings)
    assert len(got) == len(want) == len(dataset)
    for sample in range(len(dataset)):
        np.testing.assert_allclose(got[sample].astype(np.float32), want[sample].astype(np.float32),
                                   rtol=2e-2, atol=2e-2, err_msg=f"sample {sample}")


# ----------------------------------------------------------------------------------------------
# Packed vs unpacked vs an independent NumPy computation
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, positions):
    mask = causal_mask(tokens.shape[0], tokens.shape[1])
    return nnx.merge(graphdef, state)(tokens, positions, mask).logits


@pytest.fixture(scope="module")
def per_sample_logits(tiny_dir, dataset) -> list[np.ndarray]:
    """Each sample alone in its own row (plain causal mask, right padding that no real position
    can see): [n, V] float32 logits per sample, from the model's ordinary logits path."""
    model = load_target_model(str(tiny_dir), make_mesh(MeshConfig(), single_device()), ShardingRules())
    graphdef, state = nnx.split(model)
    width, group = MAX_SAMPLE, 6
    out = []
    for start in range(0, len(dataset), group):
        members = range(start, min(start + group, len(dataset)))
        tokens = np.zeros((group, width), np.int32)
        for row, i in enumerate(members):
            ids, _ = dataset[i]
            tokens[row, :len(ids)] = ids
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
        logits = np.asarray(_logits(graphdef, state, tokens, positions))
        out.extend(logits[row, :len(dataset[i][0])] for row, i in enumerate(members))
    return out


def numpy_sample_scores(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray, temperature: float) -> dict:
    """float64, from the definitions: p = softmax(z / T) at position t predicts token t + 1;
    ``flatness`` etc. average the t whose next token has loss_mask 1, ``flatness_all`` every t < n - 1."""
    z = logits[:-1].astype(np.float64) / temperature
    vocab = z.shape[-1]
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    uniform = np.full(vocab, 1.0 / vocab)
    flat = (p @ uniform) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(uniform))
    per_token = {
        "flatness": flat,
        "entropy": -(p * log_p).sum(-1),
        "top1_prob": p.max(-1),
        "nll": -log_p[np.arange(len(z)), ids[1:]],
    }
    trained = mask[1:] > 0

    def mean(x, where):
        return float(x[where].mean()) if where.any() else np.nan

    result = {name: mean(v, trained) for name, v in per_token.items()}
    result["flatness_all"] = mean(flat, np.ones(len(z), bool))
    result["n_trained_tokens"] = int(trained.sum())
    return result


def numpy_scores(per_sample_logits, dataset, temperature: float = 1.0) -> dict[str, np.ndarray]:
    rows = [numpy_sample_scores(z, *dataset[i], temperature) for i, z in enumerate(per_sample_logits)]
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


@functools.partial(jax.jit, static_argnames="temperature")
def _unpacked_means(logits, ids, loss_mask, valid, temperature):
    stats = token_stats_from_logits(logits[:, :-1], ids[:, 1:], temperature)
    return sample_stats(stats, loss_mask[:, 1:], valid[:, 1:])


def jax_unpacked_scores(per_sample_logits, dataset, temperature: float = 1.0, group: int = 6) -> dict[str, np.ndarray]:
    """The library's own per-token path on unpacked samples, one sample per row padded to
    MAX_SAMPLE: token_stats_from_logits + sample_stats (valid_mask marks the real positions)."""
    vocab = per_sample_logits[0].shape[-1]
    rows = []
    for start in range(0, len(dataset), group):
        members = list(range(start, min(start + group, len(dataset))))
        logits = np.zeros((group, MAX_SAMPLE, vocab), np.float32)
        ids = np.zeros((group, MAX_SAMPLE), np.int32)
        mask = np.zeros((group, MAX_SAMPLE), np.int32)
        valid = np.zeros((group, MAX_SAMPLE), np.int32)
        for row, i in enumerate(members):
            n = dataset.lengths[i]
            logits[row, :n] = per_sample_logits[i]
            ids[row, :n], mask[row, :n] = dataset[i]
            valid[row, :n] = 1
        means = _unpacked_means(logits, ids, mask, valid, temperature)
        rows.extend({k: np.asarray(v)[row] for k, v in means.items()} for row in range(len(members)))
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def assert_stats_match(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float = TOL) -> None:
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(got["n_trained_tokens"], want["n_trained_tokens"])


def test_packed_equals_numpy_reference(single_scores, per_sample_logits, dataset):
    """Row length 64 packs up to 4 samples per row; each still gets its lone-sample float64 scores."""
    assert_stats_match(single_scores, numpy_scores(per_sample_logits, dataset))


def test_library_unpacked_path_equals_numpy_reference(per_sample_logits, dataset):
    """Samples unpacked (one per row) through token_stats_from_logits + sample_stats."""
    assert_stats_match(jax_unpacked_scores(per_sample_logits, dataset), numpy_scores(per_sample_logits, dataset))


def test_a_sample_that_fills_its_row_has_no_next_token_at_the_last_position():
    """The last slot of a row predicts nothing, even when the row's only sample reaches it (a next token
    read by wrapping around to the row's start would be the same sample's first token): a sample filling
    its row scores as it does with padding after it, over its n - 1 prediction positions."""
    arch = ArchSpec(architecture="llama", vocab_size=13, hidden_size=8, intermediate_size=12, num_layers=1,
                    num_heads=1, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
    graphdef, params = nnx.split(random_module(lambda: create_model(arch), seed=1))
    step = jax.jit(functools.partial(scoring._score_rows, graphdef, num_segments=1, temperature=1.0, vocab_chunk=13,
                                     return_features=False, mesh=make_mesh(MeshConfig(), single_device()),
                                     rules=ShardingRules()))
    n, pad = 11, 3
    tokens = np.random.default_rng(2).integers(1, arch.vocab_size, (1, n)).astype(np.int32)
    ones = np.ones((1, n), np.int32)  # every token trained, the first one too
    full = step(params, tokens, np.arange(n, dtype=np.int32)[None], ones, ones)

    def padded(x):
        return np.pad(x, [(0, 0), (0, pad)])

    alone = step(params, padded(tokens), padded(np.arange(n, dtype=np.int32)[None]), padded(ones), padded(ones))
    assert int(full["n_tokens"][0, 0]) == int(full["n_trained_tokens"][0, 0]) == n - 1
    for name in (*STAT_COLUMNS, "n_tokens", "n_trained_tokens"):
        np.testing.assert_allclose(np.asarray(full[name]), np.asarray(alone[name]), rtol=TOL, err_msg=name)


def test_dense_packing_temperature_and_uneven_vocab_chunks_match_numpy(tiny_dir, dataset, per_sample_logits,
                                                                       tmp_path):
    """Row length 256 packs up to 16 samples per row (one row per batch), at T = 1.7 and with a
    vocabulary chunk (5000) that does not divide 49152 (a narrower last step)."""
    plan = scoring.make_plan(dataset.lengths, ScoreConfig(row_length=256, rows_per_batch=1))
    assert max(len(r) for b in plan.batches for r in b) > 4
    got = score_on(tiny_dir, dataset, MeshConfig(), tmp_path / "scores.parquet", single_device(),
                   row_length=256, rows_per_batch=1, temperature=1.7, vocab_chunk=5000)
    assert_stats_match(got, numpy_scores(per_sample_logits, dataset, temperature=1.7))


def test_positions_statistics_sum_the_token_flatness(single_run, dataset):
    """The per-position flatness sums stored in the file's metadata add up to the per-sample sums."""
    scores, out = single_run
    sums, counts = scoring.read_position_stats(out)
    n_pred = np.maximum(dataset.lengths - 1, 0)
    assert counts.sum() == n_pred.sum()
    np.testing.assert_array_equal(counts[:MAX_SAMPLE], [(n_pred > t).sum() for t in range(MAX_SAMPLE)])
    flat_all = np.nan_to_num(scores["flatness_all"])
    np.testing.assert_allclose(sums.sum(), (flat_all * n_pred).sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------


def test_rows_per_batch_not_divisible_by_data_shards_names_the_key(tiny_dir, dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"score\.rows_per_batch"):
        score_on(tiny_dir, dataset, MeshConfig(data=2, fsdp=4), tmp_path / "scores.parquet",
                 row_length=64, rows_per_batch=4)
    assert not (tmp_path / "scores.parquet").exists()


def test_row_length_shorter_than_longest_sample_names_the_key(tiny_dir, dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"score\.row_length"):
        score_on(tiny_dir, dataset, MeshConfig(), tmp_path / "scores.parquet", single_device(),
                 row_length=MAX_SAMPLE - 1, rows_per_batch=1)
    assert not (tmp_path / "scores.parquet").exists()


# ----------------------------------------------------------------------------------------------
# The `flatspec score` stage: kill -9 and resume, no-op re-run, invalidation
# ----------------------------------------------------------------------------------------------

CLI_LIMIT = 100  # ShareGPT conversations; about half keep an assistant token within 64 tokens


def cli_overrides(tiny_dir: Path) -> list[str]:
    return [f"model.path={tiny_dir}", f"data.limit={CLI_LIMIT}", "data.max_length=64", "score.row_length=64",
            "score.rows_per_batch=2", "score.flush_every=1", "mesh.data=1"]


# Runs `flatspec` with the scoring step wrapped to count how many batches it computes.
COUNTING_CLI = textwrap.dedent("""
    import atexit, os, sys
    import flatspec_jax.scoring as scoring
    calls = [0]
    original = scoring.compile_score_step
    def counting(*args, **kwargs):
        step = original(*args, **kwargs)
        def counted(*a):
            calls[0] += 1
            return step(*a)
        return counted
    scoring.compile_score_step = counting
    atexit.register(lambda: open(os.environ["FLATSPEC_TEST_COUNT"], "w").write(str(calls[0])))
    from flatspec_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def flatspec_score(run_dir: Path, tiny_dir: Path, env: dict, count_file: Path | None = None) -> list[str]:
    argv = ["score", "--run-dir", str(run_dir)] + [x for o in cli_overrides(tiny_dir) for x in ("--set", o)]
    if count_file is None:
        return [sys.executable, "-m", "flatspec_jax.cli"] + argv
    env["FLATSPEC_TEST_COUNT"] = str(count_file)
    return [sys.executable, "-c", COUNTING_CLI] + argv


def part_indices(parts: list[Path]) -> list[np.ndarray]:
    return [pq.read_table(p)["index"].to_numpy() for p in parts]


@pytest.fixture(scope="module")
def cli_runs(tiny_dir, tmp_path_factory) -> dict:
    """An uninterrupted run, and a run killed with SIGKILL after its first parts and then resumed.

    The uninterrupted reference runs concurrently with the other two (most of a run is
    single-threaded start-up), with its own cache dir so that the two never write the same
    XLA cache entry at once; the killed and the resumed run share theirs.
    """
    base = tmp_path_factory.mktemp("cli")
    env = cli_env(base / "cache")
    reference = base / "reference"
    reference_log = base / "reference.log"
    ref_env = cli_env(base / "reference_cache")
    with open(reference_log, "w") as log:
        ref_proc = subprocess.Popen(flatspec_score(reference, tiny_dir, ref_env), env=ref_env,
                                    stdout=subprocess.DEVNULL, stderr=log)

    # Killed run: SIGKILL once a part exists but before the merged file does.
    resumed = base / "resumed"
    parts_dir = resumed / "scores.parquet.parts"
    killed_log = base / "killed.log"
    with open(killed_log, "w") as log:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(flatspec_score(resumed, tiny_dir, env), env=env, stdout=subprocess.DEVNULL,
                                stderr=log)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if parts_dir.is_dir() and any(parts_dir.glob("part-*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed (rc " \
        f"{proc.returncode}); make the data bigger\n{killed_log.read_text()[-2000:]}"
    assert not (resumed / "scores.parquet").exists()
    parts = sorted(parts_dir.glob("part-*.parquet"))
    leftovers = sorted(p.name for p in parts_dir.iterdir() if p not in parts)
    indices = part_indices(parts)
    # Each part holds one batch (flush_every=1); parts are complete, tagged and disjoint.
    fingerprints = {read_fingerprint(p) for p in parts}
    # A temporary file left by a kill during an atomic write: see test_resume_after_kill_during_a_part_write.
    for name in leftovers:
        (parts_dir / name).unlink()

    count_file = base / "resume_count"
    again = subprocess.run(flatspec_score(resumed, tiny_dir, env, count_file), env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ref_proc.wait(timeout=300) == 0, reference_log.read_text()[-3000:]
    match = re.search(r"scoring (\d+) samples in (\d+) batches", reference_log.read_text())
    assert match, reference_log.read_text()[-3000:]
    num_samples, num_batches = map(int, match.groups())
    return dict(reference=reference, resumed=resumed, num_samples=num_samples, num_batches=num_batches,
                parts_at_kill=parts, part_indices=indices, part_fingerprints=fingerprints, leftovers=leftovers,
                computed_on_resume=int(count_file.read_text()), env=env, base=base)


def test_killed_run_left_complete_disjoint_parts(cli_runs):
    parts = cli_runs["parts_at_kill"]
    assert 1 <= len(parts) < cli_runs["num_batches"]
    assert len(cli_runs["part_fingerprints"]) == 1 and None not in cli_runs["part_fingerprints"]
    all_indices = np.concatenate(cli_runs["part_indices"])
    assert len(np.unique(all_indices)) == len(all_indices), "a sample was written to two parts"


def test_resume_computes_only_the_missing_batches(cli_runs):
    assert cli_runs["computed_on_resume"] == cli_runs["num_batches"] - len(cli_runs["parts_at_kill"])


def test_resumed_file_equals_uninterrupted(cli_runs):
    reference = cli_runs["reference"] / "scores.parquet"
    resumed = cli_runs["resumed"] / "scores.parquet"
    assert not (cli_runs["resumed"] / "scores.parquet.parts").exists()
    want, got = pq.read_table(reference), pq.read_table(resumed)
    assert got.num_rows == cli_runs["num_samples"]
    assert len(set(got["id"].to_pylist())) == got.num_rows, "a sample appears twice"
    assert got.equals(want), "resumed scores differ from the uninterrupted run's"
    assert pq.read_schema(resumed).metadata == pq.read_schema(reference).metadata
    # Stronger: the files are byte for byte identical (same program, same inputs, same writer).
    assert resumed.read_bytes() == reference.read_bytes()


def _stage_inputs(run_dir: Path, tiny_dir: Path, extra: list[str] = ()):
    """What `flatspec score` computes before scoring, in-process on one device (the test process
    has 8 devices, and the fingerprint does not depend on the mesh)."""
    cfg = load_config(None, cli_overrides(tiny_dir) + [f"run_dir={run_dir}"] + list(extra))
    dataset = prepare_samples(cfg.data, str(tiny_dir), load_tokenizer(tiny_dir), run_dir)
    mesh = make_mesh(MeshConfig(), single_device())
    rules = ShardingRules()
    model = load_target_model(str(tiny_dir), mesh, rules)
    return cfg, dataset, model, mesh, rules


def test_rerun_of_finished_score_is_a_noop_and_temperature_invalidates(cli_runs, tiny_dir, monkeypatch):
    run_dir = cli_runs["base"] / "rerun"
    shutil.copytree(cli_runs["reference"], run_dir)
    out = run_dir / "scores.parquet"
    before_bytes, before_mtime = out.read_bytes(), out.stat().st_mtime_ns
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(cli_runs["base"] / "cache"))

    cfg, dataset, model, mesh, rules = _stage_inputs(run_dir, tiny_dir)
    fingerprint = score_fingerprint(cfg, dataset.fingerprint)
    assert read_fingerprint(out) == fingerprint

    def no_compiling(*args, **kwargs):
        raise AssertionError("a finished score must not compile or run the scoring step")

    leftover = run_dir / "scores.parquet.parts"  # as a run killed between the last write and cleanup leaves it
    leftover.mkdir()
    (leftover / "part-000000.parquet").write_bytes(b"stale")
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "compile_score_step", no_compiling)
        table = score_dataset(model, dataset, cfg.score, mesh, rules, out, fingerprint)
    assert out.read_bytes() == before_bytes and out.stat().st_mtime_ns == before_mtime
    assert not leftover.exists()
    assert table.equals(pq.read_table(out))
    for layout in ("score.flush_every=3", "score.rows_per_batch=4", "score.vocab_chunk=64", "score.row_length=256"):
        regrouped, *_ = _stage_inputs(run_dir, tiny_dir, [layout])
        assert score_fingerprint(regrouped, dataset.fingerprint) == fingerprint, layout  # it only cuts the work
        assert scoring._part_fingerprint(fingerprint, regrouped.score) != scoring._part_fingerprint(fingerprint,
                                                                                                    cfg.score), layout
    moved_model = shutil.copytree(tiny_dir, cli_runs["base"] / "moved_model", dirs_exist_ok=True)
    moved, moved_dataset, *_ = _stage_inputs(run_dir, moved_model)
    assert moved.model.path != cfg.model.path
    assert score_fingerprint(moved, moved_dataset.fingerprint) == fingerprint  # model files count by content

    hot, dataset2, model2, mesh2, rules2 = _stage_inputs(run_dir, tiny_dir, ["score.temperature=2.0"])
    hot_fingerprint = score_fingerprint(hot, dataset2.fingerprint)
    assert hot_fingerprint != fingerprint
    hot_table = score_dataset(model2, dataset2, hot.score, mesh2, rules2, out, hot_fingerprint)
    assert read_fingerprint(out) == hot_fingerprint and out.read_bytes() != before_bytes
    cold_flat = table["flatness"].to_numpy()
    hot_flat = hot_table["flatness"].to_numpy()
    assert hot_table["id"].equals(table["id"])
    assert np.all(hot_flat > cold_flat), "a higher temperature flattens every distribution"


def test_a_feature_pass_resumed_at_another_grouping_rewrites_shards_of_other_samples(cli_runs, tiny_dir,
                                                                                      monkeypatch):
    """A feature pass at flush_every=1 wrote one shard per batch; a scores-only pass at flush_every=2
    left its parts (two batches each) and died before merging them. A feature pass at flush_every=2
    then finds part-000000 current, but shard-000000 holds batch 0's samples only: it must recompute
    that chunk, or it would seal a cache missing every odd batch's samples."""
    run_dir = cli_runs["base"] / "regrouped"
    run_dir.mkdir()
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(cli_runs["base"] / "cache"))
    out, features = run_dir / "scores.parquet", run_dir / "features"
    cfg, dataset, model, mesh, rules = _stage_inputs(run_dir, tiny_dir)
    fingerprint = score_fingerprint(cfg, dataset.fingerprint)
    score_dataset(model, dataset, cfg.score, mesh, rules, out, fingerprint, feature_dir=features)
    want = FeatureCache(features)
    want = {i: np.asarray(want[i]) for i in range(len(dataset))}
    pairs = dataclasses.replace(cfg.score, flush_every=2)
    out.unlink()
    with monkeypatch.context() as patch:  # the scores-only pass dies after its parts, before cleaning up
        patch.setattr(scoring.shutil, "rmtree", lambda *args, **kwargs: None)
        score_dataset(model, dataset, pairs, mesh, rules, out, fingerprint)
    out.unlink()
    feature_cache.unseal(features)
    assert len(list((run_dir / "scores.parquet.parts").glob("part-*.parquet"))) >= 2
    score_dataset(model, dataset, pairs, mesh, rules, out, fingerprint, feature_dir=features)
    got = FeatureCache(features)
    assert len(got) == len(dataset)
    for i in range(len(dataset)):
        np.testing.assert_array_equal(np.asarray(got[i]), want[i])


def test_a_feature_pass_over_current_scores_keeps_the_shards_a_killed_one_wrote(cli_runs, tiny_dir, monkeypatch):
    """`flatspec cache` killed after some shards, over a scores.parquet already current; a scores-only run
    (`flatspec score`) then finds its scores current and removes the parts. The next feature pass needs no
    part where the scores are current: it computes only the missing shards and leaves the scores file alone."""
    run_dir = cli_runs["base"] / "cache_over_scores"
    run_dir.mkdir()
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(cli_runs["base"] / "cache"))
    out, features = run_dir / "scores.parquet", run_dir / "features"
    cfg, dataset, model, mesh, rules = _stage_inputs(run_dir, tiny_dir, ["score.flush_every=1"])
    fingerprint = score_fingerprint(cfg, dataset.fingerprint)
    score_dataset(model, dataset, cfg.score, mesh, rules, out, fingerprint, feature_dir=features)
    want = FeatureCache(features)
    want = {i: np.asarray(want[i]) for i in range(len(dataset))}
    feature_cache.unseal(features)  # as the killed pass left it: the first shard only
    shards = sorted(features.glob("shard-*.npy"))
    assert len(shards) >= 2
    for shard in shards[1:]:
        shard.unlink()
        shard.with_suffix(".json").unlink()
    score_dataset(model, dataset, cfg.score, mesh, rules, out, fingerprint)  # scores current: parts removed
    assert not (run_dir / "scores.parquet.parts").exists()
    scores_bytes = out.read_bytes()
    written, write_shard = [], feature_cache.write_shard
    monkeypatch.setattr(feature_cache, "write_shard", lambda directory, chunk, *rest: (
        written.append(chunk), write_shard(directory, chunk, *rest)))
    score_dataset(model, dataset, cfg.score, mesh, rules, out, fingerprint, feature_dir=features)
    assert 0 not in written and len(written) == len(shards) - 1
    assert out.read_bytes() == scores_bytes
    got = FeatureCache(features)
    for i in range(len(dataset)):
        np.testing.assert_array_equal(np.asarray(got[i]), want[i])


def test_resume_after_kill_during_a_part_write(tiny_dir, tmp_path):
    """A SIGKILL between mkstemp and os.replace in atomic_write leaves `.part-*.parquet.*.tmp`
    behind. The resumed run should still finish and clean up, not crash after writing scores."""
    small = TokenizedDataset.from_samples([("a", np.arange(1, 20), np.ones(19), False),
                                           ("b", np.arange(5, 30), np.ones(25), False)], "small")
    out = tmp_path / "scores.parquet"
    parts_dir = tmp_path / "scores.parquet.parts"
    parts_dir.mkdir()
    (parts_dir / ".part-000000.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half-written")
    score_on(tiny_dir, small, MeshConfig(), out, single_device(), row_length=32, rows_per_batch=1)
    assert not parts_dir.exists()


def test_a_preempted_pass_stops_between_parts_and_resumes_to_the_same_scores(tiny_dir, dataset, single_scores,
                                                                           tmp_path, monkeypatch):
    """In a multi-process job SIGTERM goes to JAX's preemption notifier: the pass stops at the part
    boundary the processes agree on, keeping the parts before it, and a re-run finishes from them."""
    checks = []

    def preempt_at_the_third_check() -> bool:
        checks.append(len(checks))
        return len(checks) == 3

    out = tmp_path / "scores.parquet"
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "reached_preemption", preempt_at_the_third_check)
        with pytest.raises(Preempted, match=rf"preempted while scoring: .* kept in {out}\.parts"):
            score_on(tiny_dir, dataset, MeshConfig(), out, single_device(), row_length=64, rows_per_batch=2,
                     flush_every=1)
    assert checks == [0, 1, 2]  # one check before each part
    assert sorted(p.name for p in (tmp_path / "scores.parquet.parts").glob("part-*")) == [
        "part-000000.parquet", "part-000001.parquet"]  # parts are named by their first batch (flush_every=1)
    assert not out.exists()
    resumed = score_on(tiny_dir, dataset, MeshConfig(), out, single_device(), row_length=64, rows_per_batch=2,
                       flush_every=1)
    assert_scores_close(resumed, single_scores)


# ----------------------------------------------------------------------------------------------
# The run's reduced draft vocabulary (decode.draft_vocab), counted on the same tiny run's samples
# ----------------------------------------------------------------------------------------------

def test_draft_vocabulary_is_counted_on_the_run_samples_and_an_oversized_one_is_named(tiny_dir, tmp_path):
    cfg = load_config(None, [*cli_overrides(tiny_dir), f"run_dir={tmp_path}", "decode.draft_vocab=64"])
    ctx = RunContext(cfg)
    ids = ctx.draft_ids()
    samples = ctx.samples
    end = samples.offsets[len(samples) - cfg.data.heldout]  # assistant tokens before the held-out tail
    counts = np.bincount(samples.tokens[:end][samples.loss_mask[:end] > 0], minlength=ctx.target.arch.vocab_size)
    assert len(ids) == 64 and set(ctx.eos_ids()) <= set(ids.tolist())
    assert int(np.argmax(counts)) in ids.tolist()
    assert counts[ids].sum() > 0.5 * counts.sum()  # 64 of 49152 tokens cover most of the replies
    assert ctx.draft_ids(0) is None
    with pytest.raises(ValueError, match=r"decode\.draft_vocab=49153 exceeds the target's vocabulary"):
        ctx.draft_ids(49153)
