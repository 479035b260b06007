"""Accepting draft tokens against the target: greedy and lossless sampling, for chains and trees.

Shape legend: B batch, gamma chain drafts, T tree nodes (root first), A the deepest level, V vocab.

Every verifier returns a :class:`Verdict`: how many drafts were accepted, along which path of
the tree, and the bonus token the target emits after them. The target logits come from one
forward over [root, drafts...]: the logits at node j give the target's distribution of the
token after j's path.

Sampling is lossless: the emitted tokens are distributed exactly as if sampled from the
target one by one with the same temperature / top-p.
  * Chain (sampled drafts, Leviathan et al.): accept draft x with probability
    min(1, p(x) / q(x)); at the first rejection sample from norm(max(0, p - q)); if every
    draft is accepted, sample the bonus from p after the last one.
  * Tree (EAGLE-2, deterministic top-k drafts, so q is a point mass): walk the children of
    the current node in node order; accept child x with probability p'(x), else set
    p' = norm(max(0, p' - delta_x)) (x's mass removed) and try the next sibling. The bonus
    comes from p' at the node where the walk stopped: the residual if children were
    rejected there, the fresh target distribution otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flatspec_jax.decoding.sampling import SamplingSettings, warped_probs
from flatspec_jax.decoding.tree import DraftTree

Array = jax.Array


class Verdict(NamedTuple):
    """accepted: [B] accepted draft tokens a (bonus excluded); path: [B, A + 1] tree nodes of the
    root and the accepted drafts by depth, -1 past a; bonus: [B] the target's token after them."""

    accepted: Array
    path: Array
    bonus: Array


def residual(p: Array, q: Array) -> Array:
    """max(0, p - q), unnormalised: what is left of p once proposals from q were rejected."""
    return jnp.maximum(p - q, 0.0)


def _chain_path(accepted: Array, gamma: int) -> Array:
    """[B] accepted -> [B, gamma + 1] nodes 0..a then -1: a chain's node j is at depth j."""
    nodes = jnp.arange(gamma + 1, dtype=jnp.int32)
    return jnp.where(nodes[None, :] <= accepted[:, None], nodes[None, :], -1)


def _leading_true(flags: Array) -> Array:
    """[B, n] bool -> [B] length of the all-True prefix."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=-1), axis=-1)


def _proposed(drafts: Array, proposed: Array | None) -> Array:
    """[B, gamma] bool: draft j was proposed (j < proposed[b]; all when ``proposed`` is None)."""
    if proposed is None:
        return jnp.ones(drafts.shape, bool)
    return jnp.arange(drafts.shape[1])[None, :] < proposed[:, None]


def verify_greedy_chain(drafts: Array, target_logits: Array, proposed: Array | None = None) -> Verdict:
    """Greedy chain: accept drafts while they equal the target's argmax.

    Args:
      drafts: [B, gamma]; target_logits: [B, gamma + 1, V] at [root, drafts...], read only up
        to each row's last proposed draft; proposed: [B] how many leading drafts each row
        proposes (None: all gamma).
    """
    batch, gamma = drafts.shape
    choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, gamma + 1]
    accepted = _leading_true((drafts == choice[:, :-1]) & _proposed(drafts, proposed))
    bonus = choice[jnp.arange(batch), accepted]
    return Verdict(accepted, _chain_path(accepted, gamma), bonus)


def verify_sampling_chain(key: Array, drafts: Array, draft_probs: Array, target_logits: Array,
                          sampling: SamplingSettings, proposed: Array | None = None) -> Verdict:
    """Speculative sampling of a chain whose drafts were sampled from ``draft_probs``.

    Args:
      drafts: [B, gamma] drafted tokens; draft_probs: [B, gamma, V] the (warped) distribution
        q each was sampled from; target_logits: [B, gamma + 1, V] at [root, drafts...], read
        only up to each row's last proposed draft; proposed: [B] how many leading drafts each
        row proposes (None: all gamma). Past them nothing was proposed: the bonus comes from p.
    """
    batch, gamma = drafts.shape
    accept_key, bonus_key = jax.random.split(key)
    rows = jnp.arange(batch)
    p = warped_probs(target_logits, sampling)  # [B, gamma + 1, V]
    p_draft = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(accept_key, (batch, gamma))
    offered = _proposed(drafts, proposed)
    accepted = _leading_true((u * q_draft < p_draft) & offered)  # u < p/q; q > 0 at a token drawn from q
    # Where no draft was proposed (after the last proposed one) q is "nothing": max(0, p - 0) is p.
    q_padded = jnp.concatenate([jnp.where(offered[..., None], draft_probs, 0.0),
                                jnp.zeros_like(draft_probs[:, :1])], axis=1)
    p_stop, q_stop = p[rows, accepted], q_padded[rows, accepted]
    left = residual(p_stop, q_stop)
    # Zero residual means p <= q everywhere, i.e. p == q, where rejection has probability 0;
    # only rounding gets here, and p is then the right distribution.
    left = jnp.where(jnp.sum(left, axis=-1, keepdims=True) > 0, left, p_stop)
    bonus = jax.random.categorical(bonus_key, jnp.log(left), axis=-1).astype(jnp.int32)
    return Verdict(accepted, _chain_path(accepted, gamma), bonus)


def _deepest_path(tree: DraftTree, last: Array) -> tuple[Array, Array]:
    """[B] last accepted node -> accepted count (its depth) and its root path [B, A + 1]."""
    rows = jnp.arange(last.shape[0])
    return tree.depths[rows, last], tree.paths[rows, last]


def verify_greedy_tree(tree: DraftTree, target_logits: Array) -> Verdict:
    """Greedy tree: the longest root path whose every draft equals the target's argmax.

    Siblings carry distinct tokens (top-k of one distribution), so at most one child of a node
    matches and the accepted path is unique: the target's own greedy continuation.

    Args:
      tree: the draft tree; target_logits: [B, T, V] at its nodes.
    """
    batch = tree.tokens.shape[0]
    rows = jnp.arange(batch)[:, None]
    choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, T]
    match = tree.tokens == choice[rows, tree.parents]
    match = match.at[:, 0].set(True)
    accepted_node = match
    for _ in range(tree.paths.shape[-1] - 1):  # one level further down per pass
        accepted_node = match & accepted_node[rows, tree.parents]
    last = jnp.argmax(jnp.where(accepted_node, tree.depths, -1), axis=-1).astype(jnp.int32)
    accepted, path = _deepest_path(tree, last)
    return Verdict(accepted, path, choice[rows[:, 0], last])


def verify_sampling_tree(key: Array, tree: DraftTree, target_logits: Array, sampling: SamplingSettings) -> Verdict:
    """EAGLE-2 recursive rejection sampling over a tree of deterministic drafts.

    Nodes are visited in index order (parents precede children, siblings in order), keeping
    the current node and p', the unnormalised residual target distribution at it. A node whose
    parent is the current node is tried: accepted with probability p'(x) / sum(p'); a token
    holding all the remaining mass is always accepted (exactly, despite rounding). A node's
    distribution is warped (temperature, top-p) only when some row accepts it: at most once per
    accepted depth, not once per node.

    Args:
      tree: the draft tree; target_logits: [B, T, V] at its nodes.
    """
    batch, num_nodes = tree.tokens.shape
    accept_key, bonus_key = jax.random.split(key)
    rows = jnp.arange(batch)
    u = jax.random.uniform(accept_key, (batch, num_nodes))

    def visit(carry, node):
        current, left = carry
        index, token, parent, logits_node, u_node = node
        tried = parent == current
        p_token = left[rows, token]
        total = jnp.sum(left, axis=-1)
        accept = tried & ((u_node * total < p_token) | (p_token >= total))
        reject = tried & ~accept
        rejected = residual(left, total[:, None] * jax.nn.one_hot(token, left.shape[-1], dtype=left.dtype))
        p_node = jax.lax.cond(jnp.any(accept), lambda: warped_probs(logits_node, sampling), lambda: left)
        left = jnp.where(accept[:, None], p_node, jnp.where(reject[:, None], rejected, left))
        return (jnp.where(accept, index, current), left), None

    nodes = (jnp.arange(1, num_nodes, dtype=jnp.int32), tree.tokens[:, 1:].T, tree.parents[:, 1:].T,
             jnp.moveaxis(target_logits[:, 1:], 1, 0), u[:, 1:].T)
    root = warped_probs(target_logits[:, 0], sampling)  # [B, V]
    (last, left), _ = jax.lax.scan(visit, (jnp.zeros((batch,), jnp.int32), root), nodes)
    bonus = jax.random.categorical(bonus_key, jnp.log(left), axis=-1).astype(jnp.int32)
    accepted, path = _deepest_path(tree, last)
    return Verdict(accepted, path, bonus)
