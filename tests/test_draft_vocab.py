"""``decoding.draft_vocab``: which tokens a reduced draft vocabulary keeps, and its logits and
probabilities mapped back to token ids. (Losslessness with it: ``test_speculative.py`` and
``test_spec_sampling.py``.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax.decoding.draft_vocab import DraftVocab, draft_logits, frequent_token_ids, full_vocab_probs, token_ids
from flatspec_jax.models.llama import create_model
from flatspec_jax.weights.arch import ArchSpec
from random_weights import random_module

ARCH = ArchSpec(architecture="llama", vocab_size=13, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)


def test_most_frequent_first_ties_by_lower_id_and_always_kept_ids_displace_the_last():
    tokens = np.array([5, 5, 5, 2, 2, 7, 7, 1])  # counts: 5:3, 2:2, 7:2, 1:1, the rest 0
    assert frequent_token_ids(tokens, 10, 3).tolist() == [2, 5, 7]
    assert frequent_token_ids(tokens, 10, 4).tolist() == [1, 2, 5, 7]
    assert frequent_token_ids(tokens, 10, 5).tolist() == [0, 1, 2, 5, 7]  # unseen: lowest id first
    assert frequent_token_ids(tokens, 10, 3, always=[9]).tolist() == [2, 5, 9]
    assert frequent_token_ids(tokens, 10, 3, always=[9, 9, 5]).tolist() == [2, 5, 9]
    assert frequent_token_ids(tokens, 10, 10).tolist() == list(range(10))
    assert frequent_token_ids(tokens, 10, 3).dtype == np.int32


@pytest.mark.parametrize("tokens, size, always, words", [
    ([1, 2], 11, (), "between 0"),
    ([1, 2], 1, (3, 4), "between 2"),
    ([1, 12], 3, (), "tokens holds ids outside"),
    ([1, 2], 3, (-1,), "always holds ids outside"),
])
def test_bad_arguments_are_named(tokens, size, always, words):
    with pytest.raises(ValueError, match=words):
        frequent_token_ids(np.array(tokens), 10, size, always)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 19), max_size=80), size=st.integers(2, 20),
       always=st.lists(st.integers(0, 19), max_size=2))
def test_kept_ids_are_sorted_unique_and_never_rarer_than_a_dropped_id(tokens, size, always):
    ids = frequent_token_ids(np.array(tokens, np.int64), 20, size, always)
    assert len(ids) == size and np.all(np.diff(ids) > 0) and set(always) <= set(ids.tolist())
    counts = np.bincount(np.array(tokens, np.int64), minlength=20)
    chosen = np.setdiff1d(ids, always)
    dropped = np.setdiff1d(np.arange(20), ids)
    if len(chosen) and len(dropped):
        assert counts[chosen].min() >= counts[dropped].max()


def test_logits_ids_and_probabilities_map_back_to_the_full_vocabulary():
    target = random_module(lambda: create_model(ARCH), seed=0)
    ids = jnp.asarray([1, 4, 5, 10], jnp.int32)
    vocab = DraftVocab.of(target, ids)
    hidden = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, ARCH.hidden_size)), jnp.float32)
    full = target.logits(hidden)
    np.testing.assert_allclose(draft_logits(target, hidden, vocab), full[..., ids], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(draft_logits(target, hidden, None), full)
    np.testing.assert_array_equal(token_ids(jnp.asarray([[3, 0]]), vocab), [[10, 1]])
    probs = jnp.asarray([[0.1, 0.2, 0.3, 0.4]])
    scattered = np.asarray(full_vocab_probs(probs, vocab, ARCH.vocab_size))
    expected = np.zeros((1, ARCH.vocab_size), np.float32)
    expected[0, [1, 4, 5, 10]] = [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_array_equal(scattered, expected)
