"""The EAGLE-1/EAGLE-2 draft head (SafeAILab/EAGLE ``cnets.py`` layout) in Flax NNX.

At position t the head reads the target's last hidden state f_t (after the target's final
norm: the LM head's input) and the embedding of the next token x_{t+1}:

    h = fc(concat(embed(x_{t+1}), f_t))            2D -> D, with bias
    h = decoder layers(h)                          layer 0 has no input norm; no final norm
    f_{t+1} ~= h,  draft logits = target LM head(h)

It owns only ``fc`` and its decoder layers. The token embedding and the LM head are the
target's, frozen, and passed in at call time (never copied into the head), so training
memory holds them once.

Shape legend: B batch, T tokens, S key slots, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flatspec_jax.models.llama import (DecoderLayer, DecoderStack, KVCache, _param, dense, rope_inverse_frequencies,
                                      rope_tables)
from flatspec_jax.weights.arch import ArchSpec

Array = jax.Array


def draft_arch(target: ArchSpec, num_layers: int) -> ArchSpec:
    """The head's architecture: the target's layer shape (incl. Qwen2 q/k/v biases), ``num_layers`` deep,
    with full causal attention (EAGLE heads use no sliding window)."""
    return dataclasses.replace(target, num_layers=num_layers, sliding_window=None)


class EagleHead(nnx.Module):
    """EAGLE draft head: fc over (embedding, feature) + ``arch.num_layers`` decoder layers."""

    def __init__(self, arch: ArchSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, fc_bias: bool = True):
        d = arch.hidden_size
        self.arch = arch
        self.dtype = dtype
        self.fc = _param(rngs, (2 * d, d), ("fused", "embed"), param_dtype, 2 * d)
        self.fc_bias = (nnx.Param(jax.random.uniform(rngs.params(), (d,), jnp.float32, -(2 * d) ** -0.5,
                                                     (2 * d) ** -0.5).astype(param_dtype), logical_axes=("embed",))
                        if fc_bias else None)
        # The reference drops the first layer's input norm: its input is fc's fused output.
        self.first_layer = DecoderLayer(arch, rngs=rngs, dtype=dtype, param_dtype=param_dtype, input_norm=False)
        self.more_layers = (DecoderStack(arch, arch.num_layers - 1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            if arch.num_layers > 1 else None)

    def __call__(self, features: Array, token_embeddings: Array, positions: Array, mask: Array,
                 cache: KVCache | None = None, cache_index: Array | None = None, *, write: bool = True,
                 diagonal: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """Predicts next features.

        Args:
          features: [B, T, D] target features f_t (post final norm), noised in training.
          token_embeddings: [B, T, D] target embeddings of x_{t+1}.
          positions: [B, T] RoPE positions (those of f_t).
          mask: [B, T, S] attention mask ([B, T, S + T] with ``write=False``, [B, T, S] with ``diagonal``).
          cache: the head's own KV cache ([num_layers, B, K, S, H] tensors) or None.
          cache_index: [B] first slot of the new tokens (with a cache that is written).
          write: False only reads the cache (see :class:`~flatspec_jax.models.llama.Llama`).
          diagonal: with ``write=False``: keys and values of J earlier unrolled steps
            ([num_layers, J, B, K, T, H]), attended on the diagonal (:meth:`unrolled`).

        Returns:
          [B, T, D] predicted features (feed them to the target's LM head for logits) and the
          cache, or with ``write=False`` the new tokens' keys and values ([num_layers, B, K, T, H]).
        """
        fused = jnp.concatenate([token_embeddings.astype(self.dtype), features.astype(self.dtype)], axis=-1)
        h = dense("btf,fd->btd", fused, self.fc[...], self.dtype)
        if self.fc_bias is not None:
            h = h + self.fc_bias[...]
        h = h.astype(self.dtype)
        inv_freq = rope_inverse_frequencies(self.arch.head_dim, self.arch.rope_theta, self.arch.rope_scaling)
        cos, sin = rope_tables(positions, inv_freq)
        read_only = cache is not None and not write
        kv = None if cache is None else (cache.k, cache.v)
        earlier = None if diagonal is None else (diagonal.k, diagonal.v)
        h, kv = self.first_layer(h, cos, sin, mask, kv, cache_index, 0, write, earlier)
        # Written: the whole updated cache; read only: the new tokens' [B, K, T, H] keys and values.
        first = None if kv is None else (KVCache(k=kv[0][None], v=kv[1][None]) if read_only
                                         else KVCache(k=kv[0], v=kv[1]))
        if self.more_layers is None:
            return h, first
        h, more = self.more_layers(h, cos, sin, mask, cache if read_only else first, cache_index, first_layer=1,
                                   write=write, diagonal=diagonal)
        if read_only:
            more = KVCache(k=jnp.concatenate([first.k, more.k]), v=jnp.concatenate([first.v, more.v]))
        return h, more

    def unrolled(self, features: Array, token_embeddings: Sequence[Array], positions: Array, mask: Array
                 ) -> list[Array]:
        """Training-time test (EAGLE-3, HASS): the head's first ``len(token_embeddings)`` drafts from
        every position at once, each later one fed the head's own previous prediction.

        Step 1 is :meth:`__call__` on (``features``, ``token_embeddings[0]``). Step k > 1 reads
        step k - 1's predicted features with ``token_embeddings[k - 1]`` at positions + k - 1;
        its query t attends step 1's keys under ``mask`` (the true-feature context, as the draft
        cache holds it when decoding) and entry t of every later step, so index t of step k is
        the k-th draft of a decoding round whose context ends at t.

        Args:
          features: [B, T, D] step 1's input features f_t.
          token_embeddings: K arrays [B, T, D]: embeddings of x_{t+1}, ..., x_{t+K}.
          positions: [B, T] step 1's RoPE positions.
          mask: [B, T, T] causal mask of step 1 (packed segments).

        Returns:
          K arrays [B, T, D]: index t of the k-th predicts f_{t+k}.
        """
        b, t, _ = features.shape
        layers, kv_heads, head_dim = self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim
        empty = jnp.zeros((layers, b, kv_heads, 0, head_dim), self.dtype)
        predicted, context = self(features, token_embeddings[0], positions, mask, KVCache(k=empty, v=empty),
                                  write=False)
        predictions = [predicted]
        no_steps = jnp.zeros((layers, 0, b, kv_heads, t, head_dim), self.dtype)
        earlier = KVCache(k=no_steps, v=no_steps)
        for step, embeddings in enumerate(token_embeddings[1:], 1):
            predicted, new = self(predictions[-1], embeddings, positions + step, mask, context, write=False,
                                  diagonal=earlier)
            predictions.append(predicted)
            earlier = KVCache(k=jnp.concatenate([earlier.k, new.k[:, None]], axis=1),
                              v=jnp.concatenate([earlier.v, new.v[:, None]], axis=1))
        return predictions


def create_eagle_head(target: ArchSpec, num_layers: int = 1, *, seed: int = 0, dtype: str = "float32",
                      param_dtype: str = "float32", fc_bias: bool = True) -> EagleHead:
    return EagleHead(draft_arch(target, num_layers), rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype),
                     param_dtype=jnp.dtype(param_dtype), fc_bias=fc_bias)
