"""A reduced draft vocabulary: the draft ranks only the most frequent tokens (as in FR-Spec).

The EAGLE head borrows the target's LM head, so every draft step multiplies its prediction by
the whole [V, D] matrix and ranks V logits; for SmolLM2 (V = 49152, D = 576) that matrix is
most of the draft's weights and most of its time at batch 1. Restricting the draft to the N
tokens that are most frequent in the run's samples makes that N / V of the work. Decoding
stays lossless: the target still verifies every draft against its full distribution, greedy
or sampled, and a token outside the subset simply cannot be drafted (it comes as the bonus
token when the target picks it). What it costs is acceptance on rare tokens, which are rarely
the draft's right guess anyway.

Shape legend: N draft vocabulary size, D model dim, V the target's vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flatspec_jax.models.llama import Llama, lm_head_logits

Array = jax.Array


def frequent_token_ids(tokens: np.ndarray, vocab_size: int, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` token ids a reduced draft vocabulary keeps, ascending, as [N] int32.

    Ranks ids by their count in ``tokens`` (descending), ties by id (ascending: in BPE
    vocabularies lower ids are earlier, i.e. more frequent, merges), and always keeps
    ``always`` (e.g. the EOS ids) in place of the lowest-ranked picks.

    Args:
      tokens: [T] token ids of the samples to count (any integer dtype).
      vocab_size: V; every id in ``tokens`` and ``always`` must be below it.
      size: N, in ``[len(set(always)), V]``.

    Raises:
      ValueError: naming the offending argument.
    """
    required = np.unique(np.asarray(always, np.int64))
    if not len(required) <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size {size} must be between {len(required)} (the ids always kept) "
                         f"and the vocabulary size {vocab_size}")
    tokens = np.asarray(tokens).ravel()
    for name, ids in (("tokens", tokens), ("always", required)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside [0, {vocab_size})")
    counts = np.bincount(tokens, minlength=vocab_size)
    ranked = np.lexsort((np.arange(vocab_size), -counts))  # last key first: count desc, then id asc
    optional = ranked[~np.isin(ranked, required)][:size - len(required)]
    return np.sort(np.concatenate([required, optional])).astype(np.int32)


class DraftVocab(NamedTuple):
    """The ids a draft may propose and their LM-head rows.

    Attributes:
      ids: [N] int32 token ids, ascending.
      weight: [N, D] the target's LM-head rows of those ids.
    """

    ids: Array
    weight: Array

    @classmethod
    def of(cls, target: Llama, ids: Array) -> "DraftVocab":
        """Gathers the LM-head rows of ``ids`` [N] (once per generation, outside the decoding loop)."""
        return cls(ids.astype(jnp.int32), jnp.take(target.lm_head_weight(), ids, axis=0))


def draft_logits(target: Llama, hidden: Array, vocab: DraftVocab | None) -> Array:
    """[..., D] draft predictions -> [..., N] float32 logits over the draft vocabulary (N = V when None)."""
    return target.logits(hidden) if vocab is None else lm_head_logits(hidden, vocab.weight)


def token_ids(indices: Array, vocab: DraftVocab | None) -> Array:
    """Indices into the draft vocabulary -> token ids (the identity when None)."""
    return indices if vocab is None else vocab.ids[indices]


def full_vocab_probs(probs: Array, vocab: DraftVocab | None, vocab_size: int) -> Array:
    """[..., N] probabilities over the draft vocabulary -> [..., V], zero outside it."""
    if vocab is None:
        return probs
    return jnp.zeros((*probs.shape[:-1], vocab_size), probs.dtype).at[..., vocab.ids].set(probs)


def vocab_size(target: Llama, vocab: DraftVocab | None) -> int:
    """N: how many tokens the draft ranks."""
    return target.arch.vocab_size if vocab is None else vocab.ids.shape[0]
