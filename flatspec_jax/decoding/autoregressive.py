"""Jitted, KV-cached autoregressive generation: the baseline speculative decoding is measured against.

Shape legend: B batch rows, P padded prompt length, M max new tokens, S cache slots, V vocab.
The whole generation is one ``jax.lax.while_loop`` inside one ``jax.jit``; shapes are static,
so a new prompt of the same bucket length reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from flatspec_jax.decoding.sampling import SamplingSettings, sample
from flatspec_jax.models.llama import KVCache, Llama, ModelOutput
from flatspec_jax.models.masks import cached_mask, causal_mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Static settings of one generation program."""

    max_new_tokens: int
    cache_length: int
    eos_ids: tuple[int, ...]
    sampling: SamplingSettings = SamplingSettings()
    pad_id: int = 0


class Generation(NamedTuple):
    """tokens: [B, M] generated ids (EOS included, ``pad_id`` after); lengths: [B];
    target_calls: [B] target forward passes after the prefill while the row was generating
    (lengths - 1: the last token is never fed back)."""

    tokens: Array
    lengths: Array
    target_calls: Array


def is_eos(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def prefill(model: Llama, prompts: Array, prompt_lengths: Array, cache: KVCache) -> tuple[ModelOutput, Array]:
    """Runs the padded prompts [B, P] through the model, filling cache slots 0..P-1.

    Slots past a row's length hold padding; they stay invisible because later masks only
    expose slots below each row's ``cache_index``, and they are overwritten as the row grows.

    Returns:
      The model output (hidden states and cache; no logits) and ``last_logits`` [B, V] at each
      row's final prompt token: the LM head runs on those B positions only, not on all B x P.
    """
    batch, length = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    zeros = jnp.zeros((batch,), jnp.int32)
    mask = cached_mask(zeros, causal_mask(batch, length), cache.length)
    out = model(prompts, positions, mask, cache, zeros, return_logits=False)
    last_hidden = jnp.take_along_axis(out.hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    return out, model.logits(last_hidden)[:, 0]


@flax.struct.dataclass
class _LoopState:
    tokens: Array  # [B, M]
    lengths: Array  # [B]
    done: Array  # [B] bool
    last: Array  # [B] the token to feed next
    cache: KVCache
    cache_index: Array  # [B] slots holding committed tokens
    key: Array
    target_calls: Array  # [B]


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def generate(graphdef: nnx.GraphDef, params: nnx.State, prompts: Array, prompt_lengths: Array,
             key: Array, settings: GenerationSettings) -> Generation:
    """Generates up to ``settings.max_new_tokens`` per row, stopping a row at EOS or a full cache
    (the last token generated is the one whose key/value would need slot ``cache_length``).

    Args:
      graphdef, params: the target model split with ``nnx.split``.
      prompts: [B, P] right-padded prompt ids; prompt_lengths: [B] their true lengths.
      key: PRNG key (unused when greedy).
    """
    model = nnx.merge(graphdef, params)
    batch = prompts.shape[0]
    cache = model.empty_cache(batch, settings.cache_length)
    prefilled, last_logits = prefill(model, prompts, prompt_lengths, cache)
    key, first_key = jax.random.split(key)
    first = sample(first_key, last_logits, settings.sampling)
    rows = jnp.arange(batch)
    tokens = jnp.full((batch, settings.max_new_tokens), settings.pad_id, jnp.int32).at[:, 0].set(first)
    state = _LoopState(
        tokens=tokens, lengths=jnp.ones((batch,), jnp.int32),
        done=is_eos(first, settings.eos_ids) | (prompt_lengths >= settings.cache_length)
        | (settings.max_new_tokens <= 1),
        last=first, cache=prefilled.cache, cache_index=prompt_lengths.astype(jnp.int32), key=key,
        target_calls=jnp.zeros((batch,), jnp.int32))

    def cond(s: _LoopState) -> Array:
        return ~jnp.all(s.done)

    def step(s: _LoopState) -> _LoopState:
        key, step_key = jax.random.split(s.key)
        mask = cached_mask(s.cache_index, jnp.ones((batch, 1, 1), bool), settings.cache_length)
        out = model(s.last[:, None], s.cache_index[:, None], mask, s.cache, s.cache_index)
        new = jnp.where(s.done, settings.pad_id, sample(step_key, out.logits[:, 0], settings.sampling))
        tokens = s.tokens.at[rows, s.lengths].set(new, mode="drop")
        active = ~s.done
        lengths = s.lengths + active
        cache_index = s.cache_index + active
        done = (s.done | is_eos(new, settings.eos_ids) | (lengths >= settings.max_new_tokens)
                | (cache_index >= settings.cache_length))
        return _LoopState(tokens=tokens, lengths=lengths, done=done, last=new, cache=out.cache,
                          cache_index=cache_index, key=key, target_calls=s.target_calls + active)

    state = jax.lax.while_loop(cond, step, state)
    return Generation(state.tokens, state.lengths, state.target_calls)
