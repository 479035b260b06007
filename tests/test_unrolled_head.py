"""Training-time test (`EagleHead.unrolled`): draft k at position t is the k-th draft of a decoding
round whose context ends at t, computed for every position at once.

The reference is the decoding path itself: the head's KV cache filled over a sample's prefix
from the true features, then one cached forward per further draft fed the previous draft's
features (what `flatspec_jax.decoding.drafting` does each round).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import KVCache
from flatspec_jax.models.masks import cached_mask, causal_mask, segment_causal_mask
from flatspec_jax.weights import ArchSpec

ARCH = ArchSpec(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
DRAFTS = 3
SLOTS = 32
# One packed row: a sample of 5 tokens, one of 9, 2 padding slots.
SEGMENTS = np.array([[1] * 5 + [2] * 9 + [0] * 2], np.int32)
POSITIONS = np.array([list(range(5)) + list(range(9)) + [0, 0]], np.int32)
LENGTH = SEGMENTS.shape[1]


def decoded_drafts(head, features: np.ndarray, embeddings: np.ndarray, end: int) -> list[np.ndarray]:
    """The head's first ``DRAFTS`` drafts after a context of ``end + 1`` tokens, decoding-style.

    features: [1, end + 1, D] true features f_0..f_end; embeddings: [1, end + DRAFTS + 1, D], row j
    the embedding of x_j. Returns DRAFTS arrays [D].
    """
    cache = KVCache.zeros(head.arch, head.arch.num_layers, 1, SLOTS, jnp.float32)
    start = jnp.zeros((1,), jnp.int32)
    n = end + 1
    predicted, cache = head(features[:, :n], embeddings[:, 1:n + 1], jnp.arange(n)[None],
                            cached_mask(start, causal_mask(1, n), SLOTS), cache, start)
    drafts = [predicted[0, -1]]
    for k in range(2, DRAFTS + 1):
        slot = jnp.asarray([end + k - 1])
        predicted, cache = head(drafts[-1][None, None], embeddings[:, end + k:end + k + 1], slot[:, None],
                                cached_mask(slot, causal_mask(1, 1), SLOTS), cache, slot)
        drafts.append(predicted[0, 0])
    return [np.asarray(d) for d in drafts]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_unrolled_drafts_equal_decoding_rounds_in_both_packed_samples(num_layers):
    head = create_eagle_head(ARCH, num_layers, seed=3)
    rng = np.random.default_rng(num_layers)
    features = rng.normal(size=(1, LENGTH, ARCH.hidden_size)).astype(np.float32)
    # embeddings[:, j] stands for embed(x_j); the row has DRAFTS more past its end (zero-filled when training).
    embeddings = rng.normal(size=(1, LENGTH + DRAFTS, ARCH.hidden_size)).astype(np.float32)
    unrolled = head.unrolled(jnp.asarray(features), [jnp.asarray(embeddings[:, k:k + LENGTH])
                                                     for k in range(1, DRAFTS + 1)],
                             jnp.asarray(POSITIONS), segment_causal_mask(jnp.asarray(SEGMENTS)))
    assert len(unrolled) == DRAFTS and all(u.shape == features.shape for u in unrolled)
    # Each sample's first and last positions and some between (first: where the sample starts).
    for first, t in [(0, 0), (0, 2), (0, 4), (5, 5), (5, 6), (5, 10), (5, 13)]:
        # The sample alone, from its first token: packing must not leak the other sample in.
        want = decoded_drafts(head, features[:, first:t + 1], embeddings[:, first:], t - first)
        for k in range(DRAFTS):
            np.testing.assert_allclose(np.asarray(unrolled[k][0, t]), want[k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"draft {k + 1} at position {t}")


def test_first_unrolled_draft_is_the_plain_forward():
    head = create_eagle_head(ARCH, 1, seed=4)
    rng = np.random.default_rng(0)
    features, embeddings = (jnp.asarray(rng.normal(size=(2, LENGTH, ARCH.hidden_size)), jnp.float32)
                            for _ in range(2))
    segments = jnp.asarray(np.concatenate([SEGMENTS, np.ones_like(SEGMENTS)]))
    positions = jnp.asarray(np.concatenate([POSITIONS, np.arange(LENGTH)[None]]))
    mask = segment_causal_mask(segments)
    plain, _ = head(features, embeddings, positions, mask)
    first, second = head.unrolled(features, [embeddings, embeddings], positions, mask)
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(np.asarray(first)[real], np.asarray(plain)[real], rtol=1e-6, atol=1e-6)
    # The second draft reads the first draft's features, not the target's: it differs.
    assert np.abs(np.asarray(second - first)[real]).max() > 1e-3


def test_diagonal_keys_need_a_cache_that_is_only_read():
    head = create_eagle_head(ARCH, 1, seed=0)
    x = jnp.zeros((1, 4, ARCH.hidden_size))
    cache = KVCache.zeros(head.arch, 1, 1, 8, jnp.float32)
    steps = KVCache(k=jnp.zeros((1, 0, 1, ARCH.num_kv_heads, 4, ARCH.head_dim)),
                    v=jnp.zeros((1, 0, 1, ARCH.num_kv_heads, 4, ARCH.head_dim)))
    with pytest.raises(ValueError, match="write=False"):
        head(x, x, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 8), bool), cache, jnp.zeros((1,), jnp.int32),
             diagonal=steps)
