"""Running the EAGLE head: catching up on committed tokens, drafting a chain or an EAGLE-2 tree.

Shape legend: B batch, C pairs per catch-up, D model dim, V vocab, k ``top_k``, L ``depth``,
N draft nodes, S_d draft cache slots.

The head works on pairs: draft position t reads (target feature f_t, embedding of x_{t+1}) and
predicts f_{t+1}; the target's LM head on that prediction is the draft distribution of x_{t+2}.
Draft cache slot t holds pair t. Committed pairs always use the target's true features; while
drafting, the head feeds back its own predictions. Draft entries written past the committed
pairs are scratch: the next catch-up overwrites them. With a :class:`DraftVocab` the draft
ranks and proposes only that vocabulary's N tokens (V otherwise).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flatspec_jax.decoding.draft_vocab import DraftVocab, draft_logits, full_vocab_probs, token_ids, vocab_size
from flatspec_jax.decoding.sampling import SamplingSettings, sample, warped_log_probs
from flatspec_jax.decoding.tree import DraftTree, build_tree
from flatspec_jax.models.eagle import EagleHead
from flatspec_jax.models.llama import KVCache, Llama
from flatspec_jax.models.masks import cached_mask, causal_mask

Array = jax.Array


def catch_up(head: EagleHead, target: Llama, cache: KVCache, features: Array, next_tokens: Array, count: Array,
             start: Array) -> tuple[Array, KVCache]:
    """Writes newly committed pairs into the draft cache and returns the prediction after the last.

    Args:
      features: [B, C] + [D] target features f_t of positions start .. start + C - 1.
      next_tokens: [B, C] the token after each of them, x_{t+1}.
      count: [B] how many pairs of each row are real (1..C); the rest is padding, written to
        slots past the row's committed pairs, where nothing reads it before it is overwritten.
      start: [B] position (= draft slot) of each row's first pair.

    Returns:
      [B, D] the head's prediction of the feature after the last real pair, and the cache.
    """
    batch, length = next_tokens.shape
    positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    mask = cached_mask(start, causal_mask(batch, length), cache.length)
    out, cache = head(features, target.embed(next_tokens), positions, mask, cache, start)
    last = jnp.take_along_axis(out, (count - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


class ChainDrafts(NamedTuple):
    """Result of :func:`draft_chain`.

    Attributes:
      tokens: [B, gamma] drafted tokens (those past a row's ``proposed`` are scratch).
      probs: [B, gamma, V] the (warped) distribution q each draft was drawn from, zero outside
        the draft vocabulary; None when greedy.
      proposed: [B] drafts proposed for verification: the leading ones whose confidence
        reaches ``min_confidence`` (gamma when it is 0).
      cache: the draft cache, its slots past the committed pairs holding scratch.
    """

    tokens: Array
    probs: Array | None
    proposed: Array
    cache: KVCache


def draft_chain(head: EagleHead, target: Llama, cache: KVCache, root_hidden: Array, committed: Array, active: Array,
                key: Array, gamma: int, sampling: SamplingSettings, vocab: DraftVocab | None = None,
                min_confidence: float = 0.0) -> ChainDrafts:
    """Drafts up to gamma tokens autoregressively after the root.

    Each draft is drawn from the warped draft distribution (argmax when greedy), the same
    warping the target is verified with, so the recorded q is the one the token came from.
    A row proposes draft j while its confidence, the draft's probability of the drafts before
    j times its top probability for draft j (softmax at temperature 1, no top-p, over the draft
    vocabulary; greedy: the probability of the chain up to j), is at least ``min_confidence``;
    drafting stops once no active row of the batch proposes (a finished row proposes nothing), so
    unsure rounds skip the remaining head steps. Whether draft j is proposed depends on the drafts
    before it and on j's distribution, never on the token drawn for j, so a proposed draft is
    distributed as its q and verification stays lossless (deciding on the drawn token's own
    probability would bias it).

    Args:
      root_hidden: [B, D] the head's prediction of the root's feature (from :func:`catch_up`).
      committed: [B] committed tokens n; the root sits at position n, draft j (1-based) at n + j.
      active: [B] bool, the rows still generating.
      min_confidence: in [0, 1); 0 keeps all gamma drafts.
    """
    batch = committed.shape[0]
    keys = jax.random.split(key, gamma)

    def propose(step_key: Array, hidden: Array) -> tuple[Array, Array | None, Array, Array]:
        """[B, D] -> token [B], its q [B, V] (None when greedy), and the softmax's top probability
        [B] and the token's [B]."""
        logits = draft_logits(target, hidden, vocab)
        log_softmax = jax.nn.log_softmax(logits, axis=-1)
        if sampling.greedy:
            index = sample(step_key, logits, sampling)
            probs = None
        else:
            log_q = warped_log_probs(logits, sampling)
            index = jax.random.categorical(step_key, log_q, axis=-1).astype(jnp.int32)
            probs = full_vocab_probs(jnp.exp(log_q), vocab, target.arch.vocab_size)
        chosen = jnp.take_along_axis(log_softmax, index[:, None], axis=-1)[:, 0]
        return token_ids(index, vocab), probs, jnp.exp(jnp.max(log_softmax, axis=-1)), jnp.exp(chosen)

    def keep(proposed: Array, count: Array, confidence: Array) -> Array:
        """Rows that proposed all ``count - 1`` earlier drafts propose draft ``count`` if confident."""
        return jnp.where((proposed == count - 1) & (confidence >= min_confidence), count, proposed)

    def store(drafts: Array, probs: Array | None, index: Array, token: Array, q: Array | None):
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, token[:, None], index, axis=1)
        if q is not None:
            probs = jax.lax.dynamic_update_slice_in_dim(probs, q[:, None], index, axis=1)
        return drafts, probs

    def more(carry) -> Array:
        count, *_, proposed = carry
        return (count < gamma) & jnp.any(proposed == count)

    def step(carry):
        count, hidden, token, cache, drafts, probs, chain_prob, proposed = carry
        # Pair (predicted feature at position n + count - 1, draft `count`) -> next feature.
        slot = committed + count - 1
        mask = cached_mask(slot, jnp.ones((batch, 1, 1), bool), cache.length)
        out, cache = head(hidden[:, None], target.embed(token[:, None]), slot[:, None], mask, cache, slot)
        hidden = out[:, 0]
        token, q, top, chosen = propose(keys[count], hidden)
        drafts, probs = store(drafts, probs, count, token, q)
        proposed = keep(proposed, count + 1, chain_prob * top)
        return count + 1, hidden, token, cache, drafts, probs, chain_prob * chosen, proposed

    first, first_q, top, chosen = propose(keys[0], root_hidden)
    drafts, probs = store(jnp.zeros((batch, gamma), jnp.int32),
                          None if first_q is None else jnp.zeros((batch, gamma, first_q.shape[-1]), first_q.dtype),
                          jnp.int32(0), first, first_q)
    proposed = jnp.where(active, keep(jnp.zeros((batch,), jnp.int32), jnp.int32(1), top), 0)
    carry = (jnp.int32(1), root_hidden, first, cache, drafts, probs, chosen, proposed)
    _, _, _, cache, drafts, probs, _, proposed = jax.lax.while_loop(more, step, carry)
    return ChainDrafts(drafts, probs, proposed, cache)


def draft_tree(head: EagleHead, target: Llama, cache: KVCache, root_hidden: Array, root: Array, committed: Array,
               top_k: int, depth: int, total_tokens: int,
               vocab: DraftVocab | None = None) -> tuple[DraftTree, KVCache]:
    """EAGLE-2 dynamic tree drafting (the reference's ``topK_genrate``) for every row at once.

    The root's children are the top-k tokens of the draft; then ``depth`` times the k best
    beams (by cumulative draft log-prob) run through the head and each proposes its top-k
    children. Every proposed child joins the candidate pool (k + depth k^2 candidates over
    depth + 1 levels); the ``total_tokens`` best of the pool form the tree. Drafting always
    ranks the raw draft log-softmax, whatever the sampling settings (drafts are deterministic
    top-k picks; verification accounts for that).

    Args:
      root_hidden: [B, D] the head's prediction of the root's feature (from :func:`catch_up`).
      root: [B] the root token; committed: [B] committed tokens n (the root's position).

    Returns:
      The tree (N = total_tokens draft nodes, up to depth + 1 levels) and the draft cache,
      whose slots n .. n + depth k - 1 now hold the beams (scratch).
    """
    batch = root.shape[0]
    if top_k > vocab_size(target, vocab):
        raise ValueError(f"top_k={top_k} exceeds the draft vocabulary ({vocab_size(target, vocab)} tokens)")
    k = top_k
    rows = jnp.arange(batch)[:, None]

    def ranked_children(hidden: Array) -> tuple[Array, Array]:  # [..., D] -> top-k log-probs and token ids
        scores, indices = jax.lax.top_k(jax.nn.log_softmax(draft_logits(target, hidden, vocab), axis=-1), k)
        return scores, token_ids(indices, vocab)

    root_scores, root_children = ranked_children(root_hidden)
    # Ancestry among the beams' draft-cache slots: level i's k beams sit at slots n + i k ...
    # (i from 0). One spare level of rows lets the last step write its (unused) beams.
    width = (depth + 1) * k
    level_eye = jnp.eye(k, width, dtype=bool)
    beam_ancestry = jnp.zeros((batch, width, width), bool).at[:, :k].set(level_eye)

    def step(carry, level):
        hidden, tokens, scores, pool_index, ancestry, cache = carry
        slot = committed + level * k
        # Committed pairs are all visible; among the beams, a beam sees its ancestors and itself.
        mask = jax.lax.dynamic_slice_in_dim(cached_mask(committed, ancestry, cache.length), level * k, k, axis=1)
        positions = jnp.broadcast_to((committed + level)[:, None], (batch, k))
        out, cache = head(hidden, target.embed(tokens), positions, mask, cache, slot)
        child_scores, children = ranked_children(out)  # [B, k, k]
        cumulative = (child_scores + scores[:, :, None]).reshape(batch, k * k)
        children = children.reshape(batch, k * k)
        parents = jnp.repeat(pool_index, k, axis=1)
        best_scores, best = jax.lax.top_k(cumulative, k)
        parent_beam = best // k
        beam_rows = jax.lax.dynamic_slice_in_dim(ancestry, level * k, k, axis=1)[rows, parent_beam]
        next_level = jnp.roll(level_eye, (level + 1) * k, axis=1)
        ancestry = jax.lax.dynamic_update_slice_in_dim(ancestry, beam_rows | next_level, (level + 1) * k, axis=1)
        carry = (out[rows, parent_beam], children[rows, best], best_scores, k + level * k * k + best, ancestry, cache)
        return carry, (cumulative, children, parents)

    init = (jnp.broadcast_to(root_hidden[:, None], (batch, k, root_hidden.shape[-1])), root_children, root_scores,
            jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k)), beam_ancestry, cache)
    (*_, cache), (scores, tokens, parents) = jax.lax.scan(step, init, jnp.arange(depth, dtype=jnp.int32))

    def pool(level_one: Array, deeper: Array) -> Array:  # [B, k] and [depth, B, k^2] -> [B, k + depth k^2]
        return jnp.concatenate([level_one, jnp.moveaxis(deeper, 0, 1).reshape(batch, -1)], axis=1)

    tree = build_tree(root, pool(root_scores, scores), pool(root_children, tokens),
                      pool(jnp.full((batch, k), -1, jnp.int32), parents), total_tokens, min(depth + 1, total_tokens))
    return tree, cache
