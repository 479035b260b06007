"""Jitted EAGLE speculative decoding (chain or EAGLE-2 tree drafts) with per-row acceptance.

Shape legend: B batch rows, P padded prompt length, M max new tokens, S target cache slots,
D model dim, A the most drafts one round can accept, T tokens per verification forward.

Like :func:`flatspec_jax.decoding.autoregressive.generate`, the whole generation is one
``jax.lax.while_loop`` inside one ``jax.jit`` with static shapes; every row carries its own
committed length, so rows accept different numbers of drafts in the same round.

State between rounds, per row: n committed tokens (prompt + emitted, except the last emitted
token) whose target KV fills slots 0..n-1; the root, i.e. the last emitted token, at position
n; the draft cache holding pairs 0..n-1; and the head's prediction of the root's feature.
A round:
  1. drafts from that prediction: a chain of gamma tokens (with ``min_confidence``, only while
     the draft is confident: each row proposes 0..gamma), or an EAGLE-2 tree;
  2. runs the target once over [root, drafts...] at positions n + depth, with the tree's
     ancestry (causal for a chain) as mask; this writes slots n..n+T-1 (with
     ``min_confidence``, T is 1 + the batch's most proposed drafts, picked at run time);
  3. verifies (greedy or lossless sampling), emitting the a accepted drafts and a bonus token;
  4. compacts the target cache to the accepted path (trees only: a chain's path is in place);
  5. catches the draft up: pairs (f_{n+i}, x_{n+i+1}) for i = 0..a, with the target's features
     of the root and accepted nodes, padded to A + 1 pairs. Its last prediction is the next
     round's starting point, so the draft needs no catch-up at the start of a round. The
     prompt's prefill ends the same way (pairs 0..P-1, the last one with the first token).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flatspec_jax.decoding.autoregressive import GenerationSettings, is_eos, prefill
from flatspec_jax.decoding.commit import append_tokens, compact_cache, emitted_tokens
from flatspec_jax.decoding.draft_vocab import DraftVocab
from flatspec_jax.decoding.drafting import catch_up, draft_chain, draft_tree
from flatspec_jax.decoding.sampling import sample
from flatspec_jax.decoding.tree import DraftTree, chain_tree
from flatspec_jax.decoding.verify import (verify_greedy_chain, verify_greedy_tree, verify_sampling_chain,
                                          verify_sampling_tree)
from flatspec_jax.models.llama import KVCache, Llama, ModelOutput
from flatspec_jax.models.masks import beside_cache_mask, cached_mask

Array = jax.Array

METHODS = ("chain", "tree")


@dataclasses.dataclass(frozen=True)
class SpeculativeSettings:
    """Static settings of one speculative decoding program.

    Attributes:
      generation: max_new_tokens, cache_length (target cache slots), eos_ids, sampling, pad_id,
        as for autoregressive decoding.
      method: "chain" (gamma drafts in a line) or "tree" (EAGLE-2 dynamic tree).
      gamma: chain drafts per round.
      depth: tree expansion steps after the root's (the reference's ``depth``): the tree has
        up to depth + 1 levels.
      top_k: tree children per expanded node and beams per level.
      total_tokens: draft nodes in the tree, root excluded (``decode.total_tokens`` and the
        reference's ``total_token`` count the root: the config's 63 is 62 here).
      min_confidence: chain only: a row proposes its drafts while the draft's confidence (its
        probability of the earlier drafts times its top probability for the next; see
        :func:`~flatspec_jax.decoding.drafting.draft_chain`) reaches this, and each round
        verifies the batch's longest proposed chain; 0 = always gamma.
    """

    generation: GenerationSettings
    method: str = "tree"
    gamma: int = 4
    depth: int = 5
    top_k: int = 8
    total_tokens: int = 62
    min_confidence: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.gamma < 1 or self.depth < 1 or self.top_k < 1:
            raise ValueError("gamma, depth and top_k must be positive")
        pool = self.top_k + self.depth * self.top_k ** 2
        if self.method == "tree" and not 1 <= self.total_tokens <= pool:  # a chain reads none of the tree's
            raise ValueError(f"total_tokens must be in 1..{pool} (top_k + depth * top_k^2)")
        if not 0 <= self.min_confidence < 1 or (self.min_confidence and self.method != "chain"):
            raise ValueError(f"min_confidence must be in [0, 1) and 0 unless method is 'chain', got "
                             f"{self.min_confidence}")

    @property
    def max_accept(self) -> int:
        """A: the most drafts one round can accept (the deepest level of a tree)."""
        return self.gamma if self.method == "chain" else min(self.depth + 1, self.total_tokens)

    @property
    def verify_tokens(self) -> int:
        """T: tokens in each target verification forward, the root included. A row keeps going
        while committed + T <= cache_length."""
        return 1 + (self.gamma if self.method == "chain" else self.total_tokens)

    @property
    def draft_cache_length(self) -> int:
        """Draft cache slots: the committed pairs plus the drafting scratch of the last round
        that fits the target cache (a tree's depth * top_k beams may outnumber its T tokens)."""
        if self.method == "chain":
            return self.generation.cache_length
        return self.generation.cache_length + max(0, self.depth * self.top_k - self.verify_tokens)


class SpeculativeGeneration(NamedTuple):
    """Result of :func:`speculative_generate`.

    Attributes:
      tokens: [B, M] generated ids (EOS included, ``pad_id`` after), as in ``Generation``.
      lengths: [B] generated tokens, the prefill's first token included.
      rounds: [B] verification forwards of the target while the row was active; like
        ``Generation.target_calls`` it excludes the prefill.
      accept_counts: [B, A + 1] histogram over the row's rounds of the accepted draft count
        (bonus excluded), counted before any cut at EOS or max_new_tokens.
      exhausted_counts: [B, A + 1] the same histogram over the rounds whose accepted path ended
        where nothing more was proposed: a chain that accepted every draft it proposed (all
        gamma, or fewer with ``min_confidence``), a tree path that reached a leaf.
      drafts: [B] drafts proposed for verification over the row's rounds.
    """

    tokens: Array
    lengths: Array
    rounds: Array
    accept_counts: Array
    exhausted_counts: Array
    drafts: Array

    def tau(self) -> Array:
        """[B] tokens emitted per verification forward: (lengths - 1) / rounds.

        The prefill's token is not a round's, so tau is 1 for autoregressive decoding
        ((lengths - 1) / target_calls) and the reference's mean acceptance length for EAGLE
        (up to the cut at EOS / max_new_tokens in the last round). 0 for rows with no round.
        """
        return jnp.where(self.rounds > 0, (self.lengths - 1) / jnp.maximum(self.rounds, 1), 0.0)

    def acceptance_rates(self) -> np.ndarray:
        """[A] over all rows: :func:`acceptance_by_depth` of the summed histograms."""
        return acceptance_by_depth(np.sum(np.asarray(self.accept_counts), axis=0),
                                   np.sum(np.asarray(self.exhausted_counts), axis=0))


def acceptance_by_depth(accept_counts: np.ndarray, exhausted_counts: np.ndarray) -> np.ndarray:
    """Acceptance of the drafts proposed at each depth (host values).

    Args:
      accept_counts: [A + 1] rounds by accepted drafts a.
      exhausted_counts: [A + 1] of those, the rounds that proposed nothing after their a-th draft
        (``SpeculativeGeneration.exhausted_counts``).

    Returns:
      [A] float64, d = 1..A: P(a depth-d draft is accepted | depth d - 1 was accepted and a
      depth-d draft was proposed after it) = rounds accepting >= d / (rounds accepting >= d - 1
      less those that ended there for want of a proposal); 0 where no depth-d draft was proposed.
      Without ``min_confidence`` a chain proposes every depth, so this is P(d | d - 1).
    """
    reached = np.cumsum(np.asarray(accept_counts)[::-1])[::-1].astype(np.float64)  # rounds accepting >= d, d = 0..A
    proposed = proposed_by_depth(accept_counts, exhausted_counts).astype(np.float64)
    return np.divide(reached[1:], proposed, out=np.zeros(len(reached) - 1), where=proposed > 0)


def proposed_by_depth(accept_counts: np.ndarray, exhausted_counts: np.ndarray) -> np.ndarray:
    """[A] int64, d = 1..A: the rounds that verified a depth-d draft (accepted d - 1 drafts and
    proposed another), the denominators of :func:`acceptance_by_depth`; arguments as there."""
    reached = np.cumsum(np.asarray(accept_counts, np.int64)[::-1])[::-1]  # rounds accepting >= d, d = 0..A
    return reached[:-1] - np.asarray(exhausted_counts, np.int64)[:-1]


@flax.struct.dataclass
class _LoopState:
    tokens: Array  # [B, M]
    lengths: Array  # [B]
    done: Array  # [B] bool
    rounds: Array  # [B]
    accept_counts: Array  # [B, A + 1]
    exhausted_counts: Array  # [B, A + 1]
    drafts: Array  # [B]
    root: Array  # [B] last emitted token, at position `committed`
    committed: Array  # [B] n: target cache slots and draft pairs holding the committed sequence
    draft_hidden: Array  # [B, D] the head's prediction of the root's feature
    target_cache: KVCache
    draft_cache: KVCache
    key: Array


@functools.partial(jax.jit, static_argnames=("target_graphdef", "head_graphdef", "settings"))
def speculative_generate(target_graphdef: nnx.GraphDef, target_params: nnx.State, head_graphdef: nnx.GraphDef,
                         head_params: nnx.State, prompts: Array, prompt_lengths: Array, key: Array,
                         settings: SpeculativeSettings, draft_ids: Array | None = None) -> SpeculativeGeneration:
    """Generates up to ``max_new_tokens`` per row with EAGLE drafts verified by the target.

    Greedy output equals :func:`~flatspec_jax.decoding.autoregressive.generate`'s token for
    token; sampled output has the same distribution. A row stops at EOS, at max_new_tokens, or
    when the target cache cannot hold another round (committed + T > cache_length, earlier than
    autoregressive decoding, which needs one free slot).

    Args:
      target_graphdef, target_params: the target ``Llama`` split with ``nnx.split``.
      head_graphdef, head_params: the ``EagleHead`` split with ``nnx.split``.
      prompts: [B, P] right-padded prompt ids; prompt_lengths: [B] their true lengths (>= 1).
      key: PRNG key (unused when greedy).
      draft_ids: [N] ascending token ids the draft may propose (see
        :mod:`~flatspec_jax.decoding.draft_vocab`); None: the whole vocabulary.
    """
    target = nnx.merge(target_graphdef, target_params)
    head = nnx.merge(head_graphdef, head_params)
    vocab = None if draft_ids is None else DraftVocab.of(target, draft_ids)
    gen = settings.generation
    sampling = gen.sampling
    batch, prompt_width = prompts.shape
    max_accept, verify_tokens = settings.max_accept, settings.verify_tokens
    rows = jnp.arange(batch)
    prompt_lengths = prompt_lengths.astype(jnp.int32)

    target_cache = target.empty_cache(batch, gen.cache_length)
    prefilled, last_logits = prefill(target, prompts, prompt_lengths, target_cache)
    key, first_key = jax.random.split(key)
    first = sample(first_key, last_logits, sampling)
    # Draft prefill: pair t is (f_t, x_{t+1}); the last real pair's next token is the first token.
    shifted = jnp.concatenate([prompts[:, 1:], jnp.full((batch, 1), gen.pad_id, prompts.dtype)], axis=1)
    next_tokens = jnp.where(jnp.arange(prompt_width)[None, :] == prompt_lengths[:, None] - 1, first[:, None], shifted)
    draft_cache = KVCache.zeros(head.arch, head.arch.num_layers, batch, settings.draft_cache_length, head.dtype)
    draft_hidden, draft_cache = catch_up(head, target, draft_cache, prefilled.hidden, next_tokens, prompt_lengths,
                                         jnp.zeros((batch,), jnp.int32))

    state = _LoopState(
        tokens=jnp.full((batch, gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(first),
        lengths=jnp.ones((batch,), jnp.int32),
        done=(is_eos(first, gen.eos_ids) | (gen.max_new_tokens <= 1)
              | (prompt_lengths + verify_tokens > gen.cache_length)),
        rounds=jnp.zeros((batch,), jnp.int32),
        accept_counts=jnp.zeros((batch, max_accept + 1), jnp.int32),
        exhausted_counts=jnp.zeros((batch, max_accept + 1), jnp.int32), drafts=jnp.zeros((batch,), jnp.int32),
        root=first, committed=prompt_lengths, draft_hidden=draft_hidden,
        target_cache=prefilled.cache, draft_cache=draft_cache, key=key)

    def cond(s: _LoopState) -> Array:
        return ~jnp.all(s.done)

    def round_(s: _LoopState) -> _LoopState:
        key, draft_key, verify_key = jax.random.split(s.key, 3)
        n = s.committed
        active = ~s.done
        if settings.method == "chain":
            chain = draft_chain(head, target, s.draft_cache, s.draft_hidden, n, active, draft_key, settings.gamma,
                                sampling, vocab, settings.min_confidence)
            tree, draft_cache, proposed = chain_tree(s.root, chain.tokens), chain.cache, chain.proposed
            out = verify_forward(target, tree, n, s.target_cache, gen.cache_length,
                                 jnp.max(proposed) if settings.min_confidence else None)
            verdict = (verify_greedy_chain(chain.tokens, out.logits, proposed) if sampling.greedy else
                       verify_sampling_chain(verify_key, chain.tokens, chain.probs, out.logits, sampling, proposed))
            target_cache = out.cache
        else:
            tree, draft_cache = draft_tree(head, target, s.draft_cache, s.draft_hidden, s.root, n, settings.top_k,
                                           settings.depth, settings.total_tokens, vocab)
            proposed = jnp.full((batch,), settings.total_tokens, jnp.int32)
            out = verify_forward(target, tree, n, s.target_cache, gen.cache_length)
            verdict = (verify_greedy_tree(tree, out.logits) if sampling.greedy else
                       verify_sampling_tree(verify_key, tree, out.logits, sampling))
            target_cache = compact_cache(out.cache, n, verdict.path, verdict.accepted)

        # Nothing was proposed after the accepted path's end: a leaf, or a chain's last proposal.
        exhausted = tree.leaves[rows, verdict.path[rows, verdict.accepted]] | (verdict.accepted >= proposed)
        accepted_hot = active[:, None] * jax.nn.one_hot(verdict.accepted, max_accept + 1, dtype=jnp.int32)
        emitted = emitted_tokens(tree.tokens, verdict, gen.pad_id)  # [B, A + 1] = x_{n+1} .. x_{n+a+1}
        tokens, lengths, hit_eos = append_tokens(s.tokens, s.lengths, emitted, verdict.accepted + 1, active,
                                                 gen.eos_ids)
        features = out.hidden[rows[:, None], jnp.maximum(verdict.path, 0)]  # f_n .. f_{n+a}
        draft_hidden, draft_cache = catch_up(head, target, draft_cache, features, emitted, verdict.accepted + 1, n)
        committed = jnp.where(active, n + verdict.accepted + 1, n)
        done = (s.done | hit_eos | (lengths >= gen.max_new_tokens)
                | (committed + verify_tokens > gen.cache_length))
        return _LoopState(
            tokens=tokens, lengths=lengths, done=done, rounds=s.rounds + active,
            accept_counts=s.accept_counts + accepted_hot,
            exhausted_counts=s.exhausted_counts + exhausted[:, None] * accepted_hot,
            drafts=s.drafts + active * proposed,
            root=jnp.where(active, verdict.bonus, s.root), committed=committed,
            draft_hidden=jnp.where(active[:, None], draft_hidden, s.draft_hidden),
            target_cache=target_cache, draft_cache=draft_cache, key=key)

    state = jax.lax.while_loop(cond, round_, state)
    return SpeculativeGeneration(state.tokens, state.lengths, state.rounds, state.accept_counts,
                                 state.exhausted_counts, state.drafts)


def verify_forward(target: Llama, tree: DraftTree, committed: Array, cache: KVCache, cache_length: int,
                   width: Array | None = None) -> ModelOutput:
    """The target's forward over [root, drafts...] at positions n + depth, the tree's ancestry
    (causal for a chain) as mask, writing cache slots n .. n + T - 1.

    Args:
      tree: T nodes per row; committed: [B] n.
      width: None runs all T nodes; a scalar w (chains only, where the first nodes are a
        prefix of the chain) runs only the first w + 1, choosing among T compiled widths at run
        time (``lax.switch``: one branch runs), and pads hidden and logits back to T with zeros.
        The branches only read the cache and the new keys and values are written after the
        switch: a branch writing the cache made XLA copy all of it into every call.
    """
    num_nodes = tree.tokens.shape[1]
    if width is None:
        return target(tree.tokens, committed[:, None] + tree.depths,
                      cached_mask(committed, tree.ancestors, cache_length), cache, committed)

    def run(count: int) -> ModelOutput:
        out = target(tree.tokens[:, :count], committed[:, None] + tree.depths[:, :count],
                     beside_cache_mask(committed, tree.ancestors[:, :count, :count], cache_length), cache,
                     write_cache=False)
        pad = ((0, 0), (0, num_nodes - count), (0, 0))
        # [L, B, K, count, H] new keys and values: padded with zeros, written to scratch slots past the nodes
        new_pad = ((0, 0), (0, 0), (0, 0), (0, num_nodes - count), (0, 0))
        return ModelOutput(jnp.pad(out.hidden, pad), jnp.pad(out.logits, pad),
                           out.cache.map(lambda new: jnp.pad(new, new_pad)))

    out = jax.lax.switch(width, [functools.partial(run, count) for count in range(1, num_nodes + 1)])
    return out._replace(cache=cache.write(out.cache, committed))
