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

import jax
import jax.numpy as jnp
from flax import nnx

from flatspec_jax.models.llama import DecoderLayer, DecoderStack, KVCache, _param, rope_inverse_frequencies, rope_tables
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
                 cache: KVCache | None = None, cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
        """Predicts next features.

        Args:
          features: [B, T, D] target features f_t (post final norm), noised in training.
          token_embeddings: [B, T, D] target embeddings of x_{t+1}.
          positions: [B, T] RoPE positions (those of f_t).
          mask: [B, T, S] attention mask.
          cache: the head's own KV cache ([num_layers, B, K, S, H] tensors) or None.
          cache_index: [B] first slot of the new tokens (with a cache).

        Returns:
          [B, T, D] predicted features (feed them to the target's LM head for logits) and the cache.
        """
        fused = jnp.concatenate([token_embeddings.astype(self.dtype), features.astype(self.dtype)], axis=-1)
        h = fused @ self.fc[...].astype(self.dtype)
        if self.fc_bias is not None:
            h = h + self.fc_bias[...].astype(self.dtype)
        inv_freq = rope_inverse_frequencies(self.arch.head_dim, self.arch.rope_theta, self.arch.rope_scaling)
        cos, sin = rope_tables(positions, inv_freq)
        kv = None if cache is None else (cache.k, cache.v)
        h, kv = self.first_layer(h, cos, sin, mask, kv, cache_index, 0)
        cache = None if kv is None else KVCache(k=kv[0], v=kv[1])
        if self.more_layers is None:
            return h, cache
        return self.more_layers(h, cos, sin, mask, cache, cache_index, first_layer=1)


def create_eagle_head(target: ArchSpec, num_layers: int = 1, *, seed: int = 0, dtype: str = "float32",
                      param_dtype: str = "float32", fc_bias: bool = True) -> EagleHead:
    return EagleHead(draft_arch(target, num_layers), rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype),
                     param_dtype=jnp.dtype(param_dtype), fc_bias=fc_bias)
