"""Attention masks for the decoder: packed causal, cached causal and tree-shaped.

Shape legend: B batch, T new tokens, S key slots.
A mask is boolean ``[B, T, S]``: True where query t may attend key s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def segment_causal_mask(segment_ids: Array) -> Array:
    """[B, T] segment ids (0 = padding) -> [B, T, T] causal mask inside each segment.

    Packed rows hold several samples; a token sees only earlier tokens of its own sample.
    Padding queries see nothing (their outputs are ignored by every caller).
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] > 0)


def causal_mask(batch: int, length: int) -> Array:
    """[B, T, T] plain causal mask."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))


def cached_mask(cache_index: Array, new_mask: Array, num_slots: int) -> Array:
    """Mask of T new tokens written at slots ``cache_index[b] ...`` over a cache of S slots.

    Args:
      cache_index: [B] first slot of the new tokens; slots before it hold the committed prefix.
      new_mask: [B, T, T] how the new tokens see each other (causal, or a draft tree's ancestry).
      num_slots: S, the cache length.

    Returns:
      [B, T, S]: every committed slot, plus the new slots that ``new_mask`` allows.
    """
    t = new_mask.shape[-1]
    relative = jnp.arange(num_slots)[None, None, :] - cache_index[:, None, None]  # [B, 1, S]
    committed = relative < 0
    in_new = (relative >= 0) & (relative < t)
    index = jnp.broadcast_to(jnp.clip(relative, 0, t - 1), (new_mask.shape[0], t, num_slots))
    return committed | (in_new & jnp.take_along_axis(new_mask, index, axis=-1))


def beside_cache_mask(cache_index: Array, new_mask: Array, num_slots: int) -> Array:
    """Mask of T new tokens over a cache of S slots that they only read (``write_cache=False``).

    Args:
      cache_index: [B] committed slots: slots before it hold the committed prefix.
      new_mask: [B, T, T] how the new tokens see each other.
      num_slots: S, the cache length.

    Returns:
      [B, T, S + T]: every committed slot, then the new tokens that ``new_mask`` allows.
    """
    batch, t = new_mask.shape[:2]
    committed = jnp.arange(num_slots)[None, None, :] < cache_index[:, None, None]
    return jnp.concatenate([jnp.broadcast_to(committed, (batch, t, num_slots)), new_mask], axis=-1)
