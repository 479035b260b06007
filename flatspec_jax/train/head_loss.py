"""The draft loss computed through the frozen LM head in position chunks, skipping untrained ones.

`flatspec_jax.train.losses.draft_loss` defines the loss on two [R, L, V] logit arrays (draft and
target). Built that way, an EAGLE step on SmolLM2 (V = 49,152) holds several 400 MB arrays per
4 x 512 batch, and its three LM-head products (draft logits, target logits, the gradient back
through the head) are ~85% of an offline step's FLOPs, spent at every position although only
trained positions (assistant tokens) enter the loss. `draft_loss_through_head` returns the same
loss, terms and gradient w.r.t. the draft's hidden states without either:

1. Each row's positions are reordered so trained ones come first (a stable sort, local to the
   row, so rows sharded over devices stay where they are) and cut into chunks of ``chunk``
   positions. A chunk that no row trains is skipped (`lax.cond`), so prompt and padding
   positions cost no LM-head work beyond the last, partly trained chunk.
2. One pass per chunk computes both logits [R, chunk, V], the per-position terms
   (`losses.token_term` and `losses.agreement_terms`, the code `draft_loss` uses; the
   agreement metrics only when asked for) and, because the LM head is frozen,
   the only gradient the loss has: d token / d hidden = (d token / d logits) @ W. A custom VJP
   returns that stored [R, L, D] gradient, so the backward pass does no vocabulary-wide work.
   Without differentiation (evaluation) the gradient is not computed.
3. With a reduced draft vocabulary (``draft_ids``, N of the V tokens; config ``draft.vocab``)
   both logits are computed over those N rows of the head only, so the token term compares the
   two distributions renormalised over the draft's tokens (EAGLE-3's reduced vocabulary) at
   N / V of the LM-head work. The agreement metrics still judge the draft against the target's
   full distribution, as decoding does: the draft's N logits are placed in a V-wide row that
   is -inf-like elsewhere, so a target argmax the draft cannot propose is a miss.

The head weight and target hidden states get no gradient (both are frozen inputs); the masked
means use `losses.masked_mean`'s weights mask / (sum(mask) + 1e-5).

Shape legend: R rows, L positions per row, D hidden size, V vocabulary, N draft vocabulary (V when
none is given), C chunks of c positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flatspec_jax.models.llama import lm_head_logits
from flatspec_jax.train.losses import (MASK_EPS, LossTerms, agreement_terms, check_token_loss, masked_mean, smooth_l1,
                                      token_term)

Array = jax.Array
NUM_SUMS = 4
"""Weighted sums per chunk: token term, acceptance, top-1 hit, top-3 hit."""


def _to_chunks(x: Array, order: Array, chunk: int) -> Array:
    """[R, L, ...] -> [C, R, c, ...]: each row permuted by ``order`` [R, L], zero-padded to C x c."""
    index = order.reshape(order.shape + (1,) * (x.ndim - 2))
    x = jnp.take_along_axis(x, index, axis=1)
    rows, length = order.shape
    num_chunks = -(-length // chunk)
    x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((rows, num_chunks, chunk) + x.shape[2:]), 1, 0)


def _from_chunks(x: Array, order: Array) -> Array:
    """Inverse of `_to_chunks` for [C, R, c, D] values: back to [R, L, D] in the original order."""
    rows, length = order.shape
    x = jnp.moveaxis(x, 0, 1).reshape((rows, -1) + x.shape[3:])[:, :length]
    return jnp.zeros_like(x).at[jnp.arange(rows)[:, None], order].set(x)


def _weighted_sum(values: Array, weights: Array) -> Array:
    # `where`, not just the zero weight: a non-finite term at an untrained position must not
    # reach the sums.
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def _in_full_vocab(draft_logits: Array, draft_ids: Array, vocab_size: int) -> Array:
    """[..., N] logits over the draft vocabulary -> [..., V], the dtype's lowest value elsewhere
    (probability 0 after the softmax, and below every real logit in a ranking)."""
    floor = jnp.full(draft_logits.shape[:-1] + (vocab_size,), jnp.finfo(draft_logits.dtype).min, draft_logits.dtype)
    return floor.at[..., draft_ids].set(draft_logits)


def _chunk_sums(draft_hidden: Array, target_hidden: Array, weights: Array, head_weight: Array, draft_rows: Array,
                draft_ids: Array | None, agreement: Array, token_loss: str, with_grad: bool) -> tuple[Array, Array]:
    """Weighted sums [4] of one chunk's per-position terms and d sums[0] / d draft_hidden (0 without ``with_grad``).

    ``draft_hidden`` and ``target_hidden`` are [R, c, D], ``weights`` [R, c]; ``draft_rows`` [N, D]
    are the head rows of ``draft_ids`` [N] (``head_weight`` [V, D] itself when those are None).
    The agreement sums (acceptance, top-1, top-3) are computed only if ``agreement`` ([] bool)
    is set (else 0), always against the target's full distribution.
    """
    target_logits = lm_head_logits(target_hidden, draft_rows)

    def token_sum(hidden: Array) -> tuple[Array, Array]:
        draft_logits = lm_head_logits(hidden, draft_rows)
        return _weighted_sum(token_term(draft_logits, target_logits, weights, token_loss), weights), draft_logits

    if with_grad:
        (token, draft_logits), grad = jax.value_and_grad(token_sum, has_aux=True)(draft_hidden)
    else:
        (token, draft_logits), grad = token_sum(draft_hidden), jnp.zeros((), draft_hidden.dtype)

    def agreement_sums() -> Array:
        if draft_ids is None:
            draft, target = draft_logits, target_logits
        else:
            target = lm_head_logits(target_hidden, head_weight)
            draft = _in_full_vocab(draft_logits, draft_ids, target.shape[-1])
        return jnp.stack([_weighted_sum(values, weights) for values in agreement_terms(draft, target)])

    sums = jax.lax.cond(agreement, agreement_sums, lambda: jnp.zeros((NUM_SUMS - 1,), jnp.float32))
    return jnp.concatenate([token[None], sums]), grad


def _chunked(draft_hidden: Array, target_hidden: Array, head_weight: Array, draft_ids: Array | None, mask: Array,
             agreement: Array, token_loss: str, chunk: int, with_grad: bool) -> tuple[Array, Array | None]:
    """Masked means [4] (token, acceptance, top1, top3) and, if ``with_grad``, d token / d draft_hidden [R, L, D]."""
    draft_rows = head_weight if draft_ids is None else jnp.take(head_weight, draft_ids, axis=0)
    trained = mask != 0
    weights = jnp.where(trained, mask.astype(jnp.float32), 0.0) / (jnp.sum(mask.astype(jnp.float32)) + MASK_EPS)
    order = jnp.argsort(~trained, axis=1, stable=True)
    chunked_trained = _to_chunks(trained, order, chunk)  # [C, R, c], trained positions first
    needed = jnp.any(chunked_trained[:, :, 0], axis=1)  # [C]
    xs = (_to_chunks(draft_hidden, order, chunk), _to_chunks(target_hidden, order, chunk),
          _to_chunks(weights, order, chunk), needed)

    def compute(hidden: Array, target: Array, chunk_weights: Array) -> tuple[Array, Array]:
        return _chunk_sums(hidden, target, chunk_weights, head_weight, draft_rows, draft_ids, agreement, token_loss,
                           with_grad)

    def skip(hidden: Array, target: Array, chunk_weights: Array) -> tuple[Array, Array]:
        return jnp.zeros((NUM_SUMS,), jnp.float32), (jnp.zeros_like(hidden) if with_grad else
                                                      jnp.zeros((), hidden.dtype))

    def body(carry: Array, x: tuple[Array, Array, Array, Array]) -> tuple[Array, Array]:
        hidden, target, chunk_weights, need = x
        sums, grad = jax.lax.cond(need, compute, skip, hidden, target, chunk_weights)
        return carry + sums, grad

    sums, grads = jax.lax.scan(body, jnp.zeros((NUM_SUMS,), jnp.float32), xs)
    return sums, (_from_chunks(grads, order) if with_grad else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _head_sums(draft_hidden: Array, target_hidden: Array, head_weight: Array, draft_ids: Array | None, mask: Array,
               agreement: Array, token_loss: str, chunk: int) -> Array:
    return _chunked(draft_hidden, target_hidden, head_weight, draft_ids, mask, agreement, token_loss, chunk,
                    with_grad=False)[0]


def _head_sums_fwd(draft_hidden: Array, target_hidden: Array, head_weight: Array, draft_ids: Array | None,
                   mask: Array, agreement: Array, token_loss: str, chunk: int) -> tuple[Array, Array]:
    """The sums and, as the residual, d token / d draft_hidden [R, L, D] from the same pass."""
    return _chunked(draft_hidden, target_hidden, head_weight, draft_ids, mask, agreement, token_loss, chunk,
                    with_grad=True)


def _head_sums_bwd(token_loss: str, chunk: int, grad: Array, cotangent: Array
                   ) -> tuple[Array, None, None, None, None, None]:
    # Only the token sum (index 0) depends differentiably on the draft; the metrics are constants.
    return (cotangent[0] * grad).astype(grad.dtype), None, None, None, None, None


_head_sums.defvjp(_head_sums_fwd, _head_sums_bwd)


def draft_loss_through_head(
    pred_features: Array,
    target_features: Array,
    head_weight: Array,
    mask: Array,
    *,
    token_loss: str,
    feature_weight: float,
    token_weight: float,
    chunk: int,
    agreement: bool | Array = True,
    draft_ids: Array | None = None,
) -> tuple[Array, LossTerms]:
    """`losses.draft_loss` with both logits computed from hidden states by the frozen LM head, chunk by chunk.

    Args:
      pred_features: [R, L, D] draft output features (the only input that gets a gradient).
      target_features: [R, L, D] target features f_{t+1}; the target logits are their LM-head output.
      head_weight: [V, D] the frozen LM head (logits = hidden @ head_weight^T, as `Llama.logits`).
      mask: [R, L], nonzero where the position is trained.
      token_loss: a key of `losses.TOKEN_LOSSES`.
      feature_weight, token_weight: the two weights.
      chunk: positions per chunk (> 0); the row length need not be a multiple.
      agreement: compute the metrics acceptance, top1 and top3 ([] bool, may be traced: one
        compiled step serves logged and unlogged steps); NaN without. They are about a fifth
        of the vocabulary-wide work, spent only where someone reads them.
      draft_ids: [N] distinct token ids of a reduced draft vocabulary, or None (all V tokens). The
        token term then compares the distributions renormalised over these tokens; the metrics
        still compare with the target's full distribution (module docstring, point 3).

    Returns:
      (loss [], LossTerms): the loss and its terms equal `draft_loss` on the materialised logits (their
      ``draft_ids`` columns, when given) up to summation order.

    Raises:
      ValueError: unknown token_loss or chunk <= 0.
    """
    check_token_loss(token_loss)
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    target_features = jax.lax.stop_gradient(target_features)
    feature = masked_mean(smooth_l1(pred_features, target_features), mask)
    agreement = jnp.asarray(agreement, bool)
    token, *metrics = _head_sums(pred_features, target_features, jax.lax.stop_gradient(head_weight), draft_ids, mask,
                                 agreement, token_loss, chunk)
    acceptance, top1, top3 = (jnp.where(agreement, value, jnp.nan) for value in metrics)
    loss = feature_weight * feature + token_weight * token
    return loss, LossTerms(feature=feature, token=token, acceptance=acceptance, top1=top1, top3=top3)
