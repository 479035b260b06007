"""The EAGLE training step (``flatspec_jax.train.step``) and loop (``train_draft``) on a tiny random target.

Target: a random 2-layer Llama (vocab 97, hidden 32); data: a synthetic ``TokenizedDataset`` packed
by the real pipeline. What is checked:

* ``draft_targets`` on a hand-built packed row of two samples: exactly the positions t whose
  x_{t+1} and x_{t+2} lie in t's sample and whose x_{t+2} is an assistant token are trained, with
  next token x_{t+1} and next feature f_{t+1}; and packing leaks nothing across samples: the loss
  of a packed row equals the loss of its samples in separate rows;
* ``feature_noise``: |noise| <= amplitude * 512 / (sample length) / 2, filled to that bound
  within each segment (scaled per segment, not per row);
* the train step's loss equals an independent float64 NumPy computation within 1e-5, for each
  micro-batch and for the step (their mean weighted by trained positions): features from the
  target, noise from the step's key (key(seed) folded with the step, then the micro-batch
  index), the draft head re-implemented in NumPy, EAGLE's SmoothL1 + 0.1 soft CE with the
  masked mean sum / (n + 1e-5);
* gradient accumulation equals one big batch: A=2 micro-batches of R=2 rows with different trained
  counts give the gradient, hence the update, and the metrics of one batch of the same A*R rows
  within 1e-5 (checked with SGD(lr=1), whose update is minus the gradient), also with unroll 3
  (each draft weighted by its own trained count), and the accumulated gradient is the
  micro-batch gradients weighted by trained positions, with its reported grad_norm;
* ``train_draft`` on 8 fake CPU devices with meshes (data=2, fsdp=4) and (data=8), with gradient
  accumulation and noise, gives the 1-device per-step losses (and the other logged metrics) and
  final parameters within 1e-5 over 5 steps; the 8-device checkpoints restore onto one device; on
  (data=2, fsdp=4) the state the loop trains (parameters and Adam moments) is split over fsdp;
* every ``train.loss`` (eagle, kl, tvd, tvdpp, lk, lk_hybrid), the bfloat16 compute option and
  offline features (a feature cache written with ``feature_cache.write_shard``, read by the Grain
  pipeline) train 30 steps with finite losses on a tiny repeating dataset; the feature loss goes
  down for all, the EAGLE loss falls below 0.7x its start, and bf16 / offline track online float32;
  each token loss trained alone (feature weight 0) raises the acceptance;
* ``MetricsLog`` starts a log on a fresh run (regression: it crashed reading the absent file).

Compilation dominates the run time on CPU, so several checks share one jitted program: the
train steps inside them are ``_train_step`` itself, the function ``compile_steps`` jits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatspec_jax.checkpoint.manager import flatten_params, load_draft_head
from flatspec_jax.config import ConfigError, MeshConfig, load_config
from flatspec_jax.data.pipeline import plan_training_rows, training_iterator
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import create_model
from flatspec_jax.models.masks import segment_causal_mask
from flatspec_jax.sharding import ShardingRules, make_mesh, place_state
from flatspec_jax.train import loop as train_loop
from flatspec_jax.train.loop import evaluate_heldout, train_draft
from flatspec_jax.train.metrics import HELDOUT_PREFIX, MetricsLog, device_peak_gib, read_metrics
from flatspec_jax.train.optim import build_optimizer
from flatspec_jax.train.step import (
    NOISE_REFERENCE_LENGTH,
    StepSettings,
    TrainState,
    _eval_step,
    _train_step,
    compile_steps,
    draft_loss_on_rows,
    draft_targets,
    feature_noise,
    trained_counts,
)
from flatspec_jax.weights.arch import ArchSpec

ARCH = ArchSpec(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
ROW = 64
SEED = 0
LOSS_CHUNK = 8  # several chunks per test row, so the step skips some
TOL = 1e-5
LOSSES = ("eagle", "kl", "tvd", "tvdpp", "lk", "lk_hybrid")
VOCAB_HASH = "test-vocab"


def synthetic_dataset(num_samples: int = 48, seed: int = 0, min_len: int = 12, max_len: int = 60) -> TokenizedDataset:
    """Random tokens (never 0, the padding id) with chat-like masks: a user prefix, then assistant tokens."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(1, ARCH.vocab_size, length)
        mask = np.zeros(length, np.int8)
        mask[int(rng.integers(1, length // 2)):] = 1
        mask[rng.random(length) < 0.15] = 0
        samples.append((f"s{i}", ids, mask, False))
    return TokenizedDataset.from_samples(samples, "synthetic")


def batches_of(dataset: TokenizedDataset, rows_per_batch: int, count: int, seed: int = 0) -> list[dict]:
    rows = plan_training_rows(dataset, np.arange(len(dataset)), ROW)
    iterator = training_iterator(dataset, rows, row_length=ROW, global_rows_per_batch=rows_per_batch, seed=seed)
    return [next(iterator) for _ in range(count)]


def stack(*batches: dict) -> dict:
    """Micro-batches -> one [A, R, L] step input."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def train_config(*overrides: str):
    return load_config(None, ["train.warmup_steps=0", "train.schedule=constant", "train.learning_rate=0.001",
                              f"train.row_length={ROW}", f"train.loss_chunk={LOSS_CHUNK}", *overrides]).train


@pytest.fixture(scope="module")
def target():
    return create_model(ARCH, seed=1)


@pytest.fixture(scope="module")
def dataset() -> TokenizedDataset:
    return synthetic_dataset()


def new_head(dtype: str = "float32"):
    """A draft head; its norm weight is randomised so that the NumPy reference checks it is applied."""
    head = create_eagle_head(ARCH, 1, seed=SEED, dtype=dtype)
    norm = head.first_layer.post_attention_layernorm.weight
    norm[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(7), norm[...].shape)
    return head


def new_state(params, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def numpy_tree(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...] if hasattr(v, "get_value") else v, np.float64)
            for k, v in flatten_params(tree).items()}


# ----------------------------------------------------------------------------------------------
# Alignment and noise (no training)
# ----------------------------------------------------------------------------------------------

# One packed row: sample A (6 tokens, segment 1), sample B (4 tokens, segment 2), 2 padding slots.
HAND_TOKENS = np.array([[10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 0, 0]], np.int32)
HAND_SEGMENTS = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
HAND_POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0]], np.int32)
HAND_LOSS_MASK = np.array([[0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0]], np.int32)
# Position t is trained iff x_{t+1}, x_{t+2} are in t's sample and x_{t+2} is an assistant token:
#   A: t=0 (x2 assistant), t=1 no (x3 is not), t=2 (x4), t=3 (x5), t=4 and t=5 no (x_{t+2} is in B)
#   B: t=6 (x8), t=7 (x9), t=8 and t=9 no (x_{t+2} is padding); padding never.
HAND_TRAINED = np.array([[1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]], bool)


def test_draft_targets_hand_checked_on_two_packed_samples():
    features = np.arange(12, dtype=np.float32)[None, :, None] * np.array([1.0, -2.0], np.float32)  # f_t = (t, -2t)
    next_tokens, next_features, trained = jax.tree.map(np.asarray, draft_targets(
        jnp.asarray(features), jnp.asarray(HAND_TOKENS), jnp.asarray(HAND_SEGMENTS), jnp.asarray(HAND_LOSS_MASK)))
    np.testing.assert_array_equal(trained, HAND_TRAINED)
    for t in np.flatnonzero(HAND_TRAINED[0]):
        assert HAND_SEGMENTS[0, t + 1] == HAND_SEGMENTS[0, t] == HAND_SEGMENTS[0, t + 2]
        assert next_tokens[0, t] == HAND_TOKENS[0, t + 1]
        np.testing.assert_array_equal(next_features[0, t], [t + 1, -2 * (t + 1)])
    # The last position has nothing after it: zero-filled, never trained.
    assert next_tokens[0, -1] == 0 and not next_features[0, -1].any()


def test_draft_targets_never_train_across_a_sample_boundary():
    """Even when the next sample's tokens are all assistant tokens (and padding carries a stray loss
    mask), position t is trained only if x_{t+1} and x_{t+2} are both in t's own sample."""
    all_trained = np.ones_like(HAND_LOSS_MASK)
    _, _, trained = draft_targets(jnp.zeros((1, 12, 2)), jnp.asarray(HAND_TOKENS), jnp.asarray(HAND_SEGMENTS),
                                  jnp.asarray(all_trained))
    np.testing.assert_array_equal(np.asarray(trained), [[1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]])


# Draft 2 (train.unroll >= 2) at t is trained iff x_{t+1}..x_{t+3} are in t's sample and x_{t+3} is an
# assistant token: A: t=0 (x3) no, t=1 (x4), t=2 (x5), t >= 3 runs into B; B: t=6 (x9); t >= 7 no.
HAND_TRAINED_AHEAD_2 = np.array([[0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]], bool)


def test_second_draft_targets_hand_checked_on_two_packed_samples():
    features = np.arange(12, dtype=np.float32)[None, :, None] * np.array([1.0, -2.0], np.float32)
    tokens, next_features, trained = jax.tree.map(np.asarray, draft_targets(
        jnp.asarray(features), jnp.asarray(HAND_TOKENS), jnp.asarray(HAND_SEGMENTS), jnp.asarray(HAND_LOSS_MASK), 2))
    np.testing.assert_array_equal(trained, HAND_TRAINED_AHEAD_2)
    np.testing.assert_array_equal(tokens[0, :10], HAND_TOKENS[0, 2:])
    np.testing.assert_array_equal(next_features[0, 1], [3, -6])
    assert not tokens[0, -2:].any() and not next_features[0, -2:].any()


def test_unrolled_loss_adds_the_later_drafts_with_decaying_weights(target):
    """train.unroll=3: draft 1's terms are those of unroll=1 and the loss is sum_k 0.8^(k-1) loss_k."""
    head = new_head()
    batch = batches_of(synthetic_dataset(), 2, 1, seed=3)[0]
    plain = StepSettings("eagle", 1.0, 0.1, 0.0, SEED, LOSS_CHUNK)
    unrolled = dataclasses.replace(plain, unroll=3)
    loss = jax.jit(lambda b, s: draft_loss_on_rows(head, target, b, None, s), static_argnums=1)
    plain_loss, plain_metrics = loss(batch, plain)
    unrolled_loss, metrics = loss(batch, unrolled)
    assert int(trained_counts(batch, 1)[0]) > 20
    assert not any(name.startswith("depth") for name in plain_metrics)
    for name in ("loss_feature", "loss_token", "acceptance", "top1", "top3"):
        np.testing.assert_allclose(float(metrics[name]), float(plain_metrics[name]), rtol=1e-5, atol=1e-6)
    per_draft = [float(metrics[f"{p}loss_feature"]) + 0.1 * float(metrics[f"{p}loss_token"])
                 for p in ("", "depth2_", "depth3_")]
    np.testing.assert_allclose(float(plain_loss), per_draft[0], rtol=1e-5)
    np.testing.assert_allclose(float(unrolled_loss), per_draft[0] + 0.8 * per_draft[1] + 0.64 * per_draft[2],
                               rtol=1e-5)
    # The later drafts are other predictions (from the head's own features), not copies of the first.
    assert min(abs(per_draft[0] - per_draft[1]), abs(per_draft[1] - per_draft[2])) > 1e-5


def test_packed_row_loss_equals_separate_rows(target):
    """No information crosses samples: the head's loss on the packed row equals its loss on the two samples
    each alone in a row (same trained positions, so the same masked mean)."""
    head = new_head()
    settings = StepSettings("eagle", 1.0, 0.1, 0.0, SEED, LOSS_CHUNK)
    tokens = np.where(HAND_TOKENS > 0, HAND_TOKENS * 7 % ARCH.vocab_size, 0)
    packed = {"tokens": tokens, "positions": HAND_POSITIONS, "segment_ids": HAND_SEGMENTS,
              "loss_mask": HAND_LOSS_MASK}
    separate = {k: np.zeros((2, 12), np.int32) for k in packed}
    for row, (start, end) in enumerate([(0, 6), (6, 10)]):
        for k in packed:
            separate[k][row, :end - start] = packed[k][0, start:end]
        separate["segment_ids"][row, :end - start] = 1
    loss = jax.jit(lambda b: draft_loss_on_rows(head, target, b, None, settings))
    packed_loss, packed_metrics = loss(packed)
    separate_loss, separate_metrics = loss(separate)
    assert int(trained_counts(packed, 1)[0]) == int(trained_counts(separate, 1)[0]) == HAND_TRAINED.sum()
    np.testing.assert_allclose(float(packed_loss), float(separate_loss), rtol=1e-6, atol=1e-6)
    assert packed_metrics.keys() == separate_metrics.keys()
    for name in packed_metrics:
        np.testing.assert_allclose(float(packed_metrics[name]), float(separate_metrics[name]), rtol=1e-6, atol=1e-6)
    # And the loss does see the tokens: changing a trained next token changes it.
    changed = {**packed, "tokens": np.where(np.arange(12) == 3, 5, tokens).astype(np.int32)}
    assert abs(float(loss(changed)[0]) - float(packed_loss)) > 1e-4


def test_feature_noise_range_and_per_segment_scale():
    segment_lengths = [3, 40, 8, 13]  # row 0: four samples filling its 64 slots
    row0 = np.concatenate([np.full(n, s + 1, np.int32) for s, n in enumerate(segment_lengths)])
    row1 = np.concatenate([np.full(50, 1, np.int32), np.zeros(14, np.int32)])  # row 1: one sample of 50, padding
    segments = jnp.asarray(np.stack([row0, row1]))
    amplitude = 0.2
    noise = np.asarray(feature_noise(jax.random.key(3), (2, 64, 256), segments, amplitude), np.float64)
    segments = np.asarray(segments)
    for r in range(2):
        for s in np.unique(segments[r][segments[r] > 0]):
            where = segments[r] == s
            bound = amplitude * NOISE_REFERENCE_LENGTH / where.sum() / 2
            values = noise[r, where]
            assert np.abs(values).max() <= bound * (1 + 1e-6), (r, s)
            # Uniform over the whole interval: the extremes come close to the bound, the mean to 0.
            assert np.abs(values).max() > 0.95 * bound, (r, s)
            assert abs(values.mean()) < 0.05 * bound, (r, s)
    # Longer samples get proportionally less noise (EAGLE's 512 / length), whatever row they are in.
    scale = lambda r, s: np.abs(noise[r, segments[r] == s]).max()
    assert scale(0, 1) > 10 * scale(0, 2)  # length 3 vs 40
    np.testing.assert_allclose(scale(0, 2) / scale(1, 1), 50 / 40, rtol=0.1)
    # Deterministic in the key, different for another key.
    again = np.asarray(feature_noise(jax.random.key(3), (2, 64, 256), jnp.asarray(segments), amplitude))
    np.testing.assert_array_equal(again, noise.astype(np.float32))
    other = np.asarray(feature_noise(jax.random.key(4), (2, 64, 256), jnp.asarray(segments), amplitude))
    assert not np.allclose(other, again)


# ----------------------------------------------------------------------------------------------
# An independent float64 NumPy computation of the EAGLE loss
# ----------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def numpy_draft_head(p: dict[str, np.ndarray], features, embeddings, positions, segments) -> np.ndarray:
    """EAGLE head (reference cnets.py layout): fc(embed ++ feature) + bias, one Llama decoder layer
    without input norm, no final norm. [R, L, D] float64."""
    a = ARCH
    h = np.concatenate([embeddings, features], axis=-1) @ p["fc"] + p["fc_bias"]
    inv = 1.0 / (a.rope_theta ** (np.arange(0, a.head_dim, 2) / a.head_dim))
    angles = positions[..., None] * inv
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(x):  # x [R, L, heads, H]
        half = a.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, :, None] + rotated * sin[:, :, None]

    q = rope(np.einsum("rld,dnh->rlnh", h, p["first_layer/self_attn/q_proj"]))
    k = rope(np.einsum("rld,dnh->rlnh", h, p["first_layer/self_attn/k_proj"]))
    v = np.einsum("rld,dnh->rlnh", h, p["first_layer/self_attn/v_proj"])
    group = a.num_heads // a.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head n reads KV head n // group
    scores = np.einsum("rtnh,rsnh->rnts", q, k) / math.sqrt(a.head_dim)
    length = segments.shape[1]
    allowed = (np.tril(np.ones((length, length), bool))[None] & (segments[:, :, None] == segments[:, None, :])
               & (segments[:, None, :] > 0))
    scores = np.where(allowed[:, None], scores, -1e300)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores) * allowed[:, None]
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    attn = np.einsum("rnts,rsnh->rtnh", probs, v)
    h = h + np.einsum("rtnh,nhd->rtd", attn, p["first_layer/self_attn/o_proj"])
    x = _rms(h, p["first_layer/post_attention_layernorm/weight"], a.rms_norm_eps)
    gate = x @ p["first_layer/mlp/gate_proj"]
    mlp = (gate / (1 + np.exp(-gate)) * (x @ p["first_layer/mlp/up_proj"])) @ p["first_layer/mlp/down_proj"]
    return h + mlp


def numpy_eagle_loss(head_params, target_params, features, noise, batch) -> dict[str, float]:
    """EAGLE's loss (eagle/train/main.py) on our alignment, in float64, from scratch."""
    tokens, segments, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    rows, length = tokens.shape
    trained = np.zeros((rows, length), bool)
    next_tokens = np.zeros((rows, length), np.int64)
    next_features = np.zeros_like(features)
    for r in range(rows):
        for t in range(length - 2):
            same = segments[r, t] > 0 and segments[r, t] == segments[r, t + 1] == segments[r, t + 2]
            trained[r, t] = same and mask[r, t + 2] > 0
        next_tokens[r, :-1] = tokens[r, 1:]
        next_features[r, :-1] = features[r, 1:]
    embeddings = target_params["embed_tokens"][next_tokens]
    predicted = numpy_draft_head(head_params, features + noise, embeddings, batch["positions"].astype(np.float64),
                                 segments)
    lm_head = target_params["lm_head"]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_q, log_p = log_softmax(predicted @ lm_head.T), log_softmax(next_features @ lm_head.T)
    diff = np.abs(predicted - next_features)
    smooth_l1 = np.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean(-1)
    soft_ce = -(np.exp(log_p) * log_q).sum(-1)
    n = trained.sum()
    vloss = (smooth_l1 * trained).sum() / (n + 1e-5)
    ploss = (soft_ce * trained).sum() / (n + 1e-5)
    acceptance = (np.minimum(np.exp(log_p), np.exp(log_q)).sum(-1) * trained).sum() / (n + 1e-5)
    return {"loss": vloss + 0.1 * ploss, "loss_feature": vloss, "loss_token": ploss, "acceptance": acceptance,
            "positions": int(n)}


# ----------------------------------------------------------------------------------------------
# One compiled program for the single-step checks: loss, gradient accumulation
# ----------------------------------------------------------------------------------------------

NOISY = StepSettings("eagle", 1.0, 0.1, 0.2, SEED, LOSS_CHUNK)
QUIET = StepSettings("eagle", 1.0, 0.1, 0.0, SEED, LOSS_CHUNK)
QUIET3 = dataclasses.replace(QUIET, unroll=3)


@pytest.fixture(scope="module")
def step_lab(target, dataset):
    """Runs, in one jitted program, train steps with SGD(lr=1) (so params - new params = the step's gradient):
      accum: a step over 2 micro-batches of 2 rows (noise on);
      accum_unlogged: the same step without the agreement metrics;
      micro: loss, trained count and gradient of each of those micro-batches alone, with the step's noise keys;
      quiet_accum / quiet_single: the accum micro-batches (different trained counts) vs 1 batch of the same
        4 rows, noise off (its keys depend on the micro-batch index); quiet3_*: the same with unroll 3;
      eval_accum / eval_single: the eval step (no noise, no update) on those two inputs.
    """
    head = new_head()
    head_graphdef, head_params = nnx.split(head)
    target_graphdef, target_params = nnx.split(target)
    tx = optax.sgd(1.0)
    b0, b1 = batches_of(dataset, 2, 2, seed=1)
    inputs = {"accum": stack(b0, b1), "single": stack({k: np.concatenate([b0[k], b1[k]]) for k in b0})}

    def lab(state, target_params, inputs):
        step = functools.partial(_train_step, head_graphdef, target_graphdef, tx)
        out = {"accum": step(NOISY, state, target_params, inputs["accum"]),
               "accum_unlogged": step(NOISY, state, target_params, inputs["accum"], False),
               "quiet_accum": step(QUIET, state, target_params, inputs["accum"]),
               "quiet_single": step(QUIET, state, target_params, inputs["single"]),
               "quiet3_accum": step(QUIET3, state, target_params, inputs["accum"]),
               "quiet3_single": step(QUIET3, state, target_params, inputs["single"])}
        evaluate = functools.partial(_eval_step, head_graphdef, target_graphdef, QUIET, state.params, target_params)
        out["eval_accum"], out["eval_single"] = evaluate(inputs["accum"]), evaluate(inputs["single"])
        model = nnx.merge(target_graphdef, target_params)
        base = jax.random.fold_in(jax.random.key(SEED), state.step)
        micro = []
        for a in range(2):
            batch = {k: v[a] for k, v in inputs["accum"].items()}

            def loss_fn(params, batch=batch, a=a):
                return draft_loss_on_rows(nnx.merge(head_graphdef, params), model, batch,
                                          jax.random.fold_in(base, a), NOISY)

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            micro.append({"loss": loss, "metrics": metrics, "count": trained_counts(batch, 1)[0], "grads": grads})
        out["micro"] = micro
        return out

    out = jax.jit(lab)(new_state(head_params, tx), target_params, inputs)
    return {"out": out, "inputs": inputs, "head_params": head_params, "target_params": target_params}


def test_step_loss_equals_independent_numpy(step_lab, target):
    """The train step's loss over 2 micro-batches, and each micro-batch's loss, against NumPy (with the step's
    noise: key(seed) folded with the step, 0, then the micro-batch index; EAGLE's 512 / length scale)."""
    head_np, target_np = numpy_tree(step_lab["head_params"]), numpy_tree(step_lab["target_params"])
    forward = jax.jit(lambda t, p, s: target(t, p, segment_causal_mask(s), return_logits=False).hidden)
    want = []
    for a in range(2):
        batch = {k: v[a] for k, v in step_lab["inputs"]["accum"].items()}
        features = np.asarray(forward(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), 0), a)
        uniform = np.asarray(jax.random.uniform(key, features.shape), np.float64)
        segments = batch["segment_ids"]
        lengths = np.array([[np.sum(row == s) for s in row] for row in segments], np.float64)
        noise = (uniform - 0.5) * (0.2 * 512 / lengths)[..., None]
        want.append(numpy_eagle_loss(head_np, target_np, features, noise, batch))
        micro = step_lab["out"]["micro"][a]
        assert int(micro["count"]) == want[a]["positions"] > 20
        assert abs(float(micro["loss"]) - want[a]["loss"]) <= TOL, (a, float(micro["loss"]), want[a]["loss"])
        if a == 0:  # the noise matters at this tolerance (else the check would not cover it)
            quiet = numpy_eagle_loss(head_np, target_np, features, 0 * noise, batch)
            assert abs(quiet["loss"] - want[a]["loss"]) > 100 * TOL
    metrics = step_lab["out"]["accum"][1]
    weights = [w["positions"] + 1e-5 for w in want]
    for name in ("loss", "loss_feature", "loss_token", "acceptance"):
        expected = (weights[0] * want[0][name] + weights[1] * want[1][name]) / (sum(weights) - 1e-5)
        assert abs(float(metrics[name]) - expected) <= TOL, (name, float(metrics[name]), expected)


def _grads_of_sgd_step(step_lab, name) -> dict[str, np.ndarray]:
    new_params = numpy_tree(step_lab["out"][name][0].params)
    old = numpy_tree(step_lab["head_params"])
    return {k: old[k] - new_params[k] for k in old}


def test_accumulated_gradient_weighs_micro_batches_by_trained_positions(step_lab):
    """Each micro-batch's loss is its own masked mean S_a / (n_a + eps); the step's gradient is
    sum_a (n_a + eps) grad_a / (sum_a n_a + eps), so a micro-batch with few trained tokens counts for few."""
    micro = step_lab["out"]["micro"]
    counts = [int(m["count"]) for m in micro]
    assert counts[0] != counts[1], "the test wants micro-batches with different trained counts"
    accumulated = _grads_of_sgd_step(step_lab, "accum")
    first, second = numpy_tree(micro[0]["grads"]), numpy_tree(micro[1]["grads"])
    w0, w1 = counts[0] + 1e-5, counts[1] + 1e-5
    for k in accumulated:
        np.testing.assert_allclose(accumulated[k], (w0 * first[k] + w1 * second[k]) / (sum(counts) + 1e-5),
                                   rtol=0, atol=TOL, err_msg=k)
    plain_mean_gap = max(np.abs(accumulated[k] - (first[k] + second[k]) / 2).max() for k in accumulated)
    assert plain_mean_gap > 10 * TOL, (counts, plain_mean_gap)  # the counts differ enough to tell
    assert max(np.abs(v).max() for v in accumulated.values()) > 1e-3  # a real gradient
    # The clipped global norm the step reports is that of the accumulated gradient.
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in accumulated.values()))
    np.testing.assert_allclose(float(step_lab["out"]["accum"][1]["grad_norm"]), norm, rtol=1e-5)


def test_unlogged_step_updates_the_same_and_leaves_agreement_metrics_nan(step_lab):
    """The loop skips acceptance/top-1/top-3 on steps it does not log; nothing else may change."""
    logged, unlogged = step_lab["out"]["accum"], step_lab["out"]["accum_unlogged"]
    new_logged, new_unlogged = numpy_tree(logged[0].params), numpy_tree(unlogged[0].params)
    for k in new_logged:
        np.testing.assert_allclose(new_unlogged[k], new_logged[k], rtol=0, atol=1e-7, err_msg=k)
    for name in ("loss", "loss_feature", "loss_token", "grad_norm"):
        np.testing.assert_allclose(float(unlogged[1][name]), float(logged[1][name]), rtol=1e-6, err_msg=name)
    for name in ("acceptance", "top1", "top3"):
        assert np.isfinite(float(logged[1][name])) and np.isnan(float(unlogged[1][name])), name


@pytest.mark.parametrize("name,unroll", [("quiet", 1), ("quiet3", 3)])
def test_micro_batches_equal_one_big_batch(step_lab, name, unroll):
    """A=2 micro-batches of R=2 rows with different trained counts give the gradient, hence the update, and
    the metrics of one batch of the same 4 rows (noise off: its keys depend on the micro-batch index), for
    every draft of the training-time test too (each weighted by its own trained count)."""
    out = step_lab["out"]
    counts = [np.asarray(trained_counts({k: v[a] for k, v in step_lab["inputs"]["accum"].items()}, unroll))
              for a in range(2)]
    assert counts[0][0] != counts[1][0]
    if unroll > 1:  # weighing later drafts by draft 1's count would not be exact here
        assert not np.allclose(counts[0] / counts[0][0], counts[1] / counts[1][0], rtol=1e-3), counts
    accum, single = _grads_of_sgd_step(step_lab, f"{name}_accum"), _grads_of_sgd_step(step_lab, f"{name}_single")
    assert max(np.abs(v).max() for v in accum.values()) > 1e-3
    for k in accum:
        np.testing.assert_allclose(accum[k], single[k], rtol=0, atol=TOL, err_msg=k)
    metrics = [m for m in out[f"{name}_single"][1] if m != "tokens"]
    assert len(metrics) == 1 + 5 * unroll + 1  # loss, each draft's 5 terms, grad_norm
    for metric in metrics:
        np.testing.assert_allclose(float(out[f"{name}_accum"][1][metric]), float(out[f"{name}_single"][1][metric]),
                                   rtol=TOL, err_msg=metric)
    # ``tokens``: the non-padding tokens of all rows (the loop's tokens/s), not the trained positions.
    non_padding = int((np.asarray(step_lab["inputs"]["accum"]["segment_ids"]) > 0).sum())
    assert non_padding > sum(int(m["count"]) for m in out["micro"])
    assert float(out["quiet_accum"][1]["tokens"]) == float(out["quiet_single"][1]["tokens"]) == non_padding


def test_eval_step_weighs_micro_batches_as_the_train_step(step_lab):
    """The eval step (held-out batches, and the untrained head's step-0 record on the first training batch)
    gives a train step's metrics without noise, over 2 micro-batches as over 1 batch of the same rows."""
    out = step_lab["out"]
    for name in ("eval_accum", "eval_single"):
        for metric in ("loss", "loss_feature", "loss_token", "acceptance", "top1", "top3"):
            np.testing.assert_allclose(float(out[name][metric]), float(out["quiet_accum"][1][metric]), rtol=TOL,
                                       err_msg=f"{name}: {metric}")


def test_heldout_batches_sum_to_one_batch_for_every_draft(step_lab, target):
    """Held-out metrics over two batches, one at a time, equal the eval step on one batch of their rows
    for each draft of an unroll-3 head, although the two batches' count ratios between drafts differ
    (weighing every draft by draft 1's positions would not be exact)."""
    head_graphdef, _ = nnx.split(new_head())
    target_graphdef, _ = nnx.split(target)
    evaluate = jax.jit(functools.partial(_eval_step, head_graphdef, target_graphdef, QUIET3))
    accum = step_lab["inputs"]["accum"]
    heldout = [{name: np.asarray(value[a]) for name, value in accum.items()} for a in range(2)]
    counts = [np.asarray(trained_counts({k: v[None] for k, v in batch.items()}, 3)) for batch in heldout]
    assert not np.allclose(counts[0] / counts[0][0], counts[1] / counts[1][0], rtol=1e-3), counts
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    got = evaluate_heldout(evaluate, step_lab["head_params"], step_lab["target_params"], heldout, sharding, 3)
    want = evaluate(step_lab["head_params"], step_lab["target_params"], step_lab["inputs"]["single"], None)
    assert sorted(got) == sorted(f"{HELDOUT_PREFIX}{name}" for name in want)
    assert {"eval_depth2_top1", "eval_depth3_loss_token"} <= set(got)
    for name, value in want.items():
        np.testing.assert_allclose(got[f"{HELDOUT_PREFIX}{name}"], float(value), rtol=TOL, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Meshes: 1 device vs (data=2, fsdp=4) vs (data=8), through train_draft
# ----------------------------------------------------------------------------------------------

MESH_STEPS = 5
MESHES = {"single": (MeshConfig(data=1), 1), "data2_fsdp4": (MeshConfig(data=2, fsdp=4), 8),
          "data8": (MeshConfig(data=8), 8)}


def array_layouts(state: TrainState) -> dict[str, tuple[PartitionSpec, tuple[int, ...], set[tuple[int, ...]]]]:
    """Every array of a train state: its sharding's spec, global shape and set of per-device shard shapes."""
    layouts = {}
    for path, array in jax.tree_util.tree_leaves_with_path(state):
        assert isinstance(array.sharding, NamedSharding), (jax.tree_util.keystr(path), array.sharding)
        layouts[jax.tree_util.keystr(path)] = (array.sharding.spec, array.shape,
                                               {shard.data.shape for shard in array.addressable_shards})
    return layouts


@pytest.fixture(scope="module")
def mesh_runs(target, dataset, tmp_path_factory):
    """train_draft on each mesh with identical data and seed: 5 steps of 2 micro-batches of 8 rows, metrics
    logged every step, a checkpoint at the end. The jitted train step is wrapped to record the layouts of
    the state the loop passes to its first step and of the state its last step returns."""
    def recording_compile_steps(*args, **kwargs):
        train_step, evaluate = compile_steps(*args, **kwargs)

        def recorded(state, *rest):
            layouts.setdefault("first_input", array_layouts(state))  # before the step donates it
            state, metrics = train_step(state, *rest)
            layouts["last_output"] = array_layouts(state)
            return state, metrics

        return recorded, evaluate

    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 fake CPU devices"
    cfg = load_config(None, [f"train.steps={MESH_STEPS}", f"train.row_length={ROW}", f"train.batch_tokens={ROW * 16}",
                             "train.grad_accum=2", "train.log_every=1", "train.save_every=100", "train.warmup_steps=1",
                             "train.learning_rate=0.001", "data.heldout=0", f"seed={SEED}", "data.shuffle_seed=3",
                             f"train.loss_chunk={LOSS_CHUNK}"])
    host_params = nnx.split(target)
    results = {}
    for name, (mesh_cfg, devices) in MESHES.items():
        mesh, rules = make_mesh(mesh_cfg, jax.devices()[:devices]), ShardingRules()
        graphdef, params = host_params
        placed = nnx.merge(graphdef, place_state(params, mesh, rules))
        run_dir = tmp_path_factory.mktemp(f"mesh_{name}")
        layouts = {}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_loop, "compile_steps", recording_compile_steps)
            summary = train_draft(cfg, run_dir, mesh, rules, placed, dataset, None, VOCAB_HASH)
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        single = make_mesh(MeshConfig(data=1), jax.devices()[:1])
        head = load_draft_head(run_dir / "checkpoints", ARCH, VOCAB_HASH, single, rules)
        results[name] = {"records": records, "params": numpy_tree(nnx.state(head)), "summary": summary,
                         "layouts": layouts}
    return results


def test_meshes_give_the_same_losses_per_step(mesh_runs):
    want = mesh_runs["single"]["records"]
    assert [r["step"] for r in want] == list(range(MESH_STEPS + 1))  # step 0: the untrained head
    assert all(np.isfinite(r["loss"]) for r in want)
    assert len({round(r["loss"], 6) for r in want[1:]}) == MESH_STEPS  # the batches differ from step to step
    for name in ("data2_fsdp4", "data8"):
        got = mesh_runs[name]["records"]
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for key in {"loss", "loss_feature", "loss_token", "acceptance", "top1", "grad_norm", "lr"} & w.keys():
                assert abs(g[key] - w[key]) <= TOL, (name, g["step"], key, g[key], w[key])


def test_meshes_give_the_same_final_params(mesh_runs):
    want = mesh_runs["single"]["params"]
    for name in ("data2_fsdp4", "data8"):
        got = mesh_runs[name]["params"]
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOL, err_msg=f"{name}: {k}")
    assert mesh_runs["single"]["summary"].steps == MESH_STEPS


@pytest.mark.parametrize("when", ["first_input", "last_output"])
def test_fsdp_mesh_shards_the_draft_params_and_optimizer_state(mesh_runs, when):
    """On (data=2, fsdp=4) the loop really trains a sharded state: every draft matrix (and bias), and its
    Adam moments alike, is split 4 ways along the dimension whose spec names 'fsdp', so each device holds
    about a quarter of the state. On (data=8) the same state is replicated (the control)."""
    fsdp = mesh_runs["data2_fsdp4"]["layouts"][when]
    params = {path: layout for path, layout in fsdp.items() if path.startswith(".params")}
    assert len(params) >= 8
    split = set()
    for path, (spec, shape, shards) in fsdp.items():
        assert len(shards) == 1, (path, shards)  # even shards
        (shard,) = shards
        want = tuple(n // 4 if axes == "fsdp" else n for n, axes in zip(shape, tuple(spec) + (None,) * len(shape)))
        assert shard == want, (path, spec, shape, shard)
        assert all(axes in (None, "fsdp") for axes in spec), (path, spec)  # no data-parallel split of a weight
        if "fsdp" in spec:
            split.add(path)
    # Every parameter of two or more dimensions (the large ones: fc [2D, D], q/k/v/o, gate/up/down) is split.
    matrices = {path for path, (_, shape, _) in params.items() if len(shape) >= 2}
    assert len(matrices) == 8 and matrices <= split, sorted(matrices - split)
    spec, shape, shards = params[".params['fc'].value"]  # the largest: [2D, D], D on fsdp
    assert "fsdp" in spec and shape == (64, 32) and shards == {(64, 8)}
    # Each Adam moment is laid out as its parameter.
    for moment in ("mu", "nu"):
        moments = {path.split(f".{moment}", 1)[1]: layout for path, layout in fsdp.items() if f".{moment}[" in path}
        assert moments.keys() == {path.removeprefix(".params") for path in params}, moment
        for path, layout in moments.items():
            assert layout == params[".params" + path], (moment, path)
    # Memory: a device holds the norms whole and a quarter of the rest.
    total = sum(math.prod(shape) for _, shape, _ in fsdp.values())
    per_device = sum(math.prod(next(iter(shards))) for _, _, shards in fsdp.values())
    assert per_device < 0.3 * total, (per_device, total)
    replicated = mesh_runs["data8"]["layouts"][when]
    assert replicated.keys() == fsdp.keys()
    for path, (spec, shape, shards) in replicated.items():
        assert all(axes is None for axes in spec) and shards == {shape}, (path, spec, shards)


# ----------------------------------------------------------------------------------------------
# Every loss option, bfloat16 compute, offline features, and learning on a tiny repeating dataset
# ----------------------------------------------------------------------------------------------

# (token loss, compute dtype, features, train.unroll): every loss online, bf16 online, and EAGLE on cached
# features, drafting one token per position and three (training-time test).
VARIANTS = ([(loss, "float32", "online", 1) for loss in LOSSES] + [("eagle", "bfloat16", "online", 1),
                                                                   ("eagle", "float32", "offline", 1),
                                                                   ("eagle", "float32", "offline", 3)])
# Each token loss again with the feature term off: with it on (weight 1 against the token term's 0.1), the
# feature regression alone pulls the draft's distribution towards the target's, so the acceptance rises the
# same (to 4 digits) whatever the token loss does, even with its sign flipped.
TOKEN_ONLY = ("train.feature_weight=0", "train.token_weight=1")
LEARN_STEPS = 30


def write_feature_cache(target, dataset: TokenizedDataset, rows, directory):
    """The target's features of every sample, computed on the packed rows, as ``flatspec cache`` stores them."""
    from flatspec_jax.data import feature_cache
    from flatspec_jax.data.packing import pack_rows, segment_slots

    packed = pack_rows(rows, dataset.__getitem__, ROW, segment_slots(ROW))
    hidden = np.asarray(jax.jit(lambda t, p, s: target(t, p, segment_causal_mask(s), return_logits=False).hidden)(
        packed.tokens, packed.positions, packed.segment_ids))
    features = {}
    for r, row in enumerate(rows):
        for slot, index in enumerate(row):
            features[index] = hidden[r, packed.segment_ids[r] == slot + 1]
    feature_cache.write_shard(directory, 0, features, "test")
    feature_cache.write_index(directory, [0], ARCH.hidden_size, "test")
    return feature_cache.FeatureCache(directory)


@pytest.fixture(scope="module")
def variant_runs(target, tmp_path_factory):
    """30 steps of each variant, and of each token loss alone (``TOKEN_ONLY``), in one program, on a tiny dataset
    of 5 samples (3 packed rows, 2 rows per step: the data repeats, reshuffled, every 1.5 steps). Every run sees
    the same batches."""
    tiny = synthetic_dataset(num_samples=5, seed=2, min_len=30, max_len=50)
    rows = plan_training_rows(tiny, np.arange(len(tiny)), ROW)
    cache = write_feature_cache(target, tiny, rows, tmp_path_factory.mktemp("features"))
    iterator = training_iterator(tiny, rows, row_length=ROW, global_rows_per_batch=2, seed=0, features=cache)
    target_graphdef, target_params = nnx.split(target)
    runs = [(variant, ()) for variant in VARIANTS] + [((loss, "float32", "online", 1), TOKEN_ONLY) for loss in LOSSES]
    programs, states = [], []
    for (loss, dtype, features, unroll), weights in runs:
        tcfg = train_config(f"train.loss={loss}", f"train.compute_dtype={dtype}", f"train.features={features}",
                            f"train.unroll={unroll}", "train.learning_rate=0.003", *weights)
        head = create_eagle_head(ARCH, 1, seed=SEED, dtype=tcfg.compute_dtype)
        graphdef, params = nnx.split(head)
        tx = build_optimizer(tcfg)
        programs.append((functools.partial(_train_step, graphdef, target_graphdef, tx,
                                           StepSettings.from_config(tcfg, SEED)), features == "offline"))
        states.append(new_state(params, tx))

    @jax.jit
    def all_variants(states, target_params, online, offline):
        return [program(state, target_params, offline if cached else online)
                for (program, cached), state in zip(programs, states)]

    history = {run: [] for run in runs}
    for _ in range(LEARN_STEPS):
        batch = next(iterator)
        assert batch["features"].dtype == ml_dtypes.bfloat16
        online = stack({k: v for k, v in batch.items() if k != "features"})
        results = all_variants(states, target_params, online, stack(batch))
        states = [state for state, _ in results]
        for run, (_, metrics) in zip(runs, results):
            history[run].append({k: float(v) for k, v in metrics.items()})
    return {"history": {variant: history[variant, weights] for variant, weights in runs if not weights},
            "token_only": {variant[0]: history[variant, weights] for variant, weights in runs if weights},
            "states": dict(zip(VARIANTS, states))}


def variant_id(variant: tuple) -> str:
    return "-".join(map(str, variant))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_loss_option_trains_with_finite_losses(variant_runs, variant):
    history = variant_runs["history"][variant]
    assert len(history) == LEARN_STEPS
    for step, metrics in enumerate(history):
        for name, value in metrics.items():
            assert np.isfinite(value), (variant, step, name, value)
    state = variant_runs["states"][variant]
    assert int(state.step) == LEARN_STEPS
    params = flatten_params(state.params)
    assert all(v[...].dtype == jnp.float32 for v in params.values()), "master parameters must stay float32"
    assert all(np.isfinite(np.asarray(v[...])).all() for v in params.values())
    # Every token loss trains the feature regression too (feature_weight 1): it must go down.
    first, last = history[0]["loss_feature"], np.mean([m["loss_feature"] for m in history[-5:]])
    assert last < first, (variant, first, last)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "eagle"], ids=variant_id)
def test_eagle_loss_decreases_on_a_repeating_dataset(variant_runs, variant):
    history = variant_runs["history"][variant]
    first = np.mean([m["loss"] for m in history[:3]])
    last = np.mean([m["loss"] for m in history[-3:]])
    assert last < 0.7 * first, f"{variant}: loss {first:.4f} -> {last:.4f} in {LEARN_STEPS} steps"
    for depth in range(1, variant[3] + 1):
        key = "acceptance" if depth == 1 else f"depth{depth}_acceptance"
        assert np.mean([m[key] for m in history[-3:]]) > np.mean([m[key] for m in history[:3]]), key


@pytest.mark.parametrize("loss", LOSSES)
def test_every_token_loss_alone_raises_the_acceptance(variant_runs, loss):
    """Trained on its token term only, each loss raises the acceptance (over the last 3 steps against the first 3),
    and where that term is a divergence (all but TVD++, a surrogate whose value means nothing) lowers it."""
    history = variant_runs["token_only"][loss]
    assert all(m["loss"] == pytest.approx(m["loss_token"], rel=1e-6) for m in history)  # really token-only

    def first_and_last(key):
        return np.mean([m[key] for m in history[:3]]), np.mean([m[key] for m in history[-3:]])

    first, last = first_and_last("acceptance")
    assert last > first + 0.02, (loss, "acceptance", first, last)
    if loss != "tvdpp":
        first, last = first_and_last("loss_token")
        assert last < first, (loss, "loss_token", first, last)


@pytest.mark.parametrize("other", [("eagle", "bfloat16", "online", 1), ("eagle", "float32", "offline", 1)],
                         ids=variant_id)
def test_bfloat16_compute_and_offline_features_track_online_float32(variant_runs, other):
    """bf16 compute, or bf16-stored cached features, change the numbers a little, not the course of training."""
    reference = variant_runs["history"][("eagle", "float32", "online", 1)]
    got = variant_runs["history"][other]
    np.testing.assert_allclose(got[0]["loss"], reference[0]["loss"], rtol=0.02)
    np.testing.assert_allclose(got[-1]["loss"], reference[-1]["loss"], rtol=0.1)


# ----------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------


class _DeviceWithStats:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_device_peak_memory_is_the_highest_peak_and_absent_without_statistics():
    devices = [_DeviceWithStats({"peak_bytes_in_use": 2**30, "bytes_in_use": 2**29}),
               _DeviceWithStats({"peak_bytes_in_use": 3 * 2**30}), _DeviceWithStats(None)]
    assert device_peak_gib(devices) == 3.0
    assert device_peak_gib([_DeviceWithStats(None), _DeviceWithStats({})]) is None
    assert device_peak_gib() is None  # the CPU backend keeps no allocator statistics


def test_metrics_log_on_a_fresh_run(tmp_path):
    """A fresh run has no metrics.jsonl yet: MetricsLog must start one (it once crashed reading the absent file)."""
    log = MetricsLog(tmp_path, resume_step=0)
    log.write({"step": 1, "loss": 0.5})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]


def test_metrics_log_restarted_before_its_first_checkpoint_starts_over(tmp_path):
    """A run killed before its first checkpoint restarts at step 0 and logs its baseline again: the
    old records (the step-0 baseline included) must go, not appear twice."""
    log = MetricsLog(tmp_path, resume_step=0)
    log.write({"step": 0, "eval_loss": 2.0})
    log.write({"step": 1, "loss": 0.5})
    log.close()
    log = MetricsLog(tmp_path, resume_step=0)
    log.write({"step": 0, "eval_loss": 2.0})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "eval_loss": 2.0}]


def test_metrics_log_resumed_keeps_records_up_to_the_checkpoint_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(tmp_path, resume_step=0)
    for step in (0, 1, 2):
        log.write({"step": step, "loss": float(step)})
    log.close()
    written = path.stat().st_mtime_ns
    MetricsLog(tmp_path, resume_step=2).close()
    assert path.stat().st_mtime_ns == written, "nothing to cut: the log is not rewritten"
    MetricsLog(tmp_path, resume_step=1).close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_metrics_log_resumed_after_a_cut_last_line_drops_it(tmp_path):
    """A run killed while writing step 3 leaves a cut line; the resumed run's step 3 must not be
    appended onto it (and so lost)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"loss": 0.0, "step": 1}\n{"loss": 1.0, "step": 2}\n{"loss": 2.0, "st')
    log = MetricsLog(tmp_path, resume_step=2)
    log.write({"step": 3, "loss": 2.5})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_rows_that_do_not_split_over_the_mesh_name_the_settings():
    from flatspec_jax.train.loop import _check_rows_fit_mesh

    mesh = make_mesh(MeshConfig(data=8), jax.devices()[:8])
    fits = load_config(None, ["train.batch_tokens=512", "train.row_length=64"]).train  # 8 rows
    _check_rows_fit_mesh(fits, mesh)
    six_rows = load_config(None, ["train.batch_tokens=384", "train.row_length=64"]).train
    with pytest.raises(ConfigError, match=r"train\.batch_tokens / \(train\.row_length x train\.grad_accum\) = 6 rows "
                                          r"per micro-batch is not a multiple of the 8 data-parallel shards"):
        _check_rows_fit_mesh(six_rows, mesh)


@pytest.mark.parametrize("mesh_cfg, process_of, rows_of", [
    (MeshConfig(data=8), lambda d: d.id // 4, [range(0, 8), range(8, 16)]),
    (MeshConfig(data=2, tensor=4), lambda d: d.id // 4, [range(0, 8), range(8, 16)]),  # tensor within a host
    (MeshConfig(data=1, tensor=8), lambda d: d.id // 4, [range(16), range(16)]),  # both hosts hold every row
    (MeshConfig(data=8), lambda d: d.id % 2, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]),
])
def test_each_process_feeds_the_rows_its_devices_hold(mesh_cfg, process_of, rows_of):
    """Simulated hosts (``process_of``) over the 8 CPU devices: a host whose devices hold rows spread over
    the batch (a TPU slice's torus layout) feeds exactly those, in order; replicas feed the same rows."""
    from flatspec_jax.sharding import batch_sharding, check_process_rows, process_rows

    mesh = make_mesh(mesh_cfg, jax.devices()[:8])
    check_process_rows(mesh, process_of, process_count=2)
    sharding = batch_sharding(mesh, ShardingRules(), 2)
    for process, want in enumerate(rows_of):
        np.testing.assert_array_equal(process_rows(sharding, (16, 5), process_of, process), list(want))


def test_a_mesh_must_hold_devices_of_every_process():
    """Fixed mesh sizes below the device count take the first devices: on 2 hosts of 4, process 0's."""
    from flatspec_jax.sharding import check_process_rows

    mesh = make_mesh(MeshConfig(data=4), jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"mesh \{'data': 4, 'fsdp': 1, 'tensor': 1\} holds devices of process\(es\) "
                                          r"\[0\] only, but all 2 processes feed it rows"):
        check_process_rows(mesh, lambda d: d.id // 4, process_count=2)


def test_a_failed_checkpoint_save_ends_training_with_the_checkpoints_closed(target, dataset, tmp_path, monkeypatch):
    """The save's error reaches the caller and the checkpoint manager is closed (an open one kept its save
    thread, and the process never exited)."""
    closed = []
    original_close = train_loop.DraftCheckpointer.close

    def failing_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self.directory))

    def recording_close(self):
        closed.append(self.directory)
        original_close(self)

    monkeypatch.setattr(train_loop.DraftCheckpointer, "save", failing_save)
    monkeypatch.setattr(train_loop.DraftCheckpointer, "close", recording_close)
    cfg = load_config(None, ["train.steps=2", f"train.row_length={ROW}", f"train.batch_tokens={ROW * 8}",
                             "train.save_every=1", "data.heldout=0", f"train.loss_chunk={LOSS_CHUNK}"])
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with pytest.raises(OSError, match="No space left on device"):
        train_draft(cfg, tmp_path, mesh, ShardingRules(), target, dataset, None, VOCAB_HASH)
    assert closed == [tmp_path / "checkpoints"]


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, monkeypatch):
    from flatspec_jax.checkpoint import manager

    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(manager.os, "access", lambda path, mode: Path(path) != tmp_path / "checkpoints")
    with pytest.raises(PermissionError, match=rf"{tmp_path / 'checkpoints'} is not writable"):
        manager.DraftCheckpointer(tmp_path / "checkpoints", keep=1)
    monkeypatch.setattr(manager.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(PermissionError, match=rf"{tmp_path} is not writable.*saved to {tmp_path / 'new'}"):
        manager.DraftCheckpointer(tmp_path / "new", keep=1)


def test_only_the_loops_checks_report_to_jaxs_preemption_sync_point(target, dataset, tmp_path, monkeypatch):
    """JAX settles on one past the furthest step id reported: the ids must be the checks, 0, 1, 2, ...
    orbax's manager reports each save's step too (from a thread on process 0 as well), which would move
    the point away from the checks (or apart between processes) and the job would never stop."""
    import itertools

    from jax.experimental import multihost_utils

    from flatspec_jax import runtime

    reported = []
    monkeypatch.setattr(runtime, "_checks", itertools.count())
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: reported.append(step) or False)
    cfg = load_config(None, ["train.steps=4", f"train.row_length={ROW}", f"train.batch_tokens={ROW * 8}",
                             "train.save_every=2", "train.log_every=1", "data.heldout=0",
                             f"train.loss_chunk={LOSS_CHUNK}"])
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    train_draft(cfg, tmp_path, mesh, ShardingRules(), target, dataset, None, VOCAB_HASH)
    assert reported == [0, 1, 2, 3, 4]  # before the first step, then after each


def test_a_preempted_job_saves_the_agreed_step_stops_and_resumes_from_it(target, dataset, tmp_path, monkeypatch):
    """At the preemption sync point (simulated: JAX's needs jax.distributed) training saves that step
    whatever train.save_every says, stops, and a re-run resumes from it to the end."""
    from flatspec_jax.runtime import Preempted

    cfg = load_config(None, ["train.steps=4", f"train.row_length={ROW}", f"train.batch_tokens={ROW * 8}",
                             "train.save_every=100", "train.log_every=1", "data.heldout=0",
                             f"train.loss_chunk={LOSS_CHUNK}"])
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    checks = []  # told to stop at the third check (after step 2), and from then on, as runtime's flag stays set
    monkeypatch.setattr(train_loop, "reached_preemption", lambda: checks.append(len(checks)) or len(checks) >= 3)
    with pytest.raises(Preempted, match=rf"preempted at step 2: saved it to {tmp_path / 'checkpoints'}"):
        train_draft(cfg, tmp_path, mesh, ShardingRules(), target, dataset, None, VOCAB_HASH)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    with pytest.raises(Preempted, match=r"preempted before training resumed; .* holds step 2"):
        train_draft(cfg, tmp_path, mesh, ShardingRules(), target, dataset, None, VOCAB_HASH)  # still step 2
    checks.clear()  # one check before the first step, then one after each: 3 and 4; at the last step simply done
    monkeypatch.setattr(train_loop, "reached_preemption", lambda: checks.append(len(checks)) or len(checks) == 3)
    summary = train_draft(cfg, tmp_path, mesh, ShardingRules(), target, dataset, None, VOCAB_HASH)
    assert summary.steps == 4 and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert checks == [0, 1, 2], "the resumed run checks once before its first step"
