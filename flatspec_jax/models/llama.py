"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2 (tied embeddings).

Shape legend:
  B batch, T new tokens, S key positions (cache slots, or T without a cache), D model dim,
  N query heads, K key/value heads, G = N // K query heads per KV head, H head dim,
  F MLP dim, V vocabulary, L layers.

Layers are stacked along a leading ``layers`` axis and run under ``jax.lax.scan``, so
compile time does not grow with depth. For decoding, :func:`split_layers` gives each layer its
own buffers (and the KV cache one per layer) and runs them one after another: inside the scan
XLA copies every layer's weights out of the stack at every step, which a decoding step, bound
by reading the weights once, cannot afford (MaxText's ``scan_layers=False`` for inference).
Every parameter carries ``logical_axes`` metadata that :mod:`flatspec_jax.sharding` maps to a
device mesh. Attention takes an explicit boolean mask ``[B, T, S]``: causal, packed
(segment-wise causal) and tree-shaped masks are all built by :mod:`flatspec_jax.models.masks`,
so one forward serves scoring, training, decoding and tree verification.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flatspec_jax.weights.arch import ArchSpec, RopeScaling

Array = jax.Array


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: jnp.dtype,
           fan_in: int) -> nnx.Param:
    """A weight drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's nn.Linear default.

    Target weights are always overwritten on load; the EAGLE head trains from this
    initialisation, so it matches the reference's starting point.
    """
    bound = fan_in ** -0.5
    value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def dense(subscripts: str, x: Array, weight: Array, dtype: jnp.dtype) -> Array:
    """``einsum(subscripts, x, weight)`` with both operands in ``dtype``, accumulated and returned
    in float32. A bfloat16 product that also returns bfloat16 takes XLA:CPU's generic loop (at
    most f32 speed there), while bfloat16 in / float32 out uses the CPU's bfloat16 dot
    instructions (~2x f32 on AVX512-BF16); accelerators accumulate in float32 either way."""
    return jnp.einsum(subscripts, x.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)


# Token counts for which `lm_head_logits` multiplies and reduces instead of calling a dot on CPU.
_CPU_FEW_TOKENS = range(2, 17)


def lm_head_logits(hidden: Array, weight: Array) -> Array:
    """[..., D] final hidden states and a [V, D] LM head -> [..., V] float32 logits (in the hidden dtype's math).

    On CPU, for 2-16 tokens (a verify forward's, a draft tree level's), the product is written as
    a multiply over [V, N, D] reduced over D: XLA fuses it into one pass that reads each weight
    row once for all N tokens, where its small-N matrix product streams the head at about half
    the matrix-vector rate (SmolLM2's 49,152 x 576 head at N = 3: 2.9-3.4 ms against 4.6 ms, the
    same as N = 1). For one token, or many, the dot is faster (at N = 1 the reduction ~100x slower).
    Only where the head is already in the hidden dtype: XLA:CPU's fused kernel skips a rounding
    of the weight to a narrower dtype, which would make this path's numbers differ from the dot's.
    """
    tokens = int(np.prod(hidden.shape[:-1]))
    if jax.default_backend() != "cpu" or tokens not in _CPU_FEW_TOKENS or weight.dtype != hidden.dtype:
        return dense("...d,vd->...v", hidden, weight, hidden.dtype)
    rows = hidden.reshape(tokens, -1).astype(jnp.float32)  # [N, D]
    products = weight.astype(jnp.float32)[:, None, :] * rows[None]  # [V, N, D]
    return products.sum(-1).T.reshape(*hidden.shape[:-1], weight.shape[0])


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache of every layer. Slot s of a row holds position s.

    Attributes:
      k: [L, B, K, S, H] keys after RoPE (heads-major, as attention reads them); for a model of
        split layers (:func:`split_layers`) a tuple of L such arrays of one layer each
        ([1, B, K, S, H]), so that every layer's cache is its own buffer, updated in place.
      v: values, laid out as ``k``.
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]

    @classmethod
    def zeros(cls, arch: ArchSpec, num_layers: int, batch: int, length: int, dtype: jnp.dtype,
              per_layer: bool = False) -> "KVCache":
        """An empty cache; ``per_layer`` lays it out for a model of split layers."""
        if per_layer:
            shape = (1, batch, arch.num_kv_heads, length, arch.head_dim)
            return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                       v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))
        shape = (num_layers, batch, arch.num_kv_heads, length, arch.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[3]

    def map(self, fn: Callable[[Array], Array]) -> "KVCache":
        """``fn`` applied to every [L', B, K, S', H] key and value array (either layout)."""
        return KVCache(k=jax.tree.map(fn, self.k), v=jax.tree.map(fn, self.v))

    def write(self, new: "KVCache", cache_index: Array) -> "KVCache":
        """Writes ``new`` ([L, B, K, T, H] per tensor in this cache's layout, e.g. a ``write=False``
        forward's) into slots cache_index .. cache_index + T - 1 of each row ([B] cache_index);
        slots past the cache are dropped."""
        new_k = jax.tree.leaves(new.k)[0]
        slots = cache_index[:, None] + jnp.arange(new_k.shape[3])[None, :]
        rows = jnp.arange(new_k.shape[1])[:, None]

        def scatter(cache: Array, values: Array) -> Array:  # indexed [:, rows, :, slots] it reads [B, T, L, K, H]
            return cache.at[:, rows, :, slots].set(values.transpose(1, 3, 0, 2, 4).astype(cache.dtype), mode="drop")

        return KVCache(k=jax.tree.map(scatter, self.k, new.k), v=jax.tree.map(scatter, self.v, new.v))


class ModelOutput(NamedTuple):
    """hidden: [B, T, D] last hidden states after the final norm; logits: [B, T, V] or None;
    cache: the updated cache, or with ``write_cache=False`` the new tokens' [L, B, K, T, H]."""

    hidden: Array
    logits: Array | None
    cache: KVCache | None


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D]; normalised in float32 as the reference implementations do."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[H // 2] float32 inverse frequencies, with Llama 3 frequency-dependent scaling when given."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos, sin: [B, T, H] for integer positions [B, T] (halves duplicated, HF layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, heads, H] rotated by position (non-interleaved halves, as in HF Llama)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


ATTENTION_BLOCK = 64
"""Queries per block of cache-free attention (each block reads only the keys up to its end)."""


class Attention(nnx.Module):
    def __init__(self, arch: ArchSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d, n, k, h = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.dtype = dtype
        self.num_kv_heads = k
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype, d)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype, d)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype, d)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype, n * h)
        if arch.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), param_dtype), logical_axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, h), param_dtype), logical_axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, h), param_dtype), logical_axes=("kv_heads", "head_dim"))
        else:
            self.q_bias = self.k_bias = self.v_bias = None

    def _project(self, x: Array, weight: nnx.Param, bias: nnx.Param | None) -> Array:
        out = dense("btd,dnh->btnh", x, weight[...], self.dtype)
        return (out if bias is None else out + bias[...]).astype(self.dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 cache: tuple[Array, Array] | None, cache_index: Array | None, layer: Array | int = 0,
                 write: bool = True, diagonal: tuple[Array, Array] | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """Self-attention of the T new tokens over S keys.

        Args:
          x: [B, T, D] normed input.
          cos, sin: [B, T, H] rotary tables of the new tokens' positions.
          mask: [B, T, S] True where query t may attend key s. Without a cache it must be causal
            (False wherever s > t); keys after a query's block are not read. With ``write=False``
            it is [B, T, S + T]: the cached slots, then the new tokens.
          cache: the whole model's (k, v), each [L, B, K, S, H], or None (keys are the new tokens, S = T).
          cache_index: [B] slot where each row's first new token is written.
          layer: this layer's index into the cache.
          write: False leaves the cache untouched (only read) and attends over its slots and the
            new tokens side by side; see :class:`Llama`.
          diagonal: with ``write=False`` only: the whole model's keys and values of J >= 0 earlier
            unrolled steps, each [L, J, B, K, T, H]. Query t then attends the cache's slots under
            ``mask`` ([B, T, S]), entry t of each earlier step and its own key, and no other new
            token: the EAGLE head's training-time test (:meth:`EagleHead.unrolled`).

        Returns:
          [B, T, D] output and the updated (k, v) cache (None without a cache), or with
          ``write=False`` the new tokens' (k, v), each [B, K, T, H].

        The new keys and values are scattered straight into the whole cache (in place under jit)
        and only this layer's slice is read back, already heads-major: no per-layer copy of the
        cache and no transpose of it, which dominated batched decoding with long caches.
        """
        b, t, _ = x.shape
        q = apply_rope(self._project(x, self.q_proj, self.q_bias), cos, sin)
        k = apply_rope(self._project(x, self.k_proj, self.k_bias), cos, sin)
        v = self._project(x, self.v_proj, self.v_bias)
        if diagonal is not None and (cache is None or write):
            raise ValueError("diagonal keys need a cache that is only read (write=False)")
        new_kv = None
        own_keys, own_values = (), ()
        if cache is not None and not write:
            new_kv = (k.transpose(0, 2, 1, 3).astype(cache[0].dtype), v.transpose(0, 2, 1, 3).astype(cache[1].dtype))
            keys, values = (cache[0][layer].astype(self.dtype),), (cache[1][layer].astype(self.dtype),)
            if diagonal is None:
                keys, values = keys + (new_kv[0].astype(self.dtype),), values + (new_kv[1].astype(self.dtype),)
            else:
                earlier_k, earlier_v = diagonal[0][layer], diagonal[1][layer]
                own_keys = tuple(earlier_k[j].astype(self.dtype) for j in range(earlier_k.shape[0])) + (
                    new_kv[0].astype(self.dtype),)
                own_values = tuple(earlier_v[j].astype(self.dtype) for j in range(earlier_v.shape[0])) + (
                    new_kv[1].astype(self.dtype),)
        elif cache is not None:
            slots = cache_index[:, None] + jnp.arange(t)[None, :]
            rows = jnp.arange(b)[:, None]
            k_new, v_new = k, v
            if t == 1:
                # XLA turns a one-slot scatter into a dynamic-update-slice and then recomputes that
                # update into a fresh copy of the cache for every read of it below (four cache
                # copies per layer and decoding step with split layers); a second slot past the
                # cache, dropped, keeps it a scatter, done in place.
                slots = jnp.concatenate([slots, jnp.full_like(slots, cache[0].shape[3])], axis=1)
                k_new, v_new = jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1)
            # Indexed [layer, rows, :, slots] the cache reads as [B, T, K, H], the new keys' layout.
            k_all = cache[0].at[layer, rows, :, slots].set(k_new.astype(cache[0].dtype), mode="drop")
            v_all = cache[1].at[layer, rows, :, slots].set(v_new.astype(cache[1].dtype), mode="drop")
            cache = (k_all, v_all)
            keys, values = (k_all[layer].astype(self.dtype),), (v_all[layer].astype(self.dtype),)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        n_heads, head_dim = q.shape[2], q.shape[3]
        groups = n_heads // self.num_kv_heads
        # Heads-major layouts ([B, K, T, G, H] queries, [B, K, S, H] keys) make every attention
        # product a plain batched matmul over (B, K), with no transposes per query block.
        q = q.reshape(b, t, self.num_kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
        if cache is None:
            # Cache-free masks are causal in index order (query t sees keys s <= t; packed, plain
            # and draft-tree masks all are), so a block of queries needs only the keys up to its
            # own end: about half the score work, and block-sized score arrays.
            out = jnp.concatenate([_attend(q[:, :, start:start + ATTENTION_BLOCK], (k[:, :, :start + ATTENTION_BLOCK],),
                                           (v[:, :, :start + ATTENTION_BLOCK],),
                                           mask[:, start:start + ATTENTION_BLOCK, :start + ATTENTION_BLOCK])
                                   for start in range(0, t, ATTENTION_BLOCK)], axis=2)
        else:
            out = _attend(q, keys, values, mask, own_keys, own_values)
        # Heads back to [B, T, N x H] (head n = k x G + g) and one plain matmul with o_proj as
        # [N x H, D]: contracting the heads-major output against o_proj reshaped [K, G, H, D]
        # made XLA transpose the weight instead, a copy of it per layer and call.
        out = out.transpose(0, 2, 1, 3, 4).reshape(b, t, n_heads * head_dim)
        out = dense("btf,fd->btd", out, self.o_proj[...].reshape(n_heads * head_dim, -1), self.dtype)
        return out.astype(self.dtype), (new_kv if new_kv is not None else cache)


def _attend(q: Array, keys: tuple[Array, ...], values: tuple[Array, ...], mask: Array,
            own_keys: tuple[Array, ...] = (), own_values: tuple[Array, ...] = ()) -> Array:
    """Softmax attention of grouped queries [B, K, T, G, H] over keys/values given as blocks
    [B, K, S_i, H] (one softmax over all S = sum S_i keys, the blocks never concatenated) with a
    [B, T, S] mask, and over ``own_keys``/``own_values`` blocks [B, K, T, H] of which query t
    attends entry t only (always allowed; one score per query and block, no [T, T] product).

    Returns [B, K, T, G, H] in the dtype of the values; scores and softmax are float32.
    """
    b, kv_heads, t, groups, head_dim = q.shape
    flat_q = q.reshape(b, kv_heads, t * groups, head_dim)
    scores = jnp.concatenate([jnp.einsum("bkqh,bksh->bkqs", flat_q, k, preferred_element_type=jnp.float32)
                              for k in keys], axis=-1).reshape(b, kv_heads, t, groups, -1)
    scores = scores * (head_dim ** -0.5)
    # A finite floor (not -inf) keeps fully-masked padding rows finite instead of NaN.
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    if own_keys:
        own = [jnp.einsum("bktgh,bkth->bktg", q, k, preferred_element_type=jnp.float32) for k in own_keys]
        scores = jnp.concatenate([scores, jnp.stack(own, axis=-1) * (head_dim ** -0.5)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(values[0].dtype)
    bounds = np.cumsum([0] + [v.shape[2] for v in values])
    flat_probs = probs[..., :bounds[-1]].reshape(b, kv_heads, t * groups, -1)
    out = functools.reduce(jnp.add, [jnp.einsum("bkqs,bksh->bkqh", flat_probs[..., start:end], v,
                                                preferred_element_type=jnp.float32)
                                     for start, end, v in zip(bounds[:-1], bounds[1:], values)])
    out = out.reshape(b, kv_heads, t, groups, head_dim).astype(values[0].dtype)
    for index, v in enumerate(own_values):
        out = out + probs[..., bounds[-1] + index, None] * v[:, :, :, None, :]
    return out


class MLP(nnx.Module):
    def __init__(self, arch: ArchSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d, f = arch.hidden_size, arch.intermediate_size
        self.dtype = dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype, d)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype, f)

    def __call__(self, x: Array) -> Array:
        """[B, T, D] -> [B, T, D]: down(silu(gate(x)) * up(x))."""
        gate = dense("btd,df->btf", x, self.gate_proj[...], self.dtype)
        up = dense("btd,df->btf", x, self.up_proj[...], self.dtype)
        return dense("btf,fd->btd", jax.nn.silu(gate) * up, self.down_proj[...], self.dtype).astype(self.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm Llama decoder layer. ``input_norm=False`` drops the attention input norm
    (the EAGLE head's first layer, whose input is already the fused feature)."""

    def __init__(self, arch: ArchSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, input_norm: bool = True):
        self.input_layernorm = (RMSNorm(arch.hidden_size, arch.rms_norm_eps, param_dtype=param_dtype)
                                if input_norm else None)
        self.self_attn = Attention(arch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(arch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 cache: tuple[Array, Array] | None, cache_index: Array | None, layer: Array | int = 0,
                 write: bool = True, diagonal: tuple[Array, Array] | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [B, T, D] residual stream -> [B, T, D]; see :meth:`Attention.__call__` for the rest."""
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        attn, cache = self.self_attn(h, cos, sin, mask, cache, cache_index, layer, write, diagonal)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DecoderStack(nnx.Module):
    """``num_layers`` identical decoder layers stored stacked ([L, ...] parameters), run by scan."""

    def __init__(self, arch: ArchSpec, num_layers: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        self.num_layers = num_layers

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0,
                  transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(arch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.layers = make_layers(rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, cache: KVCache | None,
                 cache_index: Array | None, first_layer: int = 0, write: bool = True,
                 diagonal: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """x: [B, T, D] -> [B, T, D]. The cache (if any) is [L', B, K, S, H] per tensor, L' >= first_layer +
        num_layers; layer i of the stack uses cache layer ``first_layer + i``. Returns the updated
        cache, or with ``write=False`` (cache only read) the new tokens' keys and values as a
        [num_layers, B, K, T, H] :class:`KVCache`. ``diagonal`` ([L', J, B, K, T, H] tensors, with
        ``write=False`` only): see :meth:`Attention.__call__`."""
        graphdef, layer_state = nnx.split(self.layers)
        if self.num_layers == 1:
            return self._one_layer(nnx.merge(graphdef, jax.tree.map(lambda a: a[0], layer_state)), x, cos, sin,
                                   mask, cache, cache_index, first_layer, write, diagonal)
        if cache is not None and not write:
            earlier = None if diagonal is None else (diagonal.k, diagonal.v)

            def read_only(h, layer):
                index, state = layer
                h, new_kv = nnx.merge(graphdef, state)(h, cos, sin, mask, (cache.k, cache.v), None,
                                                       first_layer + index, write=False, diagonal=earlier)
                return h, new_kv

            x, (k, v) = jax.lax.scan(read_only, x, (jnp.arange(self.num_layers), layer_state))
            return x, KVCache(k=k, v=v)

        def body(carry, layer):
            h, kv = carry
            index, state = layer
            h, kv = nnx.merge(graphdef, state)(h, cos, sin, mask, kv, cache_index, first_layer + index)
            return (h, kv), None

        init = (x, None if cache is None else (cache.k, cache.v))
        (x, kv), _ = jax.lax.scan(body, init, (jnp.arange(self.num_layers), layer_state))
        return x, None if cache is None else KVCache(k=kv[0], v=kv[1])

    @staticmethod
    def _one_layer(layer: DecoderLayer, x: Array, cos: Array, sin: Array, mask: Array, cache: KVCache | None,
                   cache_index: Array | None, first_layer: int, write: bool, diagonal: KVCache | None
                   ) -> tuple[Array, KVCache | None]:
        """A stack of one layer, called without a scan: its [1, ...] weights are indexed, not copied."""
        kv = None if cache is None else (cache.k, cache.v)
        earlier = None if diagonal is None else (diagonal.k, diagonal.v)
        x, kv = layer(x, cos, sin, mask, kv, cache_index, first_layer, write, earlier)
        if kv is None:
            return x, None
        if not write:  # the new tokens' [B, K, T, H] keys and values, stacked as a scan would
            return x, KVCache(k=kv[0][None], v=kv[1][None])
        return x, KVCache(k=kv[0], v=kv[1])


class Llama(nnx.Module):
    """The target model: embedding, decoder layers, final norm, LM head (tied or not).

    ``scan_layers`` True stores the layers stacked ([L, ...] parameters, one :class:`DecoderStack`)
    and runs them under a scan; False stores L stacks of one layer each (``layers[i]``, [1, ...]
    parameters) and runs them one after another, the layout :func:`split_layers` makes for decoding.
    """

    def __init__(self, arch: ArchSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, scan_layers: bool = True):
        self.arch = arch
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.embed_tokens = nnx.Param(
            (jax.random.normal(rngs.params(), (arch.vocab_size, arch.hidden_size)) * 0.02).astype(param_dtype),
            logical_axes=("vocab", "embed"))
        if scan_layers:
            self.layers = DecoderStack(arch, arch.num_layers, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            self.layers = nnx.List([DecoderStack(arch, 1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                    for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (None if arch.tie_word_embeddings else
                        _param(rngs, (arch.vocab_size, arch.hidden_size), ("vocab", "embed"), param_dtype,
                               arch.hidden_size))

    def embed(self, tokens: Array) -> Array:
        """tokens: [B, T] int -> [B, T, D] embeddings in the compute dtype."""
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def lm_head_weight(self) -> Array:
        """[V, D] vocabulary-major LM head (the embedding table when tied)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return weight[...]

    def logits(self, hidden: Array) -> Array:
        """[..., D] final hidden states -> [..., V] float32 logits."""
        return lm_head_logits(hidden, self.lm_head_weight())

    def empty_cache(self, batch: int, length: int) -> KVCache:
        """A zero KV cache of ``length`` slots per row, laid out for this model's layers."""
        return KVCache.zeros(self.arch, self.arch.num_layers, batch, length, self.dtype,
                             per_layer=not self.scan_layers)

    def __call__(self, tokens: Array, positions: Array, mask: Array, cache: KVCache | None = None,
                 cache_index: Array | None = None, *, return_logits: bool = True, write_cache: bool = True
                 ) -> ModelOutput:
        """Runs the decoder over T new tokens per row.

        Args:
          tokens: [B, T] token ids.
          positions: [B, T] position of each token (RoPE), e.g. per-segment when packed.
          mask: [B, T, S] attention mask (see :mod:`flatspec_jax.models.masks`); causal when there
            is no cache (query t never attends key s > t).
          cache: KV cache to read and extend, or None for a cache-free forward (S = T).
          cache_index: [B] slot of each row's first new token (required with a cache).
          return_logits: compute [B, T, V] logits; skip when only hidden states are needed
            (e.g. fused flatness scoring or EAGLE features).
          write_cache: False only reads the cache: the new tokens attend to its S slots and to
            each other side by side (``mask`` is then [B, T, S + T]), and the output's ``cache``
            holds just their keys and values ([L, B, K, T, H]; :meth:`KVCache.write` stores
            them). Inside ``lax.cond``/``switch`` branches this spares XLA copying the whole
            cache into each branch, which it does for a cache the branch writes.
        """
        read_only = cache is not None and not write_cache
        if cache is not None and cache_index is None and not read_only:
            raise ValueError("cache_index is required when a cache is given")
        inv_freq = rope_inverse_frequencies(self.arch.head_dim, self.arch.rope_theta, self.arch.rope_scaling)
        cos, sin = rope_tables(positions, inv_freq)
        if self.arch.sliding_window is not None:
            # Keys: the cache's slots (slot s holding position s), the new tokens, or both side by side.
            batch = positions.shape[0]
            keys = [] if cache is None else [jnp.broadcast_to(jnp.arange(cache.length), (batch, cache.length))]
            keys += [positions] * (cache is None or read_only)
            mask = mask & sliding_window_mask(positions, jnp.concatenate(keys, axis=1), self.arch.sliding_window)
        x = self.embed(tokens)
        if self.scan_layers:
            x, cache = self.layers(x, cos, sin, mask, cache, cache_index, write=write_cache)
        else:
            layer_caches = []
            for index, layer in enumerate(self.layers):
                layer_cache = None if cache is None else KVCache(k=cache.k[index], v=cache.v[index])
                x, layer_cache = layer(x, cos, sin, mask, layer_cache, cache_index, write=write_cache)
                layer_caches.append(layer_cache)
            cache = None if cache is None else KVCache(k=tuple(c.k for c in layer_caches),
                                                       v=tuple(c.v for c in layer_caches))
        hidden = self.norm(x)
        return ModelOutput(hidden, self.logits(hidden) if return_logits else None, cache)


def sliding_window_mask(positions: Array, key_positions: Array, window: int) -> Array:
    """[B, T] query and [B, S] key positions -> [B, T, S] True where the key lies within the
    query's sliding window.

    A cache's slot s is taken to hold position s. A draft tree verified by writing it into the
    cache breaks that (slot n + j holds position n + depth(j) <= n + j), which understates
    distances to keys inside the tree by less than its size, so a node may see a tree key up to
    that far outside the window: it matters only for windows shorter than the tree, far below
    any real model's window.
    """
    return positions[:, :, None] - key_positions[:, None, :] < window


def create_model(arch: ArchSpec, *, seed: int = 0, dtype: str = "float32", param_dtype: str = "float32") -> Llama:
    """A randomly initialised model (tests and abstract shapes; real weights come from the loader)."""
    return Llama(arch, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


def split_layers(model: Llama) -> Llama:
    """The same model with every decoder layer in its own buffers (``scan_layers=False``).

    Layer i's parameters are slice [i:i+1] of the stacked ones (copies, with their sharding); the
    embedding, final norm and LM head are shared. The caller keeps ``model``: both stay in memory.
    A model already split is returned as it is.
    """
    if not model.scan_layers:
        return model
    param_dtype = model.embed_tokens[...].dtype
    abstract = nnx.eval_shape(lambda: Llama(model.arch, rngs=nnx.Rngs(0), dtype=model.dtype,
                                            param_dtype=param_dtype, scan_layers=False))
    graphdef, state = nnx.split(abstract)
    stacked = nnx.state(model.layers.layers)
    for index in range(model.arch.num_layers):
        state["layers"][index]["layers"] = jax.tree.map(lambda a, i=index: a[i:i + 1], stacked)
    for name, value in nnx.state(model).items():
        if name != "layers":
            state[name] = value
    return nnx.merge(graphdef, state)
