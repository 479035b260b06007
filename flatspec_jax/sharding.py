"""Device mesh and logical-axis sharding rules.

Parameters and activations name their axes logically (``vocab``, ``embed``, ``heads``, ...);
:class:`ShardingRules` maps each logical name to a mesh axis once, so model code never
mentions devices and never branches on their number. Model parameters carry their names
in the ``logical_axes`` metadata of their ``nnx.Param``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatspec_jax.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes (None = replicated along that dimension)."""

    batch: MeshAxes = ("data", "fsdp")
    sequence: MeshAxes = None
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    layers: MeshAxes = None
    norm: MeshAxes = None
    fused: MeshAxes = None
    """The EAGLE fc input (embedding ++ feature, 2D wide)."""

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        try:
            return getattr(self, logical)
        except AttributeError:
            raise ValueError(f"unknown logical axis {logical!r}; known: "
                             f"{[f.name for f in dataclasses.fields(self)]}") from None

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions have these logical names.

        With ``shape`` and ``mesh``, a dimension that the mesh axes do not divide is
        replicated instead (e.g. SmolLM2's 3 KV heads on a tensor axis of 2): uneven
        shards are not allowed for jit arguments, and replicating a small dimension is
        the cheap correct choice.

        Raises:
          ValueError: if two logical axes land on the same mesh axis.
        """
        entries: list[MeshAxes] = []
        used: set[str] = set()
        for dim, name in enumerate(logical_axes):
            axes = self.mesh_axes(name)
            flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
            clash = used.intersection(flat)  # checked before the mesh drops axes: the rules are wrong on any mesh
            if clash:
                raise ValueError(f"logical axes {tuple(logical_axes)} map mesh axis {clash.pop()!r} twice")
            used.update(flat)
            if mesh is not None:
                flat = tuple(a for a in flat if mesh.shape[a] > 1)
            if shape is not None and mesh is not None and flat:
                size = math.prod(mesh.shape[a] for a in flat)
                if shape[dim] % size:
                    flat = ()
            entries.append(None if not flat else flat[0] if len(flat) == 1 else flat)
        return PartitionSpec(*entries)

    def sharding(self, mesh: Mesh, logical_axes: Sequence[str | None],
                 shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


def resolve_mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Axis sizes (data, fsdp, tensor) with any -1 replaced so their product is ``device_count``."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh: {device_count} devices are not divisible by the fixed axes "
                              f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to "
                          f"{math.prod(sizes)}, but there are {device_count} devices")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of every process) or the given ones.

    Fixed axis sizes whose product is smaller than the device count use the first devices
    only (e.g. ``mesh.data=1`` on an 8-GPU host), with a warning.
    """
    devices = list(devices) if devices is not None else jax.devices()
    fixed = (cfg.data, cfg.fsdp, cfg.tensor)
    if -1 not in fixed and math.prod(fixed) < len(devices):
        log.warning("mesh %s uses %d of the %d devices", dict(zip(MESH_AXES, fixed)), math.prod(fixed), len(devices))
        devices = devices[:math.prod(fixed)]
    shape = resolve_mesh_shape(cfg, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_shards(mesh: Mesh) -> int:
    """Slices of the batch axis over the mesh (data x fsdp): a batch's rows must be a multiple."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_process_rows(mesh: Mesh, process_of: Callable[[jax.Device], int] = lambda device: device.process_index,
                       process_count: int | None = None) -> None:
    """Every process of the job must hold some of the mesh's devices: each feeds the batch rows its
    devices hold (:func:`process_rows`), so a process without any would feed nothing and wait for the
    others in every collective (``process_of``: a device's process; ``process_count``: the job's
    processes, ``jax.process_count()`` by default).

    Raises:
      ConfigError: naming ``mesh.*`` when some process holds none of the mesh's devices (fixed
        axis sizes below the device count take the first devices, process 0's).
    """
    processes = sorted({process_of(device) for device in mesh.devices.flat})
    count = jax.process_count() if process_count is None else process_count
    if processes != list(range(count)):
        raise ConfigError(
            f"mesh {dict(mesh.shape)} holds devices of process(es) {processes} only, but all {count} processes "
            "feed it rows: size mesh.data x mesh.fsdp x mesh.tensor to every device of the job (-1 for one axis)")


def process_rows(sharding: NamedSharding, shape: tuple[int, ...],
                 process_of: Callable[[jax.Device], int] = lambda device: device.process_index,
                 process: int | None = None) -> np.ndarray:
    """[n] int: the rows (first axis) of a global array of ``shape`` laid out by ``sharding`` that the
    devices of ``process`` (default: this one) hold, in increasing order.

    That is the process-local data ``jax.make_array_from_process_local_data`` takes: the process's
    shards stacked in the order of their first row. On a TPU slice, ``jax.make_mesh`` lays a host's
    chips out by the torus, so its rows need not be one block of the batch (by JAX's device mesh for
    v5p-64, a host holds rows [0, 16) and [32, 48) of a 256-row batch on data 4 x fsdp 8); two processes whose
    devices hold the same rows (a tensor axis across hosts) both feed them.
    """
    process = jax.process_index() if process is None else process
    held: set[int] = set()
    for device, index in sharding.devices_indices_map(shape).items():
        if process_of(device) == process:
            held.update(range(shape[0])[index[0]])
    return np.asarray(sorted(held), np.int64)


def batch_sharding(mesh: Mesh, rules: ShardingRules, ndim: int) -> NamedSharding:
    """Sharding of an input array whose leading dimension is the batch."""
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was annotated with (all None when unannotated)."""
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if axes is None:
        return (None,) * len(shape)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """The state with each variable's array replaced by its rule-given NamedSharding.

    The result has exactly the state's tree structure (variables hold shardings), so it
    serves as ``in_shardings``/``out_shardings`` and in any ``jax.tree.map`` beside the state.
    """
    return jax.tree.map(
        lambda v: v.replace(rules.sharding(mesh, logical_axes_of(v), v.get_value().shape)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def place_state(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """Moves every array of a state to its rule-given sharding."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Builds a global array from a host array that every process holds, one shard per device.

    Each device receives only its own slice, so no device ever holds the whole tensor
    unless the sharding replicates it; this also works across processes.
    """
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
