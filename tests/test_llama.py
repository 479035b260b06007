"""The NNX Llama decoder against HF transformers, and its masks, KV cache, decoding, sampling and sharding.

Every model here is tiny (vocab 97, hidden 64, 2 layers) and float32. HF models are built by the
tests, given random weights at a scale that makes every activation O(1) (so 1e-4 logit parity is a
real check), saved as safetensors and loaded through ``load_target_model``.

Parameters always travel into ``jax.jit`` as arguments (``nnx.split``), never as closed-over
constants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax.config import MeshConfig
from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.sampling import SamplingSettings, sample, warped_log_probs
from flatspec_jax.models.llama import (ATTENTION_BLOCK, KVCache, create_model, dense, lm_head_logits,
                                      rope_inverse_frequencies, split_layers)
from flatspec_jax.models.masks import beside_cache_mask, cached_mask, causal_mask, segment_causal_mask
from flatspec_jax.sharding import ShardingRules, batch_sharding, make_mesh
from flatspec_jax.weights import ArchSpec, WeightsError
from flatspec_jax.weights.to_nnx import load_target_model


TINY = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
BATCH, LENGTH = 3, 23
PARITY_TOL = 1e-4  # ours vs PyTorch (different kernels)
SELF_TOL = 1e-5  # ours vs ours (same weights, different masks/caching/sharding)


# --- helpers ---------------------------------------------------------------------------------

def build_hf(config: transformers.PretrainedConfig, seed: int = 0):
    """An HF causal LM with O(1)-activation random weights (norms ~1, biases ~0.2, linears ~1/sqrt(fan_in))."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return model.eval()


def save_hf(model, directory: Path, **kwargs) -> Path:
    # transformers 5 always writes safetensors (safe_serialization is gone from the signature).
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor(positions, dtype=torch.long)}
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()


def single_device_mesh():
    return make_mesh(MeshConfig(), devices=jax.devices()[:1])


def load(directory: Path, mesh=None):
    model = load_target_model(str(directory), mesh or single_device_mesh(), ShardingRules())
    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask).logits


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(graphdef, state, tokens, positions, mask, cache, cache_index):
    out = nnx.merge(graphdef, state)(tokens, positions, mask, cache, cache_index)
    return out.logits, out.cache


def forward(graphdef, state, tokens, positions=None, mask=None) -> np.ndarray:
    """Cache-free causal forward; [B, T] ids -> [B, T, V] float32 logits."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask is None:
        mask = causal_mask(b, t)
    return np.asarray(_forward(graphdef, state, tokens, jnp.asarray(positions, jnp.int32), mask))


def graphdef_arch(graphdef, state) -> ArchSpec:
    """The architecture a split model was built for."""
    return nnx.merge(graphdef, state).arch


def random_ids(batch: int = BATCH, length: int = LENGTH, vocab: int = 97, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (untied) saved as a 2+-shard safetensors index, loaded on one device."""
    directory = tmp_path_factory.mktemp("llama")
    hf = build_hf(transformers.LlamaConfig(**TINY))
    save_hf(hf, directory, max_shard_size="200KB")
    graphdef, state = load(directory)
    return directory, hf, graphdef, state


# --- parity with HF transformers ------------------------------------------------------------

def test_llama_parity_sharded_checkpoint(llama):
    directory, hf, graphdef, state = llama
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (directory / "model.safetensors").exists()
    ids = random_ids(2)  # [2, 23], the shape every other test of this model uses (one compile)
    want = hf_logits(hf, ids)
    assert np.abs(want).max() > 1.0  # the weights' scale makes the comparison meaningful
    assert max_diff(forward(graphdef, state, ids), want) <= PARITY_TOL


def test_block_causal_attention_parity_past_one_block(llama):
    """Cache-free attention runs in query blocks of ATTENTION_BLOCK that read keys only up to their
    end: 2.3 blocks (the last one partial), packed with a sample boundary inside a block."""
    _, hf, graphdef, state = llama
    length = 2 * ATTENTION_BLOCK + 21
    ids = random_ids(1, length, seed=11)
    assert max_diff(forward(graphdef, state, ids), hf_logits(hf, ids)) <= PARITY_TOL
    cut = ATTENTION_BLOCK + 17
    segments = jnp.asarray([[1] * cut + [2] * (length - cut)], jnp.int32)
    positions = np.array([[*range(cut), *range(length - cut)]])
    packed = forward(graphdef, state, ids, positions, segment_causal_mask(segments))
    assert max_diff(packed[0, cut:], hf_logits(hf, ids[:, cut:])[0]) <= PARITY_TOL


@pytest.mark.parametrize("original_max", [16, 32])
def test_llama3_rope_scaling_parity(tmp_path, original_max):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max}
    config = transformers.LlamaConfig(**TINY, rope_scaling=rope)
    hf = build_hf(config, seed=1)
    graphdef, state = load(save_hf(hf, tmp_path))
    arch = graphdef_arch(graphdef, state)
    assert arch.rope_scaling is not None and arch.rope_scaling.original_max_position_embeddings == original_max
    # The scaling really changes frequencies (and, with 32, all three bands are present: kept,
    # interpolated, divided by `factor`).
    scaled = rope_inverse_frequencies(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    plain = rope_inverse_frequencies(arch.head_dim, arch.rope_theta, None)
    ratio = scaled / plain
    assert np.any(ratio < 0.99)
    if original_max == 32:
        assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 1 / 8))
        assert np.any((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3))
    ids = random_ids(seed=1)
    # Positions 0..22 (past 16) and 37..59 (past 32, up to max_position_embeddings 64).
    for offset in (0, 37):
        positions = np.broadcast_to(np.arange(LENGTH) + offset, ids.shape)
        want = hf_logits(hf, ids, positions)
        assert max_diff(forward(graphdef, state, ids, positions), want) <= PARITY_TOL


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_parity(tmp_path, family):
    window = 8
    if family == "mistral":
        make = lambda w: transformers.MistralConfig(**TINY, sliding_window=w)
    else:
        make = lambda w: transformers.Qwen2Config(**TINY, use_sliding_window=w is not None,
                                                  sliding_window=w or 4096, max_window_layers=0)
    hf = build_hf(make(window), seed=2)
    graphdef, state = load(save_hf(hf, tmp_path))
    assert graphdef_arch(graphdef, state).sliding_window == window
    ids = random_ids(seed=2)
    want = hf_logits(hf, ids)
    # HF's own output depends on the window here, so parity below tests the window.
    unwindowed = build_hf(make(None), seed=2)
    unwindowed.load_state_dict(hf.state_dict())
    full = hf_logits(unwindowed, ids)
    np.testing.assert_allclose(full[:, :window], want[:, :window], atol=1e-5)
    assert max_diff(full[:, window:], want[:, window:]) > 1e-2
    assert max_diff(forward(graphdef, state, ids), want) <= PARITY_TOL


def test_tied_qwen2_parity(tmp_path):
    hf = build_hf(transformers.Qwen2Config(**TINY, tie_word_embeddings=True), seed=3)
    directory = save_hf(hf, tmp_path)
    graphdef, state = load(directory)
    model = nnx.merge(graphdef, state)
    assert model.arch.tie_word_embeddings and model.arch.attention_bias and model.lm_head is None
    ids = random_ids(seed=3)
    assert max_diff(forward(graphdef, state, ids), hf_logits(hf, ids)) <= PARITY_TOL


# --- bfloat16 compute --------------------------------------------------------------------------

def test_bfloat16_products_accumulate_and_return_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
    got = dense("btd,df->btf", x, w, jnp.bfloat16)
    assert got.dtype == jnp.float32
    # Products of bfloat16 values are exact in float32; only the summation order may differ.
    want = np.einsum("btd,df->btf", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert max_diff(got, want) <= 1e-4
    # A bfloat16 result (8 significant bits) misses by far more: the check can fail.
    assert max_diff(np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64), want) > 1e-3


@pytest.mark.parametrize("leading", [(1, 1), (1, 3), (2, 8), (1, 17), (4, 64)])
@pytest.mark.parametrize("hidden_dtype,weight_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                       ("bfloat16", "float32")])
def test_lm_head_logits_equal_the_exact_product_at_every_token_count(leading, hidden_dtype, weight_dtype):
    # 2-16 tokens take the fused multiply-reduce on CPU, 1 and more the dot: both must give the
    # float64 product of the operands in the hidden dtype. (An earlier multiply-reduce rounded a
    # float32 head to bfloat16 in the graph and XLA:CPU's fused kernel dropped that rounding:
    # off by ~2e-3 here.)
    rng = np.random.default_rng(len(leading) + leading[-1])
    hidden = jnp.asarray(rng.standard_normal((*leading, 64)), hidden_dtype)
    weight = jnp.asarray(rng.standard_normal((3000, 64)), weight_dtype)
    got = jax.jit(lm_head_logits)(hidden, weight)
    assert got.shape == (*leading, 3000) and got.dtype == jnp.float32
    want = np.asarray(hidden.astype(jnp.float32), np.float64) @ np.asarray(
        weight.astype(hidden_dtype).astype(jnp.float32), np.float64).T
    assert max_diff(got, want) <= 1e-6 * np.abs(want).max()


def test_bfloat16_forward_tracks_the_float32_forward(llama):
    directory, _, graphdef, state = llama
    model = load_target_model(str(directory), single_device_mesh(), ShardingRules(), dtype="bfloat16",
                              param_dtype="bfloat16")
    ids = random_ids(seed=6)
    want = forward(graphdef, state, ids)
    got = forward(*nnx.split(model), ids)
    assert got.dtype == np.float32
    # bfloat16 weights and activations: ~1% of the logits' scale, far below their spread.
    scale = float(np.std(want))
    assert 1e-4 * scale < max_diff(got, want) <= 0.05 * scale
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9


# --- packed rows ----------------------------------------------------------------------------

def test_packed_rows_match_separate_samples(llama):
    _, _, graphdef, state = llama
    a, b = random_ids(1, 9, seed=4)[0], random_ids(1, 11, seed=5)[0]
    pad = LENGTH - len(a) - len(b)
    # Two packed rows, the samples in both orders, padding (segment 0) at the end.
    rows = np.stack([np.concatenate([a, b, np.full(pad, 7)]), np.concatenate([b, a, np.full(pad, 7)])])
    segments = np.array([[1] * len(a) + [2] * len(b) + [0] * pad, [1] * len(b) + [2] * len(a) + [0] * pad])
    positions = np.array([[*range(len(a)), *range(len(b))] + [0] * pad,
                          [*range(len(b)), *range(len(a))] + [0] * pad])
    packed = forward(graphdef, state, rows, positions, segment_causal_mask(jnp.asarray(segments, jnp.int32)))
    assert np.all(np.isfinite(packed))  # padding queries see nothing but stay finite
    # Each sample alone at the start of a row (right padding is invisible to causal attention).
    alone = np.full((2, LENGTH), 7, np.int32)
    alone[0, :len(a)], alone[1, :len(b)] = a, b
    alone = forward(graphdef, state, alone)
    alone_a, alone_b = alone[0, :len(a)], alone[1, :len(b)]
    assert max_diff(packed[0, :len(a)], alone_a) <= SELF_TOL
    assert max_diff(packed[0, len(a):len(a) + len(b)], alone_b) <= SELF_TOL
    assert max_diff(packed[1, :len(b)], alone_b) <= SELF_TOL
    assert max_diff(packed[1, len(b):len(a) + len(b)], alone_a) <= SELF_TOL
    # Without the segment mask the second sample would see the first: the test can fail.
    leaky = forward(graphdef, state, rows, positions)
    assert max_diff(leaky[0, len(a):len(a) + len(b)], alone_b) > 1e-2


# --- KV cache -------------------------------------------------------------------------------

SLOTS = 31
PREFILL = 9


def cached_run(graphdef, state, tokens, start, cache, new_mask=None):
    """Feeds tokens [B, T] at slots (and positions) start[b] ...; returns (logits, cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    index = jnp.asarray(start, jnp.int32)
    positions = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mask = cached_mask(index, causal_mask(b, t) if new_mask is None else new_mask, SLOTS)
    logits, cache = _cached_forward(graphdef, state, tokens, positions, mask, cache, index)
    return np.asarray(logits), cache


def test_cached_forward_matches_full_forward(llama):
    _, _, graphdef, state = llama
    arch = graphdef_arch(graphdef, state)
    ids = random_ids(2, LENGTH, seed=6)
    full = forward(graphdef, state, ids)
    cache = KVCache.zeros(arch, arch.num_layers, 2, SLOTS, jnp.float32)
    logits, cache = cached_run(graphdef, state, ids[:, :PREFILL], [0, 0], cache)
    pieces, start = [logits], PREFILL
    # A chunk of 3, then single tokens to the end.
    for count in [3] + [1] * (LENGTH - PREFILL - 3):
        logits, cache = cached_run(graphdef, state, ids[:, start:start + count], [start, start], cache)
        pieces.append(logits)
        start += count
    assert max_diff(np.concatenate(pieces, axis=1), full) <= SELF_TOL


def test_cached_rows_at_different_cache_indices(llama):
    _, _, graphdef, state = llama
    arch = graphdef_arch(graphdef, state)
    ids = random_ids(2, LENGTH, seed=7)
    full = forward(graphdef, state, ids)
    lengths = np.array([5, PREFILL])
    # Right-padded prefill of both rows (row 0's slots 5..8 get junk that later steps overwrite).
    prompts = ids[:, :PREFILL].copy()
    prompts[0, 5:] = 96
    cache = KVCache.zeros(arch, arch.num_layers, 2, SLOTS, jnp.float32)
    logits, cache = cached_run(graphdef, state, prompts, [0, 0], cache)
    assert max_diff(logits[0, :5], full[0, :5]) <= SELF_TOL
    assert max_diff(logits[1], full[1, :PREFILL]) <= SELF_TOL
    index = lengths.copy()
    while index.max() < LENGTH:
        tokens = ids[np.arange(2), index][:, None]
        logits, cache = cached_run(graphdef, state, tokens, index, cache, jnp.ones((2, 1, 1), bool))
        for row in range(2):
            assert max_diff(logits[row, 0], full[row, index[row]]) <= SELF_TOL, (row, index[row])
        index += 1


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _read_only_forward(graphdef, state, tokens, positions, mask, cache, cache_index):
    out = nnx.merge(graphdef, state)(tokens, positions, mask, cache, write_cache=False)
    return out.logits, cache.write(out.cache, cache_index)


@pytest.mark.parametrize("window, tree", [(None, False), (None, True), (5, False)],
                         ids=["causal", "tree", "sliding-window"])
def test_reading_the_cache_beside_new_tokens_equals_writing_them_into_it(llama, window, tree):
    """Two rows prefilled to different lengths, then 4 new tokens each (a chain, or a tree: nodes
    2 and 3 children of node 1, so node 3 must not see node 2): the forward that only reads the
    cache (mask [B, T, S + T]) gives the logits of the one that writes the tokens into it, and
    storing its new keys and values with ``KVCache.write`` gives the same cache."""
    _, _, unwindowed, state = llama
    arch = dataclasses.replace(graphdef_arch(unwindowed, state), sliding_window=window)
    graphdef = unwindowed if window is None else nnx.split(create_model(arch))[0]  # same weights, a window of 5
    ids = random_ids(2, PREFILL + 4, seed=8)
    cache = KVCache.zeros(arch, arch.num_layers, 2, SLOTS, jnp.float32)
    _, cache = cached_run(graphdef, state, ids[:, :PREFILL], [0, 0], cache)
    index = jnp.asarray([6, PREFILL], jnp.int32)  # row 0 continues after 6 of its prefilled tokens
    parents = [0, 0, 1, 1] if tree else [0, 0, 1, 2]
    ancestry = np.eye(4, dtype=bool)
    for node in range(1, 4):
        ancestry[node] |= ancestry[parents[node]]
    depths = ancestry.sum(axis=1) - 1
    new_mask = jnp.broadcast_to(jnp.asarray(ancestry), (2, 4, 4))
    tokens = jnp.asarray(ids[:, PREFILL:], jnp.int32)
    positions = index[:, None] + jnp.asarray(depths, jnp.int32)[None]
    want_logits, want_cache = _cached_forward(graphdef, state, tokens, positions,
                                              cached_mask(index, new_mask, SLOTS), cache, index)
    logits, written = _read_only_forward(graphdef, state, tokens, positions,
                                         beside_cache_mask(index, new_mask, SLOTS), cache, index)
    assert max_diff(np.asarray(logits), np.asarray(want_logits)) <= SELF_TOL
    np.testing.assert_allclose(written.k, want_cache.k, atol=1e-6)
    np.testing.assert_allclose(written.v, want_cache.v, atol=1e-6)
    if window is not None:  # the window shapes the result
        unwindowed_logits, _ = _cached_forward(unwindowed, state, tokens, positions,
                                               cached_mask(index, new_mask, SLOTS), cache, index)
        assert max_diff(np.asarray(want_logits), np.asarray(unwindowed_logits)) > 1e-3


def test_cache_index_is_required_with_a_cache(llama):
    _, _, graphdef, state = llama
    arch = graphdef_arch(graphdef, state)
    model = nnx.merge(graphdef, state)
    cache = KVCache.zeros(arch, arch.num_layers, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="cache_index"):
        model(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 8), bool), cache)


# --- autoregressive decoding ----------------------------------------------------------------

GEN_LENGTHS = np.array([5, 9], np.int32)
GEN_NEW = 12
PAD = 96


@pytest.fixture(scope="module")
def gen_model(llama):
    _, _, graphdef, state = llama
    prompts = random_ids(2, int(GEN_LENGTHS.max()), seed=8)
    prompts[0, GEN_LENGTHS[0]:] = 0  # right padding
    return graphdef, state, prompts


@pytest.fixture(scope="module")
def greedy_reference(gen_model) -> list[list[int]]:
    """Greedy continuations by re-running the full cache-free forward over the growing sequences
    each step (rows padded to a fixed length, so one compile: causal attention ignores the
    right padding)."""
    graphdef, state, prompts = gen_model
    assert GEN_LENGTHS.max() + GEN_NEW <= LENGTH
    seq = np.zeros((2, LENGTH), np.int32)
    seq[:, :prompts.shape[1]] = prompts
    out: list[list[int]] = [[], []]
    for step in range(GEN_NEW):
        logits = forward(graphdef, state, seq)
        for row in range(2):
            n = GEN_LENGTHS[row] + step
            out[row].append(int(np.argmax(logits[row, n - 1])))
            seq[row, n] = out[row][-1]
    return out


def run_generate(gen_model, **settings):
    graphdef, state, prompts = gen_model
    settings = GenerationSettings(**{"max_new_tokens": GEN_NEW, "cache_length": 32, "eos_ids": (),
                                     "pad_id": PAD, **settings})
    out = generate(graphdef, state, jnp.asarray(prompts), jnp.asarray(GEN_LENGTHS), jax.random.key(0), settings)
    return np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.target_calls)


def test_generate_greedy_matches_full_forward_loop(gen_model, greedy_reference):
    tokens, lengths, calls = run_generate(gen_model)
    assert lengths.tolist() == [GEN_NEW, GEN_NEW]
    assert calls.tolist() == [GEN_NEW - 1, GEN_NEW - 1]
    for row in range(2):
        assert tokens[row].tolist() == greedy_reference[row], row
    # Not degenerate: the test would notice a wrong cache.
    assert len(set(greedy_reference[0])) > 2 and greedy_reference[0] != greedy_reference[1]


HF_FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral-window-6": lambda: transformers.MistralConfig(**TINY, sliding_window=6),
    "qwen2-window-6": lambda: transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6,
                                                       max_window_layers=0),
}


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_cached_greedy_decoding_equals_transformers_generate(tmp_path, family):
    """Our jitted, KV-cached greedy loop against the real client's `generate` on the same weights:
    prompts of 7 and 11 tokens and 16 new ones, so a sliding window of 6 is passed by the prompt
    already and the cached decoding must drop the slots that leave it at every step."""
    hf = build_hf(HF_FAMILIES[family](), seed=4)
    graphdef, state = load(save_hf(hf, tmp_path))
    # No EOS on either side (ours: eos_ids=()); HF's min_new_tokens would instead mask EOS's logit.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    lengths, new = [7, 11], 16
    ids = random_ids(2, max(lengths), seed=4)
    settings = GenerationSettings(max_new_tokens=new, cache_length=32, eos_ids=())
    got = generate(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths, jnp.int32), jax.random.key(0), settings)
    for row, length in enumerate(lengths):
        with torch.no_grad():
            want = hf.generate(torch.tensor(ids[row:row + 1, :length], dtype=torch.long), max_new_tokens=new,
                               do_sample=False)
        assert np.asarray(got.tokens)[row].tolist() == want[0, length:].tolist(), (family, row)
    assert len(set(np.asarray(got.tokens)[0].tolist())) > 3  # not a constant continuation


def test_generate_stops_at_eos_and_pads(gen_model, greedy_reference):
    ref0 = greedy_reference[0]
    # A token row 0 emits for the first time at step j >= 2.
    j = next(i for i in range(2, GEN_NEW) if ref0[i] not in ref0[:i])
    eos = ref0[j]
    tokens, lengths, calls = run_generate(gen_model, eos_ids=(eos,))
    np.testing.assert_array_equal(calls, lengths - 1)  # per row: a finished row stops counting
    for row in range(2):
        ref = greedy_reference[row]
        stop = ref.index(eos) + 1 if eos in ref else GEN_NEW
        assert lengths[row] == stop
        assert tokens[row].tolist() == ref[:stop] + [PAD] * (GEN_NEW - stop), row
    assert lengths[0] == j + 1


def test_generate_stops_at_full_cache(gen_model, greedy_reference):
    cache_length = 16
    tokens, lengths, _ = run_generate(gen_model, cache_length=cache_length)
    for row in range(2):
        room = cache_length - int(GEN_LENGTHS[row])
        # Every token fed to the model fits in the cache (the last generated one is never fed).
        assert room <= lengths[row] <= min(room + 1, GEN_NEW), (row, lengths[row])
        n = int(lengths[row])
        assert tokens[row].tolist() == greedy_reference[row][:n] + [PAD] * (GEN_NEW - n)


# --- sampling -------------------------------------------------------------------------------

PROBS = np.array([0.15, 0.5, 0.05, 0.2, 0.1])  # sorted: 0.5 (1), 0.2 (3), 0.15 (0), 0.1 (4), 0.05 (2)


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """Probabilities 1/2, 1/4, 1/4 (exact in float32): at top_p 0.5 the first token's mass reaches
    top_p, so the nucleus is that token alone (a strict ">" would add both tied 1/4 tokens)."""
    logits = jnp.asarray([np.log(2.0), 0.0, 0.0], jnp.float32)
    assert float(jnp.exp(jax.nn.log_softmax(logits))[0]) == 0.5
    got = np.exp(np.asarray(warped_log_probs(logits, SamplingSettings(temperature=1.0, top_p=0.5))))
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.asarray(np.log(PROBS) + 3.0, jnp.float32)  # a shift changes nothing
    cases = {
        0.45: [1],  # the top token alone already reaches 0.45
        0.6: [1, 3],  # 0.5 < 0.6: the crossing token (0.2) is kept
        0.75: [1, 3, 0],  # 0.7 < 0.75 <= 0.85
        0.9: [1, 3, 0, 4],
        0.99: [1, 3, 0, 4, 2],
    }
    for top_p, kept in cases.items():
        got = np.exp(np.asarray(warped_log_probs(logits, SamplingSettings(temperature=1.0, top_p=top_p))))
        want = np.zeros(5)
        want[kept] = PROBS[kept] / PROBS[kept].sum()
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"top_p={top_p}")
    # Leading dimensions are kept, rows are independent.
    batch = jnp.stack([logits, logits[::-1]])
    got = np.exp(np.asarray(warped_log_probs(batch, SamplingSettings(temperature=1.0, top_p=0.6))))
    np.testing.assert_allclose(got[1], np.exp(np.asarray(
        warped_log_probs(logits[::-1], SamplingSettings(temperature=1.0, top_p=0.6)))), atol=1e-7)
    assert (got[0] > 0).sum() == 2 and (got[1] > 0).sum() == 2


def sorted_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Reference: sort descending, keep tokens whose preceding mass is below top_p, then every
    token at least as likely as the last one kept (its ties)."""
    ordered = np.sort(probs)[::-1]
    before = np.cumsum(ordered) - ordered
    return probs >= ordered[before < top_p].min()


@settings(max_examples=60, deadline=None)
@given(levels=st.lists(st.integers(0, 6), min_size=2, max_size=40), top_p=st.floats(0.05, 0.99),
       scale=st.sampled_from([0.5, 2.0, 8.0]))
def test_top_p_nucleus_equals_the_sorted_reference(levels, top_p, scale):
    """The nucleus found by bisection keeps what sorting would, ties included (logits on a few
    levels make many ties); cases whose cumulative mass lies within rounding of top_p are skipped."""
    logits = jnp.asarray(np.asarray(levels, np.float32) * scale)
    log_probs = np.asarray(warped_log_probs(logits, SamplingSettings(temperature=1.0, top_p=top_p)))
    probs = np.asarray(jax.nn.softmax(logits), np.float64)
    cumulative = np.cumsum(np.sort(probs)[::-1])
    if np.min(np.abs(cumulative - top_p)) < 1e-5:
        return
    np.testing.assert_array_equal(np.isfinite(log_probs), sorted_nucleus(probs, top_p))


def test_top_p_of_a_large_vocabulary_equals_the_sorted_reference():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 49152)).astype(np.float32) * 3)
    for top_p in (0.1, 0.7, 0.95):
        kept = np.isfinite(np.asarray(warped_log_probs(logits, SamplingSettings(temperature=1.0, top_p=top_p))))
        probs = np.asarray(jax.nn.softmax(logits), np.float64)
        for row in range(4):
            np.testing.assert_array_equal(kept[row], sorted_nucleus(probs[row], top_p), err_msg=f"top_p={top_p}")


def test_temperature_scales_logits_before_top_p():
    logits = jnp.asarray(np.log(PROBS), jnp.float32)
    for temperature in (0.5, 2.0):
        tempered = PROBS ** (1 / temperature)
        tempered /= tempered.sum()
        got = np.exp(np.asarray(warped_log_probs(logits, SamplingSettings(temperature=temperature))))
        np.testing.assert_allclose(got, tempered, rtol=1e-5)
    # At T = 2 the flattened distribution is ~[.19 .34 .11 .21 .15]: top-p 0.6 now needs 3 tokens
    # (0.34 + 0.21 < 0.6), where at T = 1 it needed 2.
    tempered = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    got = np.exp(np.asarray(warped_log_probs(logits, SamplingSettings(temperature=2.0, top_p=0.6))))
    kept = [1, 3, 0]
    want = np.zeros(5)
    want[kept] = tempered[kept] / tempered[kept].sum()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_greedy_sample_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 7, 97)), jnp.float32)
    got = sample(jax.random.key(0), logits, SamplingSettings())
    assert got.dtype == jnp.int32 and got.shape == (4, 7)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("settings", [SamplingSettings(temperature=0.7), SamplingSettings(temperature=1.3, top_p=0.8)])
def test_sample_has_the_warped_distribution(settings):
    from scipy import stats
    logits = jnp.asarray(np.log(PROBS) * 1.7, jnp.float32)
    draws = 20_000
    keys = jax.random.split(jax.random.key(1234), draws)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, settings)))(keys))
    counts = np.bincount(tokens, minlength=5)
    probs = np.exp(np.asarray(warped_log_probs(logits, settings), np.float64))
    # Hand-computed reference of the warped distribution (nucleus included).
    tempered = PROBS ** (1.7 / settings.temperature)
    tempered /= tempered.sum()
    order = np.argsort(-tempered)
    before = np.cumsum(tempered[order]) - tempered[order]
    kept = order[before < settings.top_p]
    want = np.zeros(5)
    want[kept] = tempered[kept] / tempered[kept].sum()
    np.testing.assert_allclose(probs, want, atol=1e-6)
    assert counts[want == 0].sum() == 0
    support = want > 0
    assert support.sum() >= 3
    p_value = stats.chisquare(counts[support], draws * want[support]).pvalue
    assert p_value > 0.01, (counts, draws * want)


# --- sharded forward ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shardable(tmp_path_factory):
    """4 heads / 4 KV heads, vocab 100, MLP 96, hidden 64: every axis divides a tensor axis of 4."""
    directory = tmp_path_factory.mktemp("shardable")
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 100, "num_key_value_heads": 4})
    save_hf(build_hf(config, seed=5), directory)
    graphdef, state = load(directory)
    ids = random_ids(8, LENGTH, vocab=100, seed=9)
    return directory, ids, forward(graphdef, state, ids)


@pytest.mark.parametrize("mesh_config, embed_spec, q_spec", [
    (MeshConfig(data=2, fsdp=4), (None, "fsdp"), ("fsdp", None, None)),
    (MeshConfig(data=1, fsdp=2, tensor=4), ("tensor", "fsdp"), ("fsdp", "tensor", None)),
])
def test_sharded_forward_matches_one_device(shardable, mesh_config, embed_spec, q_spec):
    assert len(jax.devices()) == 8
    directory, ids, want = shardable
    mesh = make_mesh(mesh_config)
    rules = ShardingRules()
    model = load_target_model(str(directory), mesh, rules)
    assert tuple(model.embed_tokens[...].sharding.spec) == embed_spec
    # Stacked layer weights: [layers, embed, heads, head_dim].
    assert tuple(model.layers.layers.self_attn.q_proj[...].sharding.spec) == (None, *q_spec)
    if mesh_config.tensor > 1:
        assert "tensor" in tuple(model.layers.layers.mlp.up_proj[...].sharding.spec)
        assert "tensor" in tuple(model.layers.layers.self_attn.k_proj[...].sharding.spec)
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert len(leaf.sharding.device_set) == 8
    graphdef, state = nnx.split(model)
    tokens = jax.device_put(jnp.asarray(ids), batch_sharding(mesh, rules, 2))
    got = forward(graphdef, state, tokens)
    assert max_diff(got, want) <= SELF_TOL
    # The decoding layout keeps every layer's sharding: [1, embed, heads, head_dim] per layer.
    split = split_layers(model)
    for layer in split.layers:
        assert tuple(layer.layers.self_attn.q_proj[...].sharding.spec) == (None, *q_spec)
        assert len(layer.layers.mlp.down_proj[...].sharding.device_set) == 8
    assert max_diff(forward(*nnx.split(split), tokens), want) <= SELF_TOL


# --- error paths ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_llama_state(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    save_hf(build_hf(transformers.LlamaConfig(**TINY), seed=6), directory)
    return directory, safetensors_torch.load_file(directory / "model.safetensors")


def _with_tensor(tmp_path: Path, source: Path, state: dict, name: str, shape: tuple[int, ...]) -> Path:
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tensors = dict(state)
    tensors[name] = torch.zeros(shape)
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


_NAMED = [
    ("model.embed_tokens.weight", (96, 64)),
    ("model.norm.weight", (63,)),
    ("model.layers.1.mlp.up_proj.weight", (95, 64)),
    ("model.layers.0.mlp.down_proj.weight", (96, 64)),  # transposed
    ("model.layers.1.self_attn.q_proj.weight", (64, 80)),
    ("lm_head.weight", (97, 63)),
]


@pytest.mark.parametrize("name, shape", _NAMED + [
    ("model.layers.0.self_attn.k_proj.weight", (48, 64)),
    ("model.layers.1.self_attn.o_proj.weight", (64, 80)),
])
def test_wrong_tensor_shape_names_the_tensor(tmp_path, small_llama_state, name, shape):
    directory = _with_tensor(tmp_path, *small_llama_state, name, shape)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")) as raised:
        load_target_model(str(directory), single_device_mesh(), ShardingRules())
    assert str(directory) in str(raised.value)


def test_missing_tensor_names_the_tensor(tmp_path, small_llama_state):
    source, state = small_llama_state
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tensors = {k: v for k, v in state.items() if k != "model.layers.1.post_attention_layernorm.weight"}
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.post_attention_layernorm\.weight"):
        load_target_model(str(tmp_path), single_device_mesh(), ShardingRules())
