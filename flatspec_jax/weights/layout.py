"""How our NNX parameters correspond to Hugging Face (PyTorch) tensors, in both directions.

HF stores linear weights ``[out, in]``; we store them ``[in, out]`` with the head axes split
out (q: ``[D, N, H]``, o: ``[N, H, D]``), so sharding rules can name heads. The table is
shared by the target loader and by the EAGLE export/import, which use the same per-layer
key names (``self_attn.q_proj.weight`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from flatspec_jax.weights.errors import WeightsError

Kind = Literal["identity", "linear", "heads_in", "heads_out", "heads_bias"]


@dataclasses.dataclass(frozen=True)
class LayerTensor:
    """One tensor of a decoder layer: its NNX path inside the layer and its HF key suffix."""

    nnx_path: tuple[str, ...]
    hf_suffix: str
    kind: Kind


LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor(("input_layernorm", "weight"), "input_layernorm.weight", "identity"),
    LayerTensor(("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", "identity"),
    LayerTensor(("self_attn", "q_proj"), "self_attn.q_proj.weight", "heads_in"),
    LayerTensor(("self_attn", "k_proj"), "self_attn.k_proj.weight", "heads_in"),
    LayerTensor(("self_attn", "v_proj"), "self_attn.v_proj.weight", "heads_in"),
    LayerTensor(("self_attn", "o_proj"), "self_attn.o_proj.weight", "heads_out"),
    LayerTensor(("self_attn", "q_bias"), "self_attn.q_proj.bias", "heads_bias"),
    LayerTensor(("self_attn", "k_bias"), "self_attn.k_proj.bias", "heads_bias"),
    LayerTensor(("self_attn", "v_bias"), "self_attn.v_proj.bias", "heads_bias"),
    LayerTensor(("mlp", "gate_proj"), "mlp.gate_proj.weight", "linear"),
    LayerTensor(("mlp", "up_proj"), "mlp.up_proj.weight", "linear"),
    LayerTensor(("mlp", "down_proj"), "mlp.down_proj.weight", "linear"),
)


def hf_to_nnx(kind: Kind, tensor: np.ndarray, nnx_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Converts one HF tensor to our layout, checking it has the shape the model expects.

    Raises:
      WeightsError: naming the tensor when the shapes disagree.
    """
    if tensor.size != int(np.prod(nnx_shape)):
        raise _shape_error(kind, name, tensor, nnx_shape)
    if kind == "identity":
        out = tensor
    elif kind == "linear":
        out = tensor.T
    elif kind == "heads_in":  # [X*H, D] -> [D, X, H]
        out = tensor.T.reshape(tensor.shape[1], *nnx_shape[1:]) if tensor.ndim == 2 else tensor
    elif kind == "heads_out":  # [D, N*H] -> [N, H, D]
        out = tensor.T.reshape(*nnx_shape[:2], tensor.shape[0]) if tensor.ndim == 2 else tensor
    else:  # heads_bias: [X*H] -> [X, H]
        out = tensor.reshape(nnx_shape) if tensor.size == int(np.prod(nnx_shape)) else tensor
    if tuple(out.shape) != tuple(nnx_shape):
        raise _shape_error(kind, name, tensor, nnx_shape)
    return out


def _shape_error(kind: Kind, name: str, tensor: np.ndarray, nnx_shape: tuple[int, ...]) -> WeightsError:
    # The HF shape of nnx_shape, read off a zero-stride view (nnx_to_hf only moves axes: nothing is allocated).
    expected = nnx_to_hf(kind, np.broadcast_to(np.bool_(False), nnx_shape)).shape
    return WeightsError(f"tensor {name}: shape {tuple(tensor.shape)} does not fit the model, which expects "
                        f"{tuple(expected)} (HF [out, in] layout)")


def nnx_to_hf(kind: Kind, array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hf_to_nnx`: our layout -> HF ``[out, in]`` layout."""
    if kind == "identity":
        return array
    if kind == "linear":
        return array.T
    if kind == "heads_in":  # [D, X, H] -> [X*H, D]
        return array.reshape(array.shape[0], -1).T
    if kind == "heads_out":  # [N, H, D] -> [D, N*H]
        return array.reshape(-1, array.shape[-1]).T
    return array.reshape(-1)
