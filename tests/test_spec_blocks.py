"""Building blocks of speculative decoding: draft trees, EAGLE-2 drafting, verifiers, KV compaction.

Models are tiny random Llamas (float32) and an untrained EAGLE head; every check compares
against an independent computation (numpy, or the models run without a cache). Everything
runs under ``jax.jit`` (eager dispatch compiles op by op, which is far slower here), with
parameters passed as arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flatspec_jax.decoding.commit import append_tokens, compact_cache, emitted_tokens
from flatspec_jax.decoding.drafting import catch_up, draft_chain, draft_tree
from flatspec_jax.decoding.sampling import SamplingSettings
from flatspec_jax.decoding.tree import build_tree, chain_tree, tree_from_parents
from flatspec_jax.decoding.verify import (Verdict, verify_greedy_chain, verify_greedy_tree, verify_sampling_chain,
                                          verify_sampling_tree)
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import KVCache, create_model
from flatspec_jax.models.masks import cached_mask, causal_mask
from flatspec_jax.weights.arch import ArchSpec
from random_weights import random_module

ARCH = ArchSpec(architecture="llama", vocab_size=13, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
TOL = 1e-5
SLOTS = 32

# The worked example of the notes (k=3, depth=3, total_tokens=10): parents of nodes 1..10.
WORKED_PARENTS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 4]
WORKED_DEPTHS = [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3]
WORKED_RETRIEVE = [[0, 1, 5, -1], [0, 1, 6, -1], [0, 2, 7, -1], [0, 2, 8, -1], [0, 3, 9, -1], [0, 1, 4, 10]]

jit_build_tree = jax.jit(build_tree, static_argnames=("total_tokens", "max_depth"))
jit_tree_from_parents = jax.jit(tree_from_parents, static_argnames=("max_depth",))
jit_chain_tree = jax.jit(chain_tree)
jit_cached_mask = jax.jit(cached_mask, static_argnames=("num_slots",))


@pytest.fixture(scope="module")
def target():
    return nnx.split(random_module(lambda: create_model(ARCH), seed=3))


@pytest.fixture(scope="module")
def head():
    return nnx.split(random_module(lambda: create_eagle_head(ARCH, 1), seed=4))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def target_forward(graphdef, params, tokens, positions, new_mask, cache, cache_index):
    """Target over new tokens [B, T] written at ``cache_index``, seeing the committed slots and
    each other through ``new_mask`` [B, T, T]."""
    return nnx.merge(graphdef, params)(tokens, positions, cached_mask(cache_index, new_mask, cache.length), cache,
                                       cache_index)


def ancestry_closure(parents: np.ndarray) -> np.ndarray:
    """[T] parents -> [T, T] ancestor-or-self matrix, by walking up from every node."""
    size = len(parents)
    anc = np.zeros((size, size), bool)
    for j in range(size):
        i = j
        anc[j, i] = True
        while i != 0:
            i = parents[i]
            anc[j, i] = True
    return anc


# --- trees -----------------------------------------------------------------------------------

def worked_example_pool():
    """A k=3, depth=3 candidate pool (3 + 3 * 9 = 30) whose best 10 form the notes' example tree."""
    scores = np.full(30, -9.0, np.float32)
    parents = np.full(30, -1, np.int32)
    parents[3:12] = np.repeat([0, 1, 2], 3)  # level 2: children of the three level-1 beams
    parents[12:21] = np.repeat([3, 4, 6], 3)  # level 3: children of the level-2 beams 3, 4, 6
    parents[21:30] = np.repeat([12, 13, 15], 3)  # level 4
    kept = [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]
    scores[kept] = -np.linspace(0.1, 1.0, 10)
    scores[[8, 10, 11, 13, 14, 15]] = -2.0
    return scores, 100 + np.arange(30, dtype=np.int32), parents


def test_build_tree_reproduces_the_worked_example():
    scores, tokens, parents = worked_example_pool()
    tree = jit_build_tree(jnp.asarray([7]), jnp.asarray(scores[None]), jnp.asarray(tokens[None]),
                          jnp.asarray(parents[None]), total_tokens=10, max_depth=4)
    assert tree.parents[0, 1:].tolist() == WORKED_PARENTS
    assert tree.depths[0].tolist() == WORKED_DEPTHS
    assert tree.tokens[0].tolist() == [7] + [100 + i for i in [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]]
    np.testing.assert_array_equal(tree.ancestors[0], ancestry_closure(np.asarray(tree.parents[0])))
    leaves = np.flatnonzero(np.asarray(tree.leaves[0]))
    assert leaves.tolist() == [5, 6, 7, 8, 9, 10]
    # The pool has 4 levels, so paths have room for 5 nodes; the kept tree is 3 deep.
    assert np.asarray(tree.paths[0, leaves, :4]).tolist() == WORKED_RETRIEVE
    assert bool(jnp.all(tree.paths[0, :, 4] == -1))
    # The tree attention of the target over cached slots: committed prefix plus ancestors.
    mask = jit_cached_mask(jnp.asarray([4]), tree.ancestors, num_slots=20)[0]
    assert bool(jnp.all(mask[:, :4])) and not bool(jnp.any(mask[:, 15:]))
    np.testing.assert_array_equal(mask[:, 4:15], tree.ancestors[0])


def test_build_tree_on_random_pools_keeps_the_best_and_their_parents():
    """Random EAGLE-like pools (children score <= parents, exact ties included), batch of 3."""
    rng = np.random.default_rng(0)
    k, depth, total = 3, 3, 12
    batch_scores, batch_parents = [], []
    for _ in range(3):
        level_scores = np.sort(-rng.exponential(size=k))[::-1]
        beams, scores, parents = np.arange(k), list(level_scores), [-1] * k
        for _ in range(depth):
            increments = -rng.exponential(size=(k, k)) * (rng.random((k, k)) > 0.3)  # zeros: ties with parent
            cumulative = (np.asarray(scores)[beams][:, None] + increments).reshape(-1)
            start = len(scores)
            scores += list(cumulative)
            parents += list(np.repeat(beams, k))
            beams = start + np.argsort(-cumulative, kind="stable")[:k]
        batch_scores.append(scores)
        batch_parents.append(parents)
    scores = np.asarray(batch_scores, np.float32)
    parents = np.asarray(batch_parents, np.int32)
    tokens = np.broadcast_to(np.arange(scores.shape[1], dtype=np.int32), scores.shape)
    tree = jit_build_tree(jnp.zeros(3, jnp.int32), jnp.asarray(scores), jnp.asarray(tokens), jnp.asarray(parents),
                          total_tokens=total, max_depth=depth + 1)
    for b in range(3):
        kept = np.asarray(tree.tokens[b, 1:])  # token = pool index here
        order = sorted(range(scores.shape[1]), key=lambda i: (-scores[b, i], i))
        assert sorted(kept.tolist()) == kept.tolist() == sorted(order[:total])
        node_parents = np.asarray(tree.parents[b])
        assert all(node_parents[j] < j for j in range(1, total + 1))
        for j in range(1, total + 1):
            parent_pool = parents[b, kept[j - 1]]
            assert (node_parents[j] == 0) if parent_pool < 0 else (kept[node_parents[j] - 1] == parent_pool)
        anc = ancestry_closure(node_parents)
        np.testing.assert_array_equal(tree.ancestors[b], anc)
        np.testing.assert_array_equal(tree.depths[b], anc.sum(1) - 1)
        for j in range(total + 1):
            path = np.asarray(tree.paths[b, j])
            depth_j = int(tree.depths[b, j])
            assert path[depth_j] == j and np.all(path[depth_j + 1:] == -1)
            assert all(node_parents[path[d + 1]] == path[d] for d in range(depth_j))


@pytest.mark.parametrize("total", [1, 2, 4])
def test_build_tree_cut_through_a_parent_child_tie_keeps_the_parent(total):
    """A child whose draft log-prob is exactly 0 ties its parent's cumulative score. Ties go to the
    lower pool index, i.e. the parent, so a cut between the two keeps the parent and never an orphan."""
    # Pool (k=2): level 1 = [0, 1]; level 2 = children [2, 3] of 0 and [4, 5] of 1.
    scores = np.asarray([[-0.5, -0.5, -0.5, -3.0, -0.5, -4.0]], np.float32)  # 2 ties 0, 4 ties 1
    parents = np.asarray([[-1, -1, 0, 0, 1, 1]], np.int32)
    tree = jit_build_tree(jnp.asarray([7]), jnp.asarray(scores), 100 + jnp.arange(6, dtype=jnp.int32)[None],
                          jnp.asarray(parents), total_tokens=total, max_depth=2)
    kept = {1: [0], 2: [0, 1], 4: [0, 1, 2, 4]}[total]
    want_parents = {1: [0, 0], 2: [0, 0, 0], 4: [0, 0, 0, 1, 2]}[total]
    assert tree.tokens[0].tolist() == [7] + [100 + i for i in kept]
    assert tree.parents[0].tolist() == want_parents


def test_chain_tree():
    tree = jit_chain_tree(jnp.asarray([5, 6]), jnp.asarray([[1, 2, 3], [4, 5, 6]]))
    assert tree.tokens.tolist() == [[5, 1, 2, 3], [6, 4, 5, 6]]
    assert tree.parents.tolist() == [[0, 0, 1, 2]] * 2
    np.testing.assert_array_equal(tree.ancestors[1], np.tril(np.ones((4, 4), bool)))
    assert tree.depths[0].tolist() == [0, 1, 2, 3]
    assert tree.paths[0, 2].tolist() == [0, 1, 2, -1]


# --- EAGLE-2 drafting ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("target_graphdef", "head_graphdef", "length"))
def draft_log_probs(target_graphdef, target_params, head_graphdef, head_params, features, tokens, length):
    """Cache-free head over pairs (features [1, S, D], tokens [1, S]); the draft's log-probs [V]
    after pair ``length - 1`` (pairs past it are padding, invisible to it under the causal mask)."""
    target, head = nnx.merge(target_graphdef, target_params), nnx.merge(head_graphdef, head_params)
    size = tokens.shape[1]
    out, _ = head(features, target.embed(tokens), jnp.arange(size)[None], causal_mask(1, size))
    return out[0, length - 1], jax.nn.log_softmax(target.logits(out[0, length - 1]))


def reference_eagle2_tree(target, head, features, tokens, root, k, depth, total):
    """EAGLE-2 ``topK_genrate`` for one row, recomputing the head without a cache for every beam.

    features: [n, D] target features f_0..f_{n-1}; tokens: x_1..x_n (x_n = root).
    Returns (node tokens, node parents) of the selected tree.
    """
    n = len(tokens)
    width = 16

    def predict(path_hidden, path_tokens):
        feats = jnp.concatenate([features[:n]] + [h[None] for h in path_hidden])
        toks = np.zeros(width, np.int32)
        toks[:n + len(path_tokens)] = list(tokens) + path_tokens
        feats = jnp.pad(feats, ((0, width - feats.shape[0]), (0, 0)))
        hidden, logp = draft_log_probs(*target, *head, feats[None], jnp.asarray(toks)[None], n + len(path_tokens))
        return hidden, np.asarray(logp)

    root_hidden, logp = predict([], [])
    top = np.argsort(-logp)[:k]
    pool_scores, pool_tokens, pool_parents = list(logp[top]), list(top), [-1] * k
    # A beam: (pool index, score, its path's tokens, the hidden state paired with each).
    beams = [(i, logp[t], [int(t)], [root_hidden]) for i, t in enumerate(top)]
    for _ in range(depth):
        candidates = []
        for pool_index, score, path_tokens, path_hidden in beams:
            out, child_logp = predict(path_hidden, path_tokens)
            for c in np.argsort(-child_logp)[:k]:
                candidates.append((len(pool_scores), score + child_logp[c], path_tokens + [int(c)],
                                   path_hidden + [out]))
                pool_scores.append(score + child_logp[c])
                pool_tokens.append(int(c))
                pool_parents.append(pool_index)
        best = sorted(range(len(candidates)), key=lambda i: -candidates[i][1])[:k]
        beams = [candidates[i] for i in best]
    kept = sorted(sorted(range(len(pool_scores)), key=lambda i: -pool_scores[i])[:total])
    node_of = {p: j + 1 for j, p in enumerate(kept)}
    return ([root] + [int(pool_tokens[i]) for i in kept],
            [0] + [0 if pool_parents[i] < 0 else node_of[pool_parents[i]] for i in kept])


def two_catch_ups(head, target, features, pairs, lengths):
    """Draft cache filled by a catch-up over pairs 0..n-3 and one over the last two (padded to
    4 pairs): the prediction after pair n - 1 [B, D] and the cache."""
    batch = pairs.shape[0]
    cache = KVCache.zeros(head.arch, 1, batch, SLOTS, jnp.float32)
    _, cache = catch_up(head, target, cache, features, pairs, lengths - 2, jnp.zeros(batch, jnp.int32))
    start = lengths - 2
    tail = jnp.minimum(start[:, None] + jnp.arange(4), pairs.shape[1] - 1)
    rows = jnp.arange(batch)[:, None]
    return catch_up(head, target, cache, features[rows, tail], pairs[rows, tail], jnp.full(batch, 2), start)


@functools.partial(jax.jit, static_argnames=("target_graphdef", "head_graphdef", "k", "depth", "total"))
def two_catch_ups_then_tree(target_graphdef, target_params, head_graphdef, head_params, features, pairs, lengths,
                            roots, k, depth, total):
    """:func:`two_catch_ups`, then an EAGLE-2 tree."""
    target, head = nnx.merge(target_graphdef, target_params), nnx.merge(head_graphdef, head_params)
    hidden, cache = two_catch_ups(head, target, features, pairs, lengths)
    tree, _ = draft_tree(head, target, cache, hidden, roots, lengths, k, depth, total)
    return tree


@functools.partial(jax.jit, static_argnames=("target_graphdef", "head_graphdef", "gamma", "min_confidence"))
def two_catch_ups_then_chain(target_graphdef, target_params, head_graphdef, head_params, features, pairs, lengths,
                             gamma, min_confidence, active=None):
    """:func:`two_catch_ups`, then a greedy chain (every row active by default); also returns the cache the
    chain started from."""
    target, head = nnx.merge(target_graphdef, target_params), nnx.merge(head_graphdef, head_params)
    hidden, cache = two_catch_ups(head, target, features, pairs, lengths)
    active = jnp.ones(lengths.shape, bool) if active is None else active
    chain = draft_chain(head, target, cache, hidden, lengths, active, jax.random.key(0), gamma, SamplingSettings(),
                        min_confidence=min_confidence)
    return chain, cache


@pytest.fixture(scope="module")
def sharp_head():
    """A head whose attention is sharp (q, k scaled up) and weighs in its output (v, o scaled up), so its
    drafts depend on the RoPE positions the beams are run at, not only on the tokens."""
    head = random_module(lambda: create_eagle_head(ARCH, 1), seed=4)
    attention = head.first_layer.self_attn
    for weight, scale in ((attention.q_proj, 6.0), (attention.k_proj, 6.0), (attention.v_proj, 3.0),
                          (attention.o_proj, 3.0)):
        weight[...] = weight[...] * scale
    return nnx.split(head)


@pytest.mark.parametrize("head_name", ["head", "sharp_head"])
def test_draft_tree_matches_a_cache_free_eagle2_reference(target, head_name, request):
    """Two rows at different committed lengths n."""
    head = request.getfixturevalue(head_name)
    k, depth, total = 3, 2, 8
    rng = np.random.default_rng(1)
    lengths = np.asarray([6, 4], np.int32)
    seqs = rng.integers(0, ARCH.vocab_size, (2, 7)).astype(np.int32)  # x_0..x_n (x_n = root)
    roots = seqs[np.arange(2), lengths]
    features = target_forward(*target, jnp.asarray(seqs[:, :6]), jnp.broadcast_to(jnp.arange(6), (2, 6)),
                              causal_mask(2, 6), KVCache.zeros(ARCH, ARCH.num_layers, 2, 6, jnp.float32),
                              jnp.zeros(2, jnp.int32)).hidden
    pairs = jnp.asarray(seqs[:, 1:7])  # pair t = (f_t, x_{t+1})
    tree = two_catch_ups_then_tree(*target, *head, features, pairs, jnp.asarray(lengths), jnp.asarray(roots),
                                   k=k, depth=depth, total=total)
    for b in range(2):
        n = int(lengths[b])
        tokens, parents = reference_eagle2_tree(target, head, features[b], seqs[b, 1:n + 1], int(roots[b]), k, depth,
                                                total)
        assert tree.tokens[b].tolist() == tokens
        assert tree.parents[b].tolist() == parents


def test_draft_chain_proposes_while_the_chain_is_confident(target, head):
    """Greedy chains of two rows against the cache-free head: the tokens, and the count of leading
    drafts whose chain probability (product of the top softmax probabilities) reaches the
    threshold; thresholds between the rows' products cut them at different depths. With no row
    confident the head never runs past the first draft, leaving the cache as it was."""
    gamma = 3
    rng = np.random.default_rng(2)
    lengths = np.asarray([6, 4], np.int32)
    seqs = rng.integers(0, ARCH.vocab_size, (2, 7)).astype(np.int32)
    features = target_forward(*target, jnp.asarray(seqs[:, :6]), jnp.broadcast_to(jnp.arange(6), (2, 6)),
                              causal_mask(2, 6), KVCache.zeros(ARCH, ARCH.num_layers, 2, 6, jnp.float32),
                              jnp.zeros(2, jnp.int32)).hidden
    pairs = jnp.asarray(seqs[:, 1:7])
    chains, products = [], []
    for b in range(2):  # the reference: draft j is the argmax after the path of drafts 1..j-1
        n = int(lengths[b])
        tokens, path_hidden, probs = list(seqs[b, 1:n + 1]), [], []
        for _ in range(gamma):
            width = 16
            feats = jnp.pad(jnp.concatenate([features[b, :n]] + [h[None] for h in path_hidden]),
                            ((0, width - n - len(path_hidden)), (0, 0)))
            toks = np.zeros(width, np.int32)
            toks[:len(tokens)] = tokens
            hidden, logp = draft_log_probs(*target, *head, feats[None], jnp.asarray(toks)[None], len(tokens))
            tokens.append(int(np.argmax(logp)))
            probs.append(float(np.exp(np.max(logp))))
            path_hidden.append(hidden)
        chains.append(tokens[n:])
        products.append(np.cumprod(probs))
    thresholds = sorted({0.0, *(float(np.sqrt(a * b)) for a, b in zip(products[0][:-1], products[0][1:]))})
    for threshold in thresholds:
        chain, _ = two_catch_ups_then_chain(*target, *head, features, pairs, jnp.asarray(lengths), gamma=gamma,
                                            min_confidence=threshold)
        want = [int(np.sum(np.cumprod(p >= threshold))) for p in products]
        assert chain.proposed.tolist() == want, threshold
        for b in range(2):
            assert chain.tokens[b, :want[b]].tolist() == chains[b][:want[b]]
    assert len({tuple(int(np.sum(p >= t)) for p in products) for t in thresholds}) >= 3
    chain, start_cache = two_catch_ups_then_chain(*target, *head, features, pairs, jnp.asarray(lengths), gamma=gamma,
                                                  min_confidence=0.99)
    assert chain.proposed.tolist() == [0, 0]
    np.testing.assert_array_equal(chain.cache.k, start_cache.k)
    chain, _ = two_catch_ups_then_chain(*target, *head, features, pairs, jnp.asarray(lengths), gamma=gamma,
                                        min_confidence=0.0)
    assert not np.array_equal(chain.cache.k, start_cache.k)
    # A finished row proposes nothing, so it never keeps the head drafting for the others.
    chain, _ = two_catch_ups_then_chain(*target, *head, features, pairs, jnp.asarray(lengths), gamma=gamma,
                                        min_confidence=1e-9, active=jnp.asarray([True, False]))
    assert chain.proposed.tolist() == [gamma, 0]
    chain, _ = two_catch_ups_then_chain(*target, *head, features, pairs, jnp.asarray(lengths), gamma=gamma,
                                        min_confidence=1e-9, active=jnp.asarray([False, False]))
    assert chain.proposed.tolist() == [0, 0]
    np.testing.assert_array_equal(chain.cache.k, start_cache.k)


# --- verifiers -------------------------------------------------------------------------------

def one_hot_logits(choices, scale=10.0):
    """[B, T] preferred tokens -> [B, T, V] logits with that token far ahead."""
    return jnp.asarray(scale * np.eye(ARCH.vocab_size, dtype=np.float32)[np.asarray(choices)])


def worked_tree(tokens):
    parents = jnp.asarray([[0] + WORKED_PARENTS] * len(tokens))
    return jit_tree_from_parents(jnp.asarray(tokens), parents, max_depth=3)


def test_verify_greedy_chain():
    drafts = jnp.asarray([[3, 4, 5], [3, 4, 5], [1, 1, 1]])
    logits = one_hot_logits([[3, 4, 5, 9], [3, 7, 5, 9], [2, 1, 1, 9]])
    verdict = jax.jit(verify_greedy_chain)(drafts, logits)
    assert verdict.accepted.tolist() == [3, 1, 0]
    assert verdict.bonus.tolist() == [9, 7, 2]
    assert verdict.path.tolist() == [[0, 1, 2, 3], [0, 1, -1, -1], [0, -1, -1, -1]]


def test_verify_chains_stop_after_the_proposed_drafts():
    """Every draft matches the target, but rows proposed 3, 1 and 0 of them: greedy and sampled
    verification (the draft a point mass on the target's own choice) accept exactly those, and
    the bonus is the target's token after the last proposed one."""
    drafts = jnp.asarray([[3, 4, 5]] * 3)
    logits = one_hot_logits([[3, 4, 5, 9]] * 3, scale=40.0)
    proposed = jnp.asarray([3, 1, 0])
    greedy = jax.jit(verify_greedy_chain)(drafts, logits, proposed)
    sampled = jax.jit(verify_sampling_chain, static_argnames=("sampling",))(
        jax.random.key(0), drafts, jax.nn.one_hot(drafts, ARCH.vocab_size), logits, SamplingSettings(temperature=1.0),
        proposed)
    for verdict in (greedy, sampled):
        assert verdict.accepted.tolist() == [3, 1, 0]
        assert verdict.bonus.tolist() == [9, 4, 3]


def test_verify_greedy_tree_follows_the_target_through_a_later_branch():
    tokens = [[9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 2  # node j (j >= 1) holds token j
    # Row 0: root -> 2 (node 2), node 2 -> 7 (node 7), node 7 -> 11 (bonus). Row 1: nothing accepted.
    choices = np.zeros((2, 11), np.int32)
    choices[0, [0, 2, 7]] = [2, 7, 11]
    choices[1, 0] = 12
    verdict = jax.jit(verify_greedy_tree)(worked_tree(tokens), one_hot_logits(choices))
    assert verdict.accepted.tolist() == [2, 0]
    assert verdict.path.tolist() == [[0, 2, 7, -1], [0, -1, -1, -1]]
    assert verdict.bonus.tolist() == [11, 12]


def test_verify_greedy_tree_accepts_no_node_below_a_rejected_ancestor():
    """Node 10 (depth 3) and its parent 4 both equal their parent's argmax, but node 4's parent,
    node 1, is not the root's choice: the accepted path is root -> node 2, whatever lies below node 1."""
    tokens = [[9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    choices = np.zeros((1, 11), np.int32)
    choices[0, [0, 1, 4, 2]] = [2, 4, 10, 5]  # node 2's choice (5) is none of its children's tokens
    verdict = jax.jit(verify_greedy_tree)(worked_tree(tokens), one_hot_logits(choices))
    assert verdict.accepted.tolist() == [1]
    assert verdict.path.tolist() == [[0, 2, -1, -1]]
    assert verdict.bonus.tolist() == [5]


def test_verify_sampling_tree_with_point_masses_is_deterministic():
    """A point-mass target accepts exactly its token: earlier siblings (p = 0) are rejected and
    the later one, holding all the remaining mass, accepted; the bonus follows the target."""
    tokens = [[9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 4
    choices = np.zeros((4, 11), np.int32)
    choices[:, [0, 3, 9]] = [3, 9, 12]  # root -> node 3, node 3 -> node 9, node 9 -> 12
    verify = jax.jit(verify_sampling_tree, static_argnames=("sampling",))
    verdict = verify(jax.random.key(0), worked_tree(tokens), one_hot_logits(choices, 1e4),
                     sampling=SamplingSettings(temperature=1.0))
    assert verdict.accepted.tolist() == [2] * 4
    assert verdict.path.tolist() == [[0, 3, 9, -1]] * 4
    assert verdict.bonus.tolist() == [12] * 4


def test_verify_sampling_chain_accepts_everything_when_draft_equals_target():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 4, ARCH.vocab_size)).astype(np.float32)
    q = np.exp(logits[:, :3]) / np.exp(logits[:, :3]).sum(-1, keepdims=True)
    drafts = np.asarray([[rng.choice(ARCH.vocab_size, p=q[b, j] / q[b, j].sum()) for j in range(3)]
                         for b in range(64)], np.int32)
    verify = jax.jit(verify_sampling_chain, static_argnames=("sampling",))
    verdict = verify(jax.random.key(0), jnp.asarray(drafts), jnp.asarray(q), jnp.asarray(logits),
                     sampling=SamplingSettings(temperature=1.0))
    assert verdict.accepted.tolist() == [3] * 64


# --- committing ------------------------------------------------------------------------------

def test_append_tokens_cuts_after_eos_and_at_max_tokens():
    tokens = jnp.zeros((4, 6), jnp.int32)
    lengths = jnp.asarray([1, 1, 4, 1])
    new = jnp.asarray([[5, 2, 6], [5, 6, 7], [5, 6, 7], [2, 2, 2]])
    append = jax.jit(append_tokens, static_argnames=("eos_ids",))
    out, lengths, hit = append(tokens, lengths, new, jnp.asarray([3, 2, 3, 3]), jnp.asarray([True, True, True, False]),
                               eos_ids=(2,))
    assert lengths.tolist() == [3, 3, 6, 1]
    assert hit.tolist() == [True, False, False, False]
    assert out.tolist() == [[0, 5, 2, 0, 0, 0], [0, 5, 6, 0, 0, 0], [0, 0, 0, 0, 5, 6], [0] * 6]


def test_emitted_tokens():
    tree = worked_tree([[9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 2)
    verdict = Verdict(jnp.asarray([2, 0]), jnp.asarray([[0, 2, 7, -1], [0, -1, -1, -1]]), jnp.asarray([11, 12]))
    emitted = jax.jit(emitted_tokens, static_argnames=("pad_id",))(tree.tokens, verdict, pad_id=0)
    assert emitted.tolist() == [[2, 7, 11, 0], [12, 0, 0, 0]]


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_compacted_cache_equals_autoregressive_cache(target, shape):
    """Rows with different committed lengths; the tree rows accept paths off the first branch."""
    rng = np.random.default_rng(2)
    lengths = jnp.asarray([5, 3])
    prompts = jnp.asarray(rng.integers(0, ARCH.vocab_size, (2, 5)), jnp.int32)
    zeros = jnp.zeros(2, jnp.int32)
    empty = KVCache.zeros(ARCH, ARCH.num_layers, 2, SLOTS, jnp.float32)
    prefilled = target_forward(*target, prompts, jnp.broadcast_to(jnp.arange(5), (2, 5)), causal_mask(2, 5), empty,
                               zeros)
    if shape == "chain":
        tree = jit_chain_tree(jnp.asarray([4, 7]), jnp.asarray(rng.integers(0, ARCH.vocab_size, (2, 3)), jnp.int32))
        last = jnp.asarray([2, 3])
    else:
        tree = worked_tree(rng.integers(0, ARCH.vocab_size, (2, 11)))
        last = jnp.asarray([7, 10])  # paths 0-2-7 and 0-1-4-10
    out = target_forward(*target, tree.tokens, lengths[:, None] + tree.depths, tree.ancestors, prefilled.cache,
                         lengths)
    accepted = tree.depths[jnp.arange(2), last]
    path = tree.paths[jnp.arange(2), last]
    compacted = jax.jit(compact_cache)(out.cache, lengths, path, accepted)
    # Reference: each row's committed sequence (prompt, root, accepted drafts) run causally.
    width = 9
    sequences = np.zeros((2, width), np.int32)
    for b in range(2):
        n, a = int(lengths[b]), int(accepted[b])
        sequences[b, :n + a + 1] = list(np.asarray(prompts[b, :n])) + list(np.asarray(tree.tokens[b, path[b, :a + 1]]))
    reference = target_forward(*target, jnp.asarray(sequences), jnp.broadcast_to(jnp.arange(width), (2, width)),
                               causal_mask(2, width), empty, zeros)
    for b in range(2):
        n, a = int(lengths[b]), int(accepted[b])
        committed = slice(0, n + a + 1)
        for name in ("k", "v"):
            np.testing.assert_allclose(getattr(compacted, name)[:, b, :, committed],
                                       getattr(reference.cache, name)[:, b, :, committed], atol=TOL, rtol=TOL)
        # The features the draft catches up on are the target's true ones.
        np.testing.assert_allclose(out.hidden[b, path[b, :a + 1]], reference.hidden[b, n:n + a + 1], atol=TOL,
                                   rtol=TOL)
        # Slots past the accepted path are left alone.
        np.testing.assert_array_equal(compacted.k[:, b, :, n + a + 1:], out.cache.k[:, b, :, n + a + 1:])
