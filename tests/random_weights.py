"""Random NNX modules for the speculative-decoding tests, drawn in numpy (no JAX init to compile)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.weights.arch import ArchSpec


def random_module(factory: Callable[[], nnx.Module], seed: int, lm_head_scale: float = 1.0) -> nnx.Module:
    """The module ``factory`` builds, with norms 1, embeddings N(0, 1) (O(1): context-dependent
    outputs), the LM head U(-1/sqrt(D), 1/sqrt(D)) times ``lm_head_scale`` and the rest
    U(-1/sqrt(D), 1/sqrt(D)), where D is the module's ``arch.hidden_size``."""
    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    bound = abstract.arch.hidden_size ** -0.5

    def draw(path, leaf):
        name = "/".join(str(part) for part in path)
        if "norm" in name:
            return np.ones(leaf.shape, np.float32)
        if "embed_tokens" in name:
            return rng.normal(0.0, 1.0, leaf.shape).astype(np.float32)
        scale = lm_head_scale if "lm_head" in name else 1.0
        return (scale * rng.uniform(-bound, bound, leaf.shape)).astype(np.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def agreeing_head(arch: ArchSpec, seed: int) -> nnx.Module:
    """An EAGLE head built to predict the target's next token from the current one: fc passes the
    token embedding through (scaled by 4, for peaked draft distributions) and its decoder layer
    adds nothing, so its logits are the target's LM head applied to the embedding. Where the
    embedding dominates the target's residual stream (O(1) embeddings) it accepts most drafts."""
    head = random_module(lambda: create_eagle_head(arch, 1), seed=seed)
    d = arch.hidden_size
    head.fc[...] = 4 * np.concatenate([np.eye(d), np.zeros((d, d))]).astype(np.float32)
    head.fc_bias[...] = np.zeros((d,), np.float32)
    for weight in (head.first_layer.self_attn.o_proj, head.first_layer.mlp.down_proj):
        weight[...] = np.zeros(weight[...].shape, np.float32)
    return head
