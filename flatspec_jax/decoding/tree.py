"""Draft trees as static-shape arrays: node selection from the drafted pool, ancestry, depths, paths.

Shape legend: B batch, C candidate pool size, N draft nodes, T = N + 1 tree nodes, A the deepest
level (the most draft tokens one round can accept), V vocabulary.

Node 0 is the root: the last emitted token, whose target KV is not cached yet. Nodes 1..N are
draft tokens, numbered so that every parent precedes its children. A chain of gamma drafts is
the tree whose node j has parent j - 1, so chain and tree share the verification forward.

The EAGLE-2 reference (``topK_genrate``) draws a pool of candidates, each with a cumulative
draft log-probability, keeps the ``total_tokens`` best and links each to its parent:
:func:`build_tree` does that selection for a whole batch at once.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class DraftTree:
    """One draft tree per row.

    Attributes:
      tokens: [B, T] int32 token of each node; ``tokens[:, 0]`` is the root.
      parents: [B, T] int32 parent node of each node; the root is its own parent (0).
      depths: [B, T] int32 distance from the root, which is the node's position offset.
      ancestors: [B, T, T] bool, ``[b, j, i]`` True iff node i is node j or one of its ancestors:
        the attention mask of the tree among itself (the root is everyone's ancestor).
      paths: [B, T, A + 1] int32 nodes on the root-to-node path, indexed by depth, -1 past the
        node's own depth. ``paths[b, leaf]`` over the leaves are the reference's retrieve_indices.
    """

    tokens: Array
    parents: Array
    depths: Array
    ancestors: Array
    paths: Array

    @property
    def leaves(self) -> Array:
        """[B, T] bool: nodes that no other node names as its parent."""
        nodes = jnp.arange(self.tokens.shape[1])
        has_child = jnp.any(self.parents[:, 1:, None] == nodes[None, None, :], axis=1)
        return ~has_child


def tree_from_parents(tokens: Array, parents: Array, max_depth: int) -> DraftTree:
    """Completes a tree given each node's parent.

    Args:
      tokens: [B, T] node tokens (root first).
      parents: [B, T] parent node of each node (< its own index; ``parents[:, 0] == 0``), or
        [1, T] for one shape shared by all rows.
      max_depth: A, an upper bound on the depth of any node.
    """
    num_nodes = parents.shape[1]
    rows = jnp.arange(parents.shape[0])[:, None]
    eye = jnp.broadcast_to(jnp.eye(num_nodes, dtype=bool), (parents.shape[0], num_nodes, num_nodes))
    ancestors = eye
    # Each pass inherits the parent's ancestor row, reaching one level further up; A passes
    # reach the root from the deepest node. The root's parent is itself, so it stays {root}.
    for _ in range(max_depth):
        ancestors = eye | ancestors[rows, parents]
    depths = jnp.sum(ancestors, axis=-1, dtype=jnp.int32) - 1
    # paths[b, j, d] = the ancestor of j at depth d (each node has at most one).
    at_depth = ancestors[..., None] & (depths[:, None, :, None] == jnp.arange(max_depth + 1))  # [B, T, T, A+1]
    paths = jnp.where(jnp.any(at_depth, axis=2), jnp.argmax(at_depth, axis=2), -1).astype(jnp.int32)

    def per_row(x: Array) -> Array:
        return jnp.broadcast_to(x, tokens.shape[:1] + x.shape[1:])

    return DraftTree(tokens=tokens.astype(jnp.int32), parents=per_row(parents.astype(jnp.int32)),
                     depths=per_row(depths), ancestors=per_row(ancestors), paths=per_row(paths))


def chain_tree(root: Array, drafts: Array) -> DraftTree:
    """The tree of a draft chain: root [B], drafts [B, gamma] -> T = gamma + 1 nodes in a line."""
    gamma = drafts.shape[1]
    tokens = jnp.concatenate([root[:, None], drafts], axis=1)
    # One shape for every row, built once (not per row: it is a compile-time constant).
    parents = jnp.maximum(jnp.arange(gamma + 1) - 1, 0)[None]
    return tree_from_parents(tokens, parents, gamma)


def build_tree(root: Array, pool_scores: Array, pool_tokens: Array, pool_parents: Array, total_tokens: int,
               max_depth: int) -> DraftTree:
    """Keeps the ``total_tokens`` best candidates of the pool as the tree's draft nodes.

    Args:
      root: [B] root token.
      pool_scores: [B, C] cumulative draft log-probability of each candidate (its whole path).
      pool_tokens: [B, C] candidate tokens.
      pool_parents: [B, C] pool index of each candidate's parent, -1 for children of the root.
        A parent's pool index is below its children's (the pool is filled level by level).
      total_tokens: N, the number of draft nodes kept.
      max_depth: A, the number of levels in the pool.

    Returns:
      The tree with nodes 1..N = the kept candidates in increasing pool index (levels in order).
    """
    pool_size = pool_scores.shape[-1]
    pool_index = jnp.broadcast_to(jnp.arange(pool_size, dtype=jnp.int32), pool_scores.shape)
    # Best first, ties to the lower pool index. A child's score is its parent's plus a log-prob
    # <= 0, never above it, so this order ranks every parent before its children: a kept
    # node's parent is always kept (the reference's top-k leaves that to chance on ties).
    _, ranked = jax.lax.sort((-pool_scores, pool_index), num_keys=2)
    kept = jnp.sort(ranked[:, :total_tokens], axis=-1)  # [B, N]
    tokens = jnp.take_along_axis(pool_tokens, kept, axis=-1)
    parent_pool = jnp.take_along_axis(pool_parents, kept, axis=-1)
    # The parent's node number is 1 + its rank among the kept pool indices (kept is sorted).
    parent_rank = jnp.sum(kept[:, None, :] < parent_pool[:, :, None], axis=-1)
    parents = jnp.where(parent_pool < 0, 0, parent_rank + 1)
    zero = jnp.zeros_like(root, jnp.int32)[:, None]
    return tree_from_parents(jnp.concatenate([root[:, None].astype(jnp.int32), tokens], axis=1),
                             jnp.concatenate([zero, parents], axis=1), max_depth)
