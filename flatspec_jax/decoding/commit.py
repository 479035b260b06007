"""Committing a verified round: compacting the target KV cache and appending the emitted tokens.

Shape legend: B batch, A the most drafts one round accepts, M max new tokens, S cache slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flatspec_jax.decoding.autoregressive import is_eos
from flatspec_jax.decoding.verify import Verdict
from flatspec_jax.models.llama import KVCache

Array = jax.Array


def compact_cache(cache: KVCache, cache_index: Array, path: Array, accepted: Array) -> KVCache:
    """Moves the accepted tree path's keys/values to the slots right after the committed prefix.

    The verification forward wrote tree node j of row b at slot ``cache_index[b] + j``; the
    committed sequence needs depth d at slot ``cache_index[b] + d``. Each entry was computed at
    its node's true position and attended exactly its ancestors, so moving it is all it takes.
    A node's index is never below its depth, so gathering everything before writing is safe.

    Args:
      cache: the target's cache after the verification forward (either layout).
      cache_index: [B] slot of the root (the committed length before this round).
      path: [B, A + 1] node indices of the root and the accepted drafts by depth (-1 past).
      accepted: [B] accepted drafts a: slots cache_index .. cache_index + a are rewritten,
        the rest is left as it is.
    """
    batch, width = path.shape
    depth = jnp.arange(width, dtype=jnp.int32)[None, :]
    source = cache_index[:, None] + jnp.maximum(path, 0)
    # Slots past the accepted path get an out-of-range target, which the scatter drops.
    target = jnp.where(depth <= accepted[:, None], cache_index[:, None] + depth, cache.length)
    rows = jnp.arange(batch)[:, None]

    def move(x: Array) -> Array:
        return x.at[:, rows, :, target].set(x[:, rows, :, source], mode="drop")

    return cache.map(move)


def emitted_tokens(tree_tokens: Array, verdict: Verdict, pad_id: int) -> Array:
    """[B, A + 1] tokens a round emits: the accepted drafts, then the bonus, then padding.

    Args:
      tree_tokens: [B, T] tokens of the verified tree's nodes (the chain's: root, drafts).
    """
    rows = jnp.arange(tree_tokens.shape[0])[:, None]
    on_path = tree_tokens[rows, jnp.maximum(verdict.path, 0)]
    drafts = jnp.concatenate([on_path[:, 1:], jnp.full_like(on_path[:, :1], pad_id)], axis=1)
    index = jnp.arange(on_path.shape[1])[None, :]
    accepted = verdict.accepted[:, None]
    return jnp.where(index < accepted, drafts, jnp.where(index == accepted, verdict.bonus[:, None], pad_id))


def append_tokens(tokens: Array, lengths: Array, new: Array, count: Array, active: Array,
                  eos_ids: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """Appends each active row's first ``count`` new tokens, cut after the first EOS and at M.

    Args:
      tokens: [B, M] output so far; lengths: [B] tokens in it.
      new: [B, A + 1] candidates to append; count: [B] how many of them are real.
      active: [B] rows still generating (the others append nothing).

    Returns:
      tokens, lengths, and [B] whether an EOS was appended.
    """
    batch, max_tokens = tokens.shape
    index = jnp.arange(new.shape[1])[None, :]
    if eos_ids:
        eos = is_eos(new, eos_ids) & (index < count[:, None])
        has_eos, first_eos = jnp.any(eos, axis=-1), jnp.argmax(eos, axis=-1)
        count = jnp.where(has_eos, first_eos + 1, count)
    else:  # Nothing to cut (and no all-False [B, A + 1] constant for XLA to fold, slowly, at large B).
        has_eos, first_eos = jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32)
    count = jnp.where(active, jnp.minimum(count, max_tokens - lengths), 0)
    slots = jnp.where(index < count[:, None], lengths[:, None] + index, max_tokens)
    tokens = tokens.at[jnp.arange(batch)[:, None], slots].set(new, mode="drop")
    return tokens, lengths + count, has_eos & (first_eos < count)
