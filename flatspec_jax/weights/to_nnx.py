"""Loads a checkpoint into the NNX target model, placing each tensor straight onto its shards.

The model is built abstractly (``nnx.eval_shape``: no memory), then every parameter is
read from disk, converted to our layout and sent to the devices with its rule-given
sharding, one tensor at a time: no device ever holds a replicated copy of the whole model
unless the rules replicate it, and host memory peaks at one (stacked) tensor.
"""

from __future__ import annotations

import logging
import time

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flatspec_jax.models.llama import Llama, create_model
from flatspec_jax.sharding import ShardingRules, host_to_global, logical_axes_of
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.layout import LAYER_TENSORS, hf_to_nnx
from flatspec_jax.weights.reader import CheckpointReader, open_checkpoint

log = logging.getLogger(__name__)

_TOP_LEVEL = {
    ("embed_tokens",): "model.embed_tokens.weight",
    ("lm_head",): "lm_head.weight",
    ("norm", "weight"): "model.norm.weight",
}
_LAYER_BY_PATH = {t.nnx_path: t for t in LAYER_TENSORS}


def path_names(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain names (('layers', 'layers', 'mlp', 'up_proj'), ...)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


_WEIGHT_DTYPES = frozenset(np.dtype(name) for name in ("float64", "float32", "float16", ml_dtypes.bfloat16))
"""What a weight may be stored as: codes of a quantised format (float8, integers) mean nothing without
their scales, which this loader does not read."""


def _weight(reader: CheckpointReader, key: str) -> np.ndarray:
    tensor = reader.get(key)
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise WeightsError(f"tensor {key} is stored as {tensor.dtype}, the codes of a quantised checkpoint; "
                           "only float32, float16 and bfloat16 weights load (use the unquantised checkpoint)")
    return tensor


def _host_tensor(reader: CheckpointReader, names: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    if names in _TOP_LEVEL:
        key = _TOP_LEVEL[names]
        return hf_to_nnx("identity", _weight(reader, key), shape, key)
    if names[:2] == ("layers", "layers") and names[2:] in _LAYER_BY_PATH:
        spec = _LAYER_BY_PATH[names[2:]]
        return np.stack([
            hf_to_nnx(spec.kind, _weight(reader, f"model.layers.{i}.{spec.hf_suffix}"), shape[1:],
                      f"model.layers.{i}.{spec.hf_suffix}")
            for i in range(shape[0])
        ])
    raise KeyError(f"no checkpoint tensor is mapped to model parameter {'.'.join(names)}")


def load_target_model(path: str, mesh: Mesh, rules: ShardingRules, *, dtype: str = "float32",
                      param_dtype: str = "float32") -> Llama:
    """Reads an HF directory or a .gguf file into a sharded :class:`Llama`.

    Raises:
      WeightsError: naming the file, tensor or config field at fault.
    """
    start = time.perf_counter()
    with open_checkpoint(path) as reader:
        arch = reader.arch
        abstract = nnx.eval_shape(lambda: create_model(arch, dtype=dtype, param_dtype=param_dtype))
        graphdef, state = nnx.split(abstract)

        def load(path: tuple, variable: nnx.Variable) -> nnx.Variable:
            shape = variable.get_value().shape
            try:
                host = _host_tensor(reader, path_names(path), shape).astype(variable.get_value().dtype)
            except WeightsError as err:
                raise WeightsError(f"{reader.source}: {err}") from None
            sharding = rules.sharding(mesh, logical_axes_of(variable), shape)
            return variable.replace(host_to_global(host, sharding))

        state = jax.tree_util.tree_map_with_path(load, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    log.info("loaded %s (%s, %d layers) in %.1f s", path, arch.architecture, arch.num_layers,
             time.perf_counter() - start)
    return nnx.merge(graphdef, state)
