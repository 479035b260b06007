"""A target of split layers (``split_layers``: each layer and its KV cache in their own buffers,
the decoding layout) computes exactly what the stacked, scanned one does: forwards, caches,
compaction, and autoregressive and speculative decoding token for token.

The tiny random target has 3 layers, so a layer index off by one changes the outputs.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flatspec_jax.config import ConfigError, DecodeConfig
from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.commit import compact_cache
from flatspec_jax.decoding.runner import Decoder
from flatspec_jax.decoding.sampling import SamplingSettings
from flatspec_jax.decoding.speculative import SpeculativeSettings, speculative_generate
from flatspec_jax.models.llama import KVCache, create_model, split_layers
from flatspec_jax.models.masks import beside_cache_mask, cached_mask, causal_mask
from flatspec_jax.weights.arch import ArchSpec
from random_weights import agreeing_head, random_module

ARCH = ArchSpec(architecture="llama", vocab_size=13, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
SLOTS, PREFILL, BATCH, EOS = 24, 7, 2, 10
TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    stacked = random_module(lambda: create_model(ARCH), seed=3)
    return stacked, split_layers(stacked)


def per_layer(cache: KVCache) -> list[tuple[np.ndarray, np.ndarray]]:
    """[layer][k or v] arrays [B, K, S, H] of either layout."""
    if isinstance(cache.k, tuple):
        return [(np.asarray(k[0]), np.asarray(v[0])) for k, v in zip(cache.k, cache.v)]
    return [(np.asarray(cache.k[i]), np.asarray(cache.v[i])) for i in range(cache.k.shape[0])]


def assert_same_caches(got: KVCache, want: KVCache) -> None:
    got_layers, want_layers = per_layer(got), per_layer(want)
    assert len(got_layers) == len(want_layers) == ARCH.num_layers
    for (gk, gv), (wk, wv) in zip(got_layers, want_layers):
        np.testing.assert_allclose(gk, wk, atol=TOL)
        np.testing.assert_allclose(gv, wv, atol=TOL)


@functools.partial(jax.jit, static_argnames=("graphdef", "write"))
def _forward(graphdef, state, tokens, positions, mask, cache, cache_index, write=True):
    out = nnx.merge(graphdef, state)(tokens, positions, mask, cache, cache_index, write_cache=write)
    return out.logits, out.cache


def run(model, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, *args, **kwargs)


def test_each_layer_gets_its_own_slice_of_the_stack(models):
    stacked, split = models
    assert stacked.scan_layers and not split.scan_layers
    assert len(split.layers) == ARCH.num_layers
    stacked_q = np.asarray(stacked.layers.layers.self_attn.q_proj[...])
    for index, layer in enumerate(split.layers):
        q = layer.layers.self_attn.q_proj
        assert q[...].shape == (1, ARCH.hidden_size, ARCH.num_heads, ARCH.head_dim)
        np.testing.assert_array_equal(q[...], stacked_q[index:index + 1])
        assert q.logical_axes == stacked.layers.layers.self_attn.q_proj.logical_axes
    assert split.embed_tokens.get_value() is stacked.embed_tokens.get_value()  # shared, not copied
    assert split_layers(split) is split
    cache = split.empty_cache(BATCH, SLOTS)
    assert len(cache.k) == ARCH.num_layers and cache.k[0].shape == (1, BATCH, ARCH.num_kv_heads, SLOTS, ARCH.head_dim)
    assert cache.length == SLOTS == stacked.empty_cache(BATCH, SLOTS).length


def test_forwards_and_caches_match_the_scanned_model(models):
    stacked, split = models
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, ARCH.vocab_size, (BATCH, PREFILL + 4)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(PREFILL + 4, dtype=jnp.int32), ids.shape)
    want, _ = run(stacked, ids, positions, causal_mask(BATCH, PREFILL + 4), None, None)
    got, _ = run(split, ids, positions, causal_mask(BATCH, PREFILL + 4), None, None)
    np.testing.assert_allclose(got, want, atol=TOL)
    assert np.abs(np.asarray(want)).max() > 0.1

    # Prefill, then a 3-token chunk written into the cache, and the same chunk only read beside it.
    start = jnp.zeros((BATCH,), jnp.int32)
    prefill_mask = cached_mask(start, causal_mask(BATCH, PREFILL), SLOTS)
    prefill = [run(m, ids[:, :PREFILL], positions[:, :PREFILL], prefill_mask, m.empty_cache(BATCH, SLOTS), start)
               for m in (stacked, split)]
    assert_same_caches(prefill[1][1], prefill[0][1])
    index = jnp.asarray([PREFILL - 2, PREFILL], jnp.int32)  # rows at different lengths
    chunk, chunk_positions = ids[:, PREFILL:PREFILL + 3], index[:, None] + jnp.arange(3, dtype=jnp.int32)
    written = [run(m, chunk, chunk_positions, cached_mask(index, causal_mask(BATCH, 3), SLOTS), cache, index)
               for m, (_, cache) in zip((stacked, split), prefill)]
    np.testing.assert_allclose(written[1][0], written[0][0], atol=TOL)
    assert_same_caches(written[1][1], written[0][1])
    read = [run(m, chunk, chunk_positions, beside_cache_mask(index, causal_mask(BATCH, 3), SLOTS), cache, None,
                write=False) for m, (_, cache) in zip((stacked, split), prefill)]
    np.testing.assert_allclose(read[1][0], written[0][0], atol=TOL)
    assert isinstance(read[1][1].k, tuple) and read[1][1].k[0].shape == (1, BATCH, ARCH.num_kv_heads, 3,
                                                                         ARCH.head_dim)
    assert_same_caches(prefill[1][1].write(read[1][1], index), written[0][1])


def test_compaction_moves_every_layer_alike(models):
    stacked, split = models
    rng = np.random.default_rng(1)
    shape = (ARCH.num_layers, BATCH, ARCH.num_kv_heads, SLOTS, ARCH.head_dim)
    cache = KVCache(k=jnp.asarray(rng.normal(size=shape), jnp.float32), v=jnp.asarray(rng.normal(size=shape),
                                                                                     jnp.float32))
    layered = KVCache(k=tuple(cache.k[i:i + 1] for i in range(ARCH.num_layers)),
                      v=tuple(cache.v[i:i + 1] for i in range(ARCH.num_layers)))
    cache_index = jnp.asarray([3, 9], jnp.int32)
    path = jnp.asarray([[0, 2, 5, -1], [0, 1, 3, 4]], jnp.int32)
    accepted = jnp.asarray([2, 3], jnp.int32)
    want = compact_cache(cache, cache_index, path, accepted)
    got = compact_cache(layered, cache_index, path, accepted)
    assert_same_caches(got, want)
    assert not np.array_equal(np.asarray(want.k), np.asarray(cache.k))  # something moved


GENERATION = GenerationSettings(max_new_tokens=16, cache_length=48, eos_ids=(EOS,))
SAMPLED = GenerationSettings(max_new_tokens=16, cache_length=48, eos_ids=(EOS,), sampling=SamplingSettings(1.0, 0.9))


@pytest.mark.parametrize("generation", [GENERATION, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("method", ["ar", "chain", "tree"])
def test_decoding_emits_the_same_tokens(models, method, generation):
    stacked, split = models
    head = nnx.split(agreeing_head(ARCH, seed=4))
    rng = np.random.default_rng(2)
    lengths = jnp.asarray([5, 11, 2, 8], jnp.int32)
    prompts = jnp.asarray(np.where(np.arange(16)[None] < np.asarray(lengths)[:, None],
                                   rng.integers(0, ARCH.vocab_size, (4, 16)), 0), jnp.int32)
    key = jax.random.key(7)
    outputs = []
    for model in (stacked, split):
        graphdef, state = nnx.split(model)
        if method == "ar":
            outputs.append(generate(graphdef, state, prompts, lengths, key, generation))
        else:
            settings = SpeculativeSettings(generation, method=method, gamma=3, depth=2, top_k=3, total_tokens=8)
            outputs.append(speculative_generate(graphdef, state, *head, prompts, lengths, key, settings))
    want, got = outputs
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    if method != "ar":
        np.testing.assert_array_equal(got.accept_counts, want.accept_counts)
        assert int(jnp.sum(want.accept_counts[:, 1:])) > 0  # the drafts were tested, not just skipped


def test_the_decoder_takes_either_layout(models):
    stacked, split = models
    cfg = DecodeConfig(method="ar", max_new_tokens=8, max_cache_length=128)
    prompt = np.asarray([1, 4, 2, 7], np.int32)
    results = [Decoder(model, cfg, (EOS,), 0).run([prompt], jax.random.key(0)) for model in (stacked, split)]
    np.testing.assert_array_equal(results[1].tokens[0], results[0].tokens[0])
    assert DecodeConfig().scan_layers is False


def in_loop_cache_copies(hlo: str, cache_shape: str) -> int:
    """Copies of a cache-shaped buffer outside the entry computation (in a loop body, or fusions in one)."""
    computation, count = None, 0
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.endswith("{"):
            computation = line.split()[0]
        elif computation != "ENTRY" and re.search(re.escape(cache_shape) + r"\{[^}]*\} copy\(", line):
            count += 1
    return count


@pytest.mark.parametrize("layout", ["split", "scanned"])
def test_decoding_steps_update_the_caches_in_place(models, layout):
    """No decoding step copies a KV cache. A one-slot scatter lowered to a dynamic-update-slice made
    XLA:CPU recompute the update into fresh copies of each layer's cache for its reads (four per
    layer and step with split layers), which `Attention` now avoids."""
    model = models[1] if layout == "split" else models[0]
    graphdef, state = nnx.split(model)
    head = nnx.split(agreeing_head(ARCH, seed=4))
    prompts, lengths, key = jnp.ones((1, 16), jnp.int32), jnp.asarray([5], jnp.int32), jax.random.key(0)
    # [1, B, K, S, H]: a split layer's cache and the head's; [L, B, K, S, H]: the scanned target's.
    shapes = [f"f32[{layers},1,{ARCH.num_kv_heads},{GENERATION.cache_length},{ARCH.head_dim}]"
              for layers in (1, ARCH.num_layers)]
    programs = {"ar": generate.lower(graphdef, state, prompts, lengths, key, GENERATION)}
    for method in ("chain", "tree"):
        settings = SpeculativeSettings(GENERATION, method=method, gamma=2, depth=2, top_k=3, total_tokens=8)
        programs[method] = speculative_generate.lower(graphdef, state, *head, prompts, lengths, key, settings)
    for method, lowered in programs.items():
        hlo = lowered.compile().as_text()
        target_shape = shapes[0] if layout == "split" else shapes[1]
        assert target_shape in hlo, (method, "no buffer of the target cache's shape: the test lost its subject")
        for shape in shapes:
            assert in_loop_cache_copies(hlo, shape) == 0, f"{method} decoding copies a {shape} cache in its loop"


def test_the_decoder_pads_a_prompt_that_fits_the_cache_below_its_limit_and_refuses_empty_ones(models):
    _, split = models
    decoder = Decoder(split, DecodeConfig(method="ar", max_new_tokens=4, max_cache_length=100), (EOS,), 0)
    assert decoder.prompt_width(5) == 64
    assert decoder.prompt_width(70) == 99  # its bucket, 128, would not fit the 100 slots
    with pytest.raises(ConfigError, match=r"prompt of 100 tokens leaves no room .* decode\.max_cache_length=100"):
        decoder.prompt_width(100)
    result = decoder.run([np.arange(90, dtype=np.int32) % EOS], jax.random.key(0))
    assert 1 <= len(result.tokens[0]) <= 4
    with pytest.raises(ValueError, match="at least one token each"):
        decoder.run([np.asarray([3], np.int32), np.asarray([], np.int32)], jax.random.key(0))
