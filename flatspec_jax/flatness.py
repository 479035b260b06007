"""Per-token flatness of the target model's next-token distribution, and its per-sample means.

Flatness is the cosine similarity between p = softmax(z / T) and the uniform distribution
U = (1/V, ..., 1/V) over a vocabulary of size V:

    flat(p) = <p, U> / (|p|_2 |U|_2) = 1 / (sqrt(V) |p|_2)
            = V^(-1/2) * exp(LSE(z') - LSE(2 z') / 2),        z' = z / T,

since |p|_2^2 = sum exp(2 z') / (sum exp(z'))^2 = exp(LSE(2 z') - 2 LSE(z')). It lies in
[V^(-1/2), 1]: V^(-1/2) for a one-hot p and 1 only for the uniform p. Working with the two
log-sum-exps instead of materialised probabilities means large logits cannot overflow and
tiny probabilities cannot underflow into a wrong norm.

All statistics come from three shift-normalised sums over the vocabulary, with m = max z'
and s = z' - m <= 0:

    S1 = sum exp(s),    S2 = sum exp(2 s),    A = sum exp(s) * s,

    LSE(z') = m + log S1,   LSE(2 z') = 2 m + log S2,   entropy H = log S1 - A / S1,
    top-1 probability = exp(m - LSE(z')) = 1 / S1,     nll = (m - z'[target]) + log S1.

Like an online softmax, these sums for two parts of the vocabulary merge exactly once both
are rescaled to the common max, which is how `token_stats_from_hidden` goes from final
hidden states to statistics chunk by chunk without ever holding an [N, V] logits array.

Alignment: the statistics at position t are about predicting token t + 1 (the targets are
the inputs shifted left by one; the caller does the shifting), so every mask given to
`sample_stats` / `segment_stats` must be aligned with these prediction positions.

Shape legend: ... leading (token) dims, V vocabulary size, D hidden size, N tokens in a
flattened batch, C vocabulary chunk, B samples, S sequence length, R packed rows,
M segment slots per row.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

Array = jax.Array

_MIN_SHIFT = -1e4
"""Lower clamp of s = (z - max z) / T: far below float32 exp's underflow to 0 (about -104)."""


class TokenStats(NamedTuple):
    """Statistics of the next-token distribution p = softmax(z / T) at each prediction position.

    A NamedTuple, hence a pytree: it passes through `jax.jit`, `vmap` and `scan` as is.
    Every field is float32 with the leading shape [...] of the logits.

    Attributes:
      flatness: cosine similarity between p and the uniform distribution, in [V^-1/2, 1].
      entropy: H(p) in nats.
      top1_prob: max_v p_v.
      nll: -log p[target] in nats, under the *temperature-scaled* p (equal to the model's
        cross-entropy loss only at T = 1).
    """

    flatness: Array
    entropy: Array
    top1_prob: Array
    nll: Array


class _VocabSums(NamedTuple):
    """The module docstring's sums over the part of the vocabulary seen so far, each [...].

    The max and the target are kept as raw logits (before dividing by T): with
    s = (z - max z) / T the top logit gets s = 0 exactly. Scaling first and subtracting the
    max of z / T after lets the compiler fuse the multiply by 1/T into the subtraction
    (an FMA on CPU) and leave the top logit at s != 0, which costs ~|z'| x 1e-7 of accuracy.
    """

    max: Array  # the largest raw logit (T times the module docstring's m)
    sum_exp: Array  # S1
    sum_exp2: Array  # S2
    sum_exp_shift: Array  # A
    target: Array  # the raw logit of the target if it lies in the part seen so far, else 0


def _vocab_sums(logits: Array, local_targets: Array, temperature: float | Array) -> _VocabSums:
    """Sums over the last axis of float32 logits [..., W]; local_targets [...] index into it
    (outside [0, W): the target is elsewhere)."""
    width = logits.shape[-1]
    m = logits.max(axis=-1)
    # A -inf logit (a masked token) must add 0 to A, not exp(-inf) * -inf = NaN. Clamping s below
    # at _MIN_SHIFT changes nothing else: float32 exp is already 0 below -104. (A max, where a
    # select on e > 0 made the statistics' pass over [N, C] a third slower on CPU.)
    s = jnp.maximum((logits - m[..., None]) / temperature, _MIN_SHIFT)
    e = jnp.exp(s)
    here = (local_targets >= 0) & (local_targets < width)
    picked = jnp.take_along_axis(logits, jnp.clip(local_targets, 0, width - 1)[..., None], axis=-1)[..., 0]
    return _VocabSums(m, e.sum(-1), (e * e).sum(-1), (e * s).sum(-1), jnp.where(here, picked, 0.0))


def _merge(a: _VocabSums, b: _VocabSums, temperature: float | Array) -> _VocabSums:
    """Sums over the union of two disjoint parts of the vocabulary."""
    m = jnp.maximum(a.max, b.max)
    da, db = (a.max - m) / temperature, (b.max - m) / temperature  # <= 0: rescaling only shrinks
    ea, eb = jnp.exp(da), jnp.exp(db)
    return _VocabSums(
        max=m,
        sum_exp=a.sum_exp * ea + b.sum_exp * eb,
        sum_exp2=a.sum_exp2 * ea * ea + b.sum_exp2 * eb * eb,
        # Shifting s by d turns sum exp(s) s into exp(d) (A + d S1).
        sum_exp_shift=ea * (a.sum_exp_shift + da * a.sum_exp) + eb * (b.sum_exp_shift + db * b.sum_exp),
        target=a.target + b.target,
    )


def _finish(sums: _VocabSums, vocab_size: int, temperature: float | Array) -> TokenStats:
    log_s1 = jnp.log(sums.sum_exp)
    return TokenStats(
        flatness=jnp.exp(log_s1 - 0.5 * jnp.log(sums.sum_exp2) - 0.5 * math.log(vocab_size)),
        entropy=log_s1 - sums.sum_exp_shift / sums.sum_exp,
        top1_prob=1.0 / sums.sum_exp,
        # The logit gap first: exactly 0 when the target is the argmax, so a confident
        # correct prediction keeps all of log S1's precision.
        nll=(sums.max - sums.target) / temperature + log_s1,
    )


def token_stats_from_logits(logits: Array, targets: Array, temperature: float = 1.0) -> TokenStats:
    """Flatness, entropy, top-1 probability and nll of softmax(logits / temperature).

    One pass over the vocabulary, in float32 whatever the logits' dtype.

    Args:
      logits: [..., V] next-token logits z; V is taken to be the last dimension. Entries may be
        -inf (masked tokens) as long as each row has a finite one.
      targets: [...] int, the actual next token of each position, in [0, V).
      temperature: T > 0; every statistic, nll included, describes softmax(z / T).

    Returns:
      TokenStats with float32 fields shaped [...].
    """
    return _finish(_vocab_sums(logits.astype(jnp.float32), targets, temperature), logits.shape[-1], temperature)


def token_stats_from_hidden(
    hidden: Array,
    lm_head: Array,
    targets: Array,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> TokenStats:
    """`token_stats_from_logits(hidden @ lm_head.T, targets, temperature)` without the [N, V] logits.

    The vocabulary is processed in chunks of `chunk_size` rows of `lm_head` inside a
    `lax.scan`, merging online log-sum-exp accumulators, so memory is O(N x C) instead of
    O(N x V). When C does not divide V the remaining V mod C rows get one extra, narrower
    step, so there is no padding that could leak into the sums. Each chunk's matmul
    accumulates in float32 even for bfloat16 inputs; its precision is otherwise JAX's default
    for the inputs' dtype (see `jax_default_matmul_precision`), the same as a plain matmul.

    Args:
      hidden: [..., D] final hidden states (N = the product of the leading dims).
      lm_head: [V, D] vocabulary-major output weight (an embedding table / HF `lm_head.weight`).
      targets: [...] int, the actual next token of each position, in [0, V).
      temperature: T > 0; every statistic, nll included, describes softmax(logits / T).
      chunk_size: C, vocabulary rows per step (static; capped at V).

    Returns:
      TokenStats with float32 fields shaped [...].
    """
    return _finish(_hidden_sums(hidden, lm_head, targets, temperature, chunk_size), lm_head.shape[0], temperature)


def _hidden_sums(hidden: Array, lm_head: Array, targets: Array, temperature: float | Array,
                 chunk_size: int) -> _VocabSums:
    """The sums of :func:`token_stats_from_hidden` over ``lm_head``'s rows ([W, D]); targets index them."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab_size = lm_head.shape[0]
    chunk = min(chunk_size, vocab_size)
    n_full, rest = divmod(vocab_size, chunk)

    def chunk_sums(start: int | Array, width: int) -> _VocabSums:
        weight = jax.lax.dynamic_slice_in_dim(lm_head, start, width)  # [C, D]
        logits = jnp.einsum("...d,cd->...c", hidden, weight, preferred_element_type=jnp.float32)
        return _vocab_sums(logits, targets - start, temperature)

    def step(acc: _VocabSums, index: Array) -> tuple[_VocabSums, None]:
        return _merge(acc, chunk_sums(index * chunk, chunk), temperature), None

    # Starting from the first chunk's sums (rather than m = -inf) keeps every max finite.
    acc, _ = jax.lax.scan(step, chunk_sums(0, chunk), jnp.arange(1, n_full))
    if rest:
        acc = _merge(acc, chunk_sums(n_full * chunk, rest), temperature)
    return acc


def token_stats_vocab_parallel(hidden: Array, lm_head: Array, targets: Array, mesh: Mesh,
                               vocab_axis: str | tuple[str, ...],
                               row_axes: str | tuple[str, ...] | None, temperature: float = 1.0,
                               chunk_size: int = 1024) -> TokenStats:
    """:func:`token_stats_from_hidden` with ``lm_head``'s vocabulary split over the mesh axis ``vocab_axis``
    (or axes).

    Each device reduces only its own V / n rows of the head (chunked as there), then the devices
    of the axis combine their sums (a max and four sums per position), so the head is never
    gathered and no vocabulary row is reduced twice. Use it inside ``jit`` on ``mesh``.

    Args:
      hidden: [R, ..., D] final hidden states, rows split over ``row_axes`` (None: replicated).
      lm_head: [V, D] vocabulary-major output weight; the size of ``vocab_axis`` must divide V.
      targets: [R, ...] int next tokens in [0, V), split like ``hidden``.

    Returns:
      TokenStats with float32 fields shaped [R, ...], split like ``targets``.
    """
    vocab_size = lm_head.shape[0]
    parts = math.prod(mesh.shape[a] for a in ((vocab_axis,) if isinstance(vocab_axis, str) else vocab_axis))
    if vocab_size % parts:
        raise ValueError(f"mesh axis {vocab_axis!r} of size {parts} does not divide the vocabulary ({vocab_size})")
    rows = PartitionSpec(row_axes, *(None,) * (targets.ndim - 1))

    def local(h: Array, head: Array, t: Array) -> TokenStats:
        offset = jax.lax.axis_index(vocab_axis) * (vocab_size // parts)
        sums = _hidden_sums(h, head, t - offset, temperature, chunk_size)
        top = jax.lax.pmax(sums.max, vocab_axis)
        shift = (sums.max - top) / temperature  # <= 0, as in _merge
        scale = jnp.exp(shift)
        total = functools.partial(jax.lax.psum, axis_name=vocab_axis)
        merged = _VocabSums(max=top, sum_exp=total(sums.sum_exp * scale),
                            sum_exp2=total(sums.sum_exp2 * scale * scale),
                            sum_exp_shift=total(scale * (sums.sum_exp_shift + shift * sums.sum_exp)),
                            target=total(sums.target))
        return _finish(merged, vocab_size, temperature)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(row_axes), PartitionSpec(vocab_axis), rows),
                         out_specs=TokenStats(rows, rows, rows, rows), check_vma=False)(hidden, lm_head, targets)


def segment_stats(
    stats: TokenStats, loss_mask: Array, segment_ids: Array, num_segments: int
) -> dict[str, Array]:
    """Per-sample means of token statistics over packed rows.

    Args:
      stats: TokenStats with fields [R, S].
      loss_mask: [R, S], nonzero on trained (assistant) prediction positions; ignored on
        padding.
      segment_ids: [R, S] int, 1..k for the k samples of a row and 0 on padding; ids outside
        [0, M] are ignored.
      num_segments: M (static), the segment slots per row. Slot j holds segment id j + 1, as in
        `flatspec_jax.data.packing.PackedRows.sample_index`.

    Returns:
      A dict of [R, M] arrays:
        flatness, entropy, top1_prob, nll: float32 means over the segment's trained positions;
          NaN for a segment with no trained position (so it drops out of nan-aware averages
          instead of counting as 0).
        flatness_all: float32 mean flatness over all the segment's positions; NaN for an empty
          slot.
        n_trained_tokens, n_tokens: int32 counts of trained and of all positions.
    """
    trained = loss_mask != 0

    def per_segment_sum(x: Array) -> Array:
        """[R, S] -> [R, M]. Padding (segment 0) is summed apart and dropped, so whatever it
        holds, NaN or a stray loss_mask, never reaches a sample."""
        sums = jax.vmap(lambda row, ids: jax.ops.segment_sum(row, ids, num_segments + 1))(x, segment_ids)
        return sums[:, 1:]

    def mean(values: Array, count: Array) -> Array:
        total = per_segment_sum(values.astype(jnp.float32))
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    def trained_mean(values: Array) -> Array:
        # where(), not a multiply: an untrained position may hold an inf nll, and 0 * inf = NaN.
        return mean(jnp.where(trained, values, 0.0), n_trained)

    n_trained = per_segment_sum(trained.astype(jnp.int32))
    n_tokens = per_segment_sum(jnp.ones_like(segment_ids, jnp.int32))
    return {
        "flatness": trained_mean(stats.flatness),
        "flatness_all": mean(stats.flatness, n_tokens),
        "entropy": trained_mean(stats.entropy),
        "top1_prob": trained_mean(stats.top1_prob),
        "nll": trained_mean(stats.nll),
        "n_trained_tokens": n_trained,
        "n_tokens": n_tokens,
    }


def sample_stats(stats: TokenStats, loss_mask: Array, valid_mask: Array) -> dict[str, Array]:
    """Per-sample means for unpacked rows (one sample per row).

    Args:
      stats: TokenStats with fields [B, S].
      loss_mask: [B, S], nonzero on trained (assistant) prediction positions; ignored where
        `valid_mask` is 0.
      valid_mask: [B, S], nonzero on real (non-padding) prediction positions.

    Returns:
      The dict of `segment_stats` with [B] arrays; a sample without trained positions has NaN
      trained means.
    """
    one_segment = (valid_mask != 0).astype(jnp.int32)
    return {k: v[:, 0] for k, v in segment_stats(stats, loss_mask, one_segment, num_segments=1).items()}
