"""Logical-axis sharding rules: what `ShardingRules.spec` gives on meshes of 1 and 8 CPU devices."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec

from flatspec_jax.config import MeshConfig
from flatspec_jax.sharding import ShardingRules, make_mesh


@pytest.fixture(scope="module")
def meshes():
    assert len(jax.devices()) == 8
    return {"one": make_mesh(MeshConfig(data=1), jax.devices()[:1]),
            "fsdp2_tensor2": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))}


def test_a_dimension_follows_its_mesh_axes_and_size_one_axes_drop(meshes):
    rules = ShardingRules()
    assert rules.spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert rules.spec(("vocab", "embed"), mesh=meshes["fsdp2_tensor2"]) == PartitionSpec("tensor", "fsdp")
    assert rules.spec(("batch", None)) == PartitionSpec(("data", "fsdp"), None)
    assert rules.spec(("vocab", "embed"), mesh=meshes["one"]) == PartitionSpec(None, None)


def test_a_dimension_the_mesh_axes_do_not_divide_is_replicated(meshes):
    """SmolLM2's 3 KV heads on a tensor axis of 2: uneven shards are not allowed for jit arguments."""
    rules = ShardingRules()
    mesh = meshes["fsdp2_tensor2"]
    assert rules.spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh) == PartitionSpec("fsdp", None, None)
    assert rules.spec(("embed", "kv_heads", "head_dim"), (576, 4, 64), mesh) == PartitionSpec("fsdp", "tensor", None)


@pytest.mark.parametrize("mesh_name", [None, "one", "fsdp2_tensor2"])
def test_rules_mapping_one_mesh_axis_twice_are_refused_on_every_mesh(meshes, mesh_name):
    """Such rules are wrong whatever the mesh: they must fail on a 1-device CPU test as on a pod."""
    rules = ShardingRules(embed="tensor")
    mesh = meshes[mesh_name] if mesh_name else None
    with pytest.raises(ValueError, match=r"logical axes \('vocab', 'embed'\) map mesh axis 'tensor' twice"):
        rules.spec(("vocab", "embed"), mesh=mesh)
