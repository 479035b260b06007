"""Orbax checkpoints of the draft head move between meshes, and know which target they belong to.

A tiny head whose dimensions every mesh axis divides (D=32, 4 heads, 2 KV heads, MLP 64,
two layers so the stacked part exists) is trained-state-saved on one mesh and restored on
another by handing orbax the new shardings:

* 8 devices ``fsdp=8`` -> 1 device, and ``data=2, fsdp=4`` -> ``fsdp=2, tensor=2``: the full
  training state (parameters, AdamW moments, step, data iterator) comes back with exactly the
  requested shardings (really split: shards smaller than the array) and bitwise-equal values;
* ``load_draft_head`` restores the parameters only (no optimizer state) onto another mesh,
  from a training checkpoint and from a params-only one (what ``flatspec import`` writes);
* the metadata is checked at restore: a draft made for another target architecture or another
  tokenizer vocabulary is refused with a CheckpointMismatchError naming the difference.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flatspec_jax.checkpoint.manager import (
    CheckpointMismatchError,
    DraftCheckpointer,
    draft_meta,
    flatten_params,
    load_draft_head,
    opt_state_shardings,
    read_meta,
    save_draft_params,
)
from flatspec_jax.config import MeshConfig, TrainConfig
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.sharding import ShardingRules, make_mesh, state_shardings
from flatspec_jax.train.optim import build_optimizer
from flatspec_jax.train.step import TrainState
from flatspec_jax.weights.arch import ArchSpec

TARGET = ArchSpec(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))
VOCAB_HASH = "vocab-hash-of-the-target"
DRAFT_LAYERS = 2
STEP = 7
RULES = ShardingRules()


def mesh_of(data: int = 1, fsdp: int = 1, tensor: int = 1):
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])


def random_like(abstract, seed: int):
    """Host arrays of the abstract tree's shapes: floats normal, integers (step counts) 3."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return np.full(leaf.shape, 3, leaf.dtype)

    return jax.tree.map(fill, abstract)


def train_state_on(mesh, tx, seed: int = 3):
    """A head's TrainState on ``mesh`` with random parameters and AdamW moments, and its shardings.

    Built from the abstract head with host values (eager initialisation on 8 CPU devices is slow)."""
    _, abstract_params = nnx.split(nnx.eval_shape(lambda: create_eagle_head(TARGET, DRAFT_LAYERS)))
    param_shardings = state_shardings(abstract_params, mesh, RULES)
    opt_shardings = opt_state_shardings(tx, abstract_params, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    state = TrainState(step=np.asarray(STEP, np.int32), params=random_like(abstract_params, seed),
                       opt_state=random_like(abstract_opt, seed + 1))
    return jax.device_put(state, shardings), shardings


def data_iterator():
    return grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset().__iter__()


def meta_for(target: ArchSpec = TARGET, vocab_hash: str = VOCAB_HASH) -> dict:
    return draft_meta({"draft": {"num_layers": DRAFT_LAYERS}}, dataclasses.replace(target, num_layers=DRAFT_LAYERS),
                      target, vocab_hash, fc_bias=True)


def save_train_checkpoint(directory, mesh, tx):
    state, _ = train_state_on(mesh, tx)
    iterator = data_iterator()
    for _ in range(5):
        next(iterator)
    checkpoints = DraftCheckpointer(directory, keep=2)
    checkpoints.save(STEP, state, iterator, meta_for())
    checkpoints.wait()
    checkpoints.close()
    return state, int(next(iterator))


def host(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def assert_shardings(tree, shardings) -> None:
    for array, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)


def assert_trees_equal(got, want) -> None:
    for a, b in zip(jax.tree.leaves(host(got)), jax.tree.leaves(host(want)), strict=True):
        np.testing.assert_array_equal(a, b)


def is_split(array) -> bool:
    return array.addressable_shards[0].data.shape != array.shape


@pytest.fixture(scope="module")
def tx():
    return build_optimizer(TrainConfig(steps=10, warmup_steps=2))


@pytest.fixture(scope="module")
def fsdp8_checkpoint(tmp_path_factory, tx):
    directory = tmp_path_factory.mktemp("fsdp8") / "checkpoints"
    state, next_item = save_train_checkpoint(directory, mesh_of(fsdp=8), tx)
    return directory, host(state), next_item


@pytest.fixture(scope="module")
def dp_fsdp_checkpoint(tmp_path_factory, tx):
    directory = tmp_path_factory.mktemp("dp2fsdp4") / "checkpoints"
    state, next_item = save_train_checkpoint(directory, mesh_of(data=2, fsdp=4), tx)
    return directory, host(state), next_item


def restore_on(directory, mesh, tx):
    template, shardings = train_state_on(mesh, tx)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    iterator = data_iterator()
    checkpoints = DraftCheckpointer(directory, keep=2)
    try:
        restored = checkpoints.restore(STEP, abstract, shardings, tx, iterator)
    finally:
        checkpoints.close()
    return restored, shardings, int(next(iterator))


def test_the_saving_mesh_really_shards(fsdp8_checkpoint, tx):
    state, _ = train_state_on(mesh_of(fsdp=8), tx)
    assert is_split(flatten_params(state.params)["fc"].get_value())
    assert is_split(flatten_params(state.params)["more_layers/layers/self_attn/q_proj"].get_value())


def test_fsdp8_checkpoint_restores_on_one_device(fsdp8_checkpoint, tx):
    directory, saved, next_item = fsdp8_checkpoint
    mesh = mesh_of()
    restored, shardings, restored_next = restore_on(directory, mesh, tx)
    assert_shardings(restored, shardings)
    assert all(a.sharding.mesh.size == 1 for a in jax.tree.leaves(restored))
    assert_trees_equal(restored, saved)
    assert int(restored.step) == STEP
    assert restored_next == next_item  # the data iterator resumes where it was saved


def test_data_fsdp_checkpoint_restores_on_fsdp_tensor_mesh(dp_fsdp_checkpoint, tx):
    directory, saved, next_item = dp_fsdp_checkpoint
    mesh = mesh_of(fsdp=2, tensor=2)
    restored, shardings, restored_next = restore_on(directory, mesh, tx)
    assert_shardings(restored, shardings)
    flat = flatten_params(restored.params)
    q = flat["first_layer/self_attn/q_proj"].get_value()  # [D, N, H]: embed on fsdp, heads on tensor
    assert q.sharding.spec[:2] == ("fsdp", "tensor") and q.addressable_shards[0].data.shape == (16, 2, 8)
    gate = flat["more_layers/layers/mlp/gate_proj"].get_value()  # [L, D, F]
    assert gate.addressable_shards[0].data.shape == (1, 16, 32)
    moments = [leaf for leaf in jax.tree.leaves(restored.opt_state) if leaf.ndim == 3]
    assert moments and all(is_split(m) for m in moments)  # AdamW moments follow their parameters
    assert_trees_equal(restored, saved)
    assert restored_next == next_item


def test_load_draft_head_restores_params_only_onto_another_mesh(dp_fsdp_checkpoint):
    directory, saved, _ = dp_fsdp_checkpoint
    mesh = mesh_of(fsdp=2, tensor=2)
    head = load_draft_head(directory, TARGET, VOCAB_HASH, mesh, RULES)
    _, params = nnx.split(head)
    assert_shardings(params, state_shardings(params, mesh, RULES))
    assert_trees_equal(params, saved.params)
    assert head.arch.num_layers == DRAFT_LAYERS and head.fc_bias is not None


def test_params_only_checkpoint_restores_onto_another_mesh(tmp_path, fsdp8_checkpoint):
    _, saved, _ = fsdp8_checkpoint
    write_mesh = mesh_of(data=2, fsdp=4)
    head = load_draft_head(fsdp8_checkpoint[0], TARGET, VOCAB_HASH, write_mesh, RULES)
    directory = tmp_path / "imported"
    save_draft_params(directory, nnx.split(head)[1], meta_for())
    step, meta = read_meta(directory)
    assert step == 0 and meta["params_only"] is True
    assert sorted(p.name for p in (directory / "0").iterdir() if p.is_dir()) == ["meta", "state"]  # no data/
    read_mesh = mesh_of(tensor=2)
    params = nnx.split(load_draft_head(directory, TARGET, VOCAB_HASH, read_mesh, RULES))[1]
    assert_shardings(params, state_shardings(params, read_mesh, RULES))
    assert_trees_equal(params, saved.params)
    with pytest.raises(CheckpointMismatchError, match="already holds step 0"):
        save_draft_params(directory, nnx.split(head)[1], meta_for())


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": 1e-6}, r"another target model \(rms_norm_eps: draft made for 1e-05, target has 1e-06\)"),
    ({"num_kv_heads": 4}, r"num_kv_heads: draft made for 2, target has 4"),
    ({"architecture": "qwen2", "attention_bias": True}, r"architecture: draft made for 'llama', target has 'qwen2'"),
])
def test_restore_refuses_a_draft_made_for_another_target(fsdp8_checkpoint, change, message):
    other = dataclasses.replace(TARGET, **change)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_draft_head(fsdp8_checkpoint[0], other, VOCAB_HASH, mesh_of(), RULES)


def test_restore_refuses_a_draft_made_with_another_vocabulary(fsdp8_checkpoint):
    with pytest.raises(CheckpointMismatchError, match="another tokenizer vocabulary"):
        load_draft_head(fsdp8_checkpoint[0], TARGET, "some-other-vocab-hash", mesh_of(), RULES)


def test_metadata_records_the_target_identity(fsdp8_checkpoint):
    step, meta = read_meta(fsdp8_checkpoint[0])
    assert step == STEP
    assert ArchSpec.from_json(json.dumps(meta["target_arch"]), "meta") == TARGET
    assert meta["target_vocab_hash"] == VOCAB_HASH and meta["draft_arch"]["num_layers"] == DRAFT_LAYERS


def test_a_step_the_directory_does_not_hold_is_named_with_those_it_does(fsdp8_checkpoint):
    with pytest.raises(CheckpointMismatchError, match=rf"holds no step {STEP + 1} \(its steps: {STEP}\)"):
        read_meta(fsdp8_checkpoint[0], STEP + 1)


def test_a_directory_without_checkpoints_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMismatchError, match="holds no checkpoint"):
        load_draft_head(tmp_path / "empty", TARGET, VOCAB_HASH, mesh_of(), RULES)
    with pytest.raises(CheckpointMismatchError, match=f"{tmp_path / 'missing'} does not exist"):
        load_draft_head(tmp_path / "missing", TARGET, VOCAB_HASH, mesh_of(), RULES)
    (tmp_path / "afile").write_text("")
    with pytest.raises(CheckpointMismatchError, match=f"{tmp_path / 'afile'} is not a directory"):
        load_draft_head(tmp_path / "afile", TARGET, VOCAB_HASH, mesh_of(), RULES)


def saved_opt_keys(directory) -> set[str]:
    reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                   item_handlers={"state": ocp.StandardCheckpointHandler()})
    try:
        return set(reader.item_metadata(STEP)["state"]["opt_state"])
    finally:
        reader.close()


def test_optimizer_leaves_are_saved_under_their_optax_paths(fsdp8_checkpoint):
    keys = saved_opt_keys(fsdp8_checkpoint[0])
    # chain(clip, adamw): adamw's ScaleByAdamState (count, first and second moments) is 1/0.
    assert {"1/0/count", "1/0/mu/fc/value", "1/0/nu/fc/value",
            "1/0/mu/more_layers/layers/self_attn/q_proj/value"} <= keys
    assert not any(key.isdigit() for key in keys)


def test_checkpoints_with_optimizer_leaves_keyed_by_index_still_restore(tmp_path, tx, monkeypatch):
    """Checkpoints written before leaves were keyed by path hold them as "000", "001", ... in
    flattening order."""
    from flatspec_jax.checkpoint import manager

    monkeypatch.setattr(manager, "_flatten_opt_state",
                        lambda opt_state: {f"{i:03d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))})
    directory = tmp_path / "checkpoints"
    state, next_item = save_train_checkpoint(directory, mesh_of(fsdp=2), tx)
    monkeypatch.undo()
    assert "000" in saved_opt_keys(directory)
    restored, shardings, restored_next = restore_on(directory, mesh_of(data=2), tx)
    assert_shardings(restored, shardings)
    assert_trees_equal(restored, host(state))
    assert restored_next == next_item


@pytest.mark.parametrize("by_index", [False, True], ids=["keyed_by_path", "keyed_by_index"])
def test_optimizer_leaves_return_to_their_places_when_key_order_differs_from_tree_order(tmp_path, monkeypatch,
                                                                                       by_index):
    """Chain entries 2 and 10 hold same-shaped momenta: as strings "10/..." sorts before "2/...", so a
    restore that paired leaves in key order would swap them silently."""
    from flatspec_jax.checkpoint import manager

    tx = optax.chain(optax.identity(), optax.identity(), optax.trace(0.9), *[optax.identity()] * 7,
                     optax.trace(0.5))
    if by_index:
        monkeypatch.setattr(manager, "_flatten_opt_state",
                            lambda opt_state: {f"{i:03d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))})
    directory = tmp_path / "checkpoints"
    state, _ = save_train_checkpoint(directory, mesh_of(), tx)
    monkeypatch.undo()
    restored, _, _ = restore_on(directory, mesh_of(), tx)
    assert_trees_equal(restored, host(state))


def test_restore_with_another_optimizer_names_the_step_and_the_leaves(fsdp8_checkpoint):
    directory = fsdp8_checkpoint[0]
    sgd = optax.sgd(0.1, momentum=0.9)
    with pytest.raises(CheckpointMismatchError, match=rf"{directory}/{STEP}: its optimizer state does not fit "
                                                      r"this optimizer \(missing \['0/trace/"):
        restore_on(directory, mesh_of(), sgd)


def test_retention_keeps_the_latest_steps_and_the_one_of_lowest_held_out_loss(tmp_path, tx):
    state, _ = train_state_on(mesh_of(), tx)
    checkpoints = DraftCheckpointer(tmp_path / "checkpoints", keep=1)
    iterator = data_iterator()
    for step, eval_loss in zip((1, 2, 3, 4), (3.0, 1.0, 2.0, 4.0)):
        checkpoints.save(step, state, iterator, meta_for(), metrics={"eval_loss": eval_loss})
        checkpoints.wait()
    assert sorted(checkpoints.manager.all_steps()) == [2, 4], "the best (step 2) and the latest (step 4)"
    checkpoints.close()


def test_retention_still_keeps_the_best_step_after_a_restart(tmp_path, tx):
    """A resumed run (after a preemption, or with more steps) opens a new manager: it must read the
    held-out losses of the steps already saved, not treat them as steps without metrics."""
    state, _ = train_state_on(mesh_of(), tx)
    iterator = data_iterator()

    def save_all(losses_by_step):
        checkpoints = DraftCheckpointer(tmp_path / "checkpoints", keep=1)
        for step, eval_loss in losses_by_step:
            checkpoints.save(step, state, iterator, meta_for(), metrics={"eval_loss": eval_loss})
            checkpoints.wait()
        steps = sorted(checkpoints.manager.all_steps())
        checkpoints.close()
        return steps

    assert save_all([(2, 0.1), (4, 0.5), (6, 0.7)]) == [2, 6]
    assert save_all([(8, 0.9), (10, 0.95)]) == [2, 10], "step 2 still has the lowest held-out loss"


def test_a_directory_given_for_a_checkpoint_directory_says_what_to_pass_instead(fsdp8_checkpoint, tmp_path):
    directory = fsdp8_checkpoint[0]
    with pytest.raises(CheckpointMismatchError, match=rf"it is a run directory: pass {directory}$"):
        read_meta(directory.parent)
    with pytest.raises(CheckpointMismatchError, match=rf"one step of a checkpoint directory: pass {directory} "):
        read_meta(directory / str(STEP))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointMismatchError, match=r"an EAGLE-format head: `flatspec import --input DIR`"):
        read_meta(tmp_path)
