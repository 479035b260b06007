"""``flatspec export --format eagle`` and ``flatspec import --format eagle`` on tiny targets.

Targets are tiny random HF models (a Llama with Llama-3 RoPE scaling and a Qwen2 with q/k/v
biases) saved next to SmolLM2's tokenizer. Draft checkpoints are written the way training
writes them (``DraftCheckpointer``: parameters, optimizer state, data iterator, metadata),
with random parameters. What is checked:

* the export has exactly the reference's files, config fields and state-dict keys/shapes
  (layer 0 without ``input_layernorm``, ``[out, in]`` orientation, the target's embedding),
  and ``model.safetensors`` equals ``pytorch_model.bin``;
* a PyTorch re-creation of the reference ``cnets.Model`` module tree built from the exported
  ``config.json`` with transformers' decoder layers loads the state dict with ``strict=True``
  and computes the same features as our head (so the orientation and layout are right, not
  merely self-consistent);
* export -> import is bitwise exact (from the safetensors file and from the .bin alone), for
  Llama and Qwen2 targets; bfloat16 export is the rounded parameters;
* a published-style head (float16 ``pytorch_model.bin`` only, no ``bias`` key, its own
  embedding) imports and matches the reference forward; embedding differences are warned about;
* mismatches name the field or tensor (CheckpointMismatchError); export refuses a checkpoint
  of another target; import refuses a non-empty ``--out``; a failed export leaves the old
  export intact and no temporary directory;
* the CLI path (``flatspec export|import`` with the flags the stages define).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flatspec_jax import assets
from flatspec_jax.checkpoint import eagle_format
from flatspec_jax.checkpoint.manager import (
    CheckpointMismatchError,
    DraftCheckpointer,
    draft_meta,
    flatten_params,
    load_draft_head,
    opt_state_shardings,
    read_meta,
    vocab_hash,
)
from flatspec_jax.config import ConfigError, MeshConfig, TrainConfig, load_config
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.models.eagle import create_eagle_head, draft_arch
from flatspec_jax.models.masks import causal_mask
from flatspec_jax.sharding import ShardingRules, make_mesh, state_shardings
from flatspec_jax.stages import export, import_eagle
from flatspec_jax.train.optim import build_optimizer
from flatspec_jax.train.step import TrainState
from flatspec_jax.weights.arch import ArchSpec
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.reader import open_checkpoint
from flatspec_jax.weights.safetensors_reader import SafetensorsFile


RULES = ShardingRules()
LLAMA_LAYERS = 2
QWEN2_LAYERS = 1
SEQ = 12


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny targets, training-format draft checkpoints, exports
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(assets.smollm2_gguf())


def save_target(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_target(transformers.LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen2_dir(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_target(transformers.Qwen2ForCausalLM(config), tokenizer, tmp_path_factory.mktemp("qwen2"))


def target_of(model_dir: Path):
    with open_checkpoint(model_dir) as reader:
        return reader.arch, reader.get("model.embed_tokens.weight")


def one_device_mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def random_params(abstract_params: nnx.State, seed: int) -> nnx.State:
    """Host values for a head: weights ~N(0, 0.2), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    flat = flatten_params(abstract_params)
    values = {}
    for key, variable in flat.items():
        shape = variable.get_value().shape
        if key.endswith("layernorm/weight"):
            values[key] = 1 + 0.1 * rng.standard_normal(shape)
        elif "bias" in key:
            values[key] = 0.1 * rng.standard_normal(shape)
        else:
            values[key] = 0.2 * rng.standard_normal(shape)
        values[key] = variable.replace(values[key].astype(np.float32))
    return nnx.from_flat_state([(path, values["/".join(map(str, path))])
                                for path, _ in nnx.to_flat_state(abstract_params)])


def write_train_checkpoint(directory: Path, model_dir: Path, tokenizer, num_layers: int, fc_bias: bool,
                           steps=(1, 3), vocab: str | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Checkpoints as ``flatspec train`` writes them; returns each step's host parameters."""
    import grain

    target, _ = target_of(model_dir)
    mesh = one_device_mesh()
    tx = build_optimizer(TrainConfig(steps=10))
    _, abstract = nnx.split(nnx.eval_shape(lambda: create_eagle_head(target, num_layers, fc_bias=fc_bias)))
    param_shardings = state_shardings(abstract, mesh, RULES)
    opt_shardings = opt_state_shardings(tx, abstract, param_shardings, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    meta = draft_meta({"draft": {"num_layers": num_layers}}, draft_arch(target, num_layers), target,
                      vocab or vocab_hash(tokenizer), fc_bias=fc_bias)
    checkpoints = DraftCheckpointer(directory, keep=3)
    iterator = grain.MapDataset.range(10).to_iter_dataset().__iter__()
    saved = {}
    for step in steps:
        params = random_params(abstract, seed=step)
        opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_opt)
        state = jax.device_put(TrainState(step=np.asarray(step, np.int32), params=params, opt_state=opt_state),
                               TrainState(step=NamedSharding(mesh, PartitionSpec()), params=param_shardings,
                                          opt_state=opt_shardings))
        checkpoints.save(step, state, iterator, meta)
        saved[step] = {k: np.asarray(v.get_value()) for k, v in flatten_params(params).items()}
    checkpoints.wait()
    checkpoints.close()
    return saved


def config_for(model_dir: Path, run_dir: Path, *overrides: str):
    return load_config(None, [f"model.path={model_dir}", f"run_dir={run_dir}", *overrides])


def export_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"format": "eagle", "checkpoint": None, "step": None, "out": None,
                                 "dtype": "float32", **kw})


def import_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"format": "eagle", "input": None, "out": None, **kw})


@pytest.fixture(scope="module")
def llama_run(llama_dir, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("llama_run")
    saved = write_train_checkpoint(run_dir / "checkpoints", llama_dir, tokenizer, LLAMA_LAYERS, fc_bias=True)
    out = export.run(config_for(llama_dir, run_dir), export_args())
    return run_dir, saved, out


@pytest.fixture(scope="module")
def qwen2_run(qwen2_dir, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qwen2_run")
    saved = write_train_checkpoint(run_dir / "checkpoints", qwen2_dir, tokenizer, QWEN2_LAYERS, fc_bias=False)
    out = export.run(config_for(qwen2_dir, run_dir), export_args())
    return run_dir, saved, out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    handle = SafetensorsFile(path)
    try:
        return {name: handle.read(name) for name in handle.tensors}
    finally:
        handle.close()


def read_bin(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
            for k, v in state.items()}


def head_params(directory: Path, model_dir: Path, tokenizer, mesh=None) -> dict[str, np.ndarray]:
    target, _ = target_of(model_dir)
    head = load_draft_head(directory, target, vocab_hash(tokenizer), mesh or one_device_mesh(), RULES)
    return {k: np.asarray(v.get_value()) for k, v in flatten_params(nnx.state(head)).items()}


def expected_keys(num_layers: int, fc_bias: bool, qkv_bias: bool) -> set[str]:
    keys = {"embed_tokens.weight", "fc.weight"} | ({"fc.bias"} if fc_bias else set())
    for i in range(num_layers):
        keys |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"layers.{i}.post_attention_layernorm.weight"}
        if i:
            keys |= {f"layers.{i}.input_layernorm.weight"}
        if qkv_bias:
            keys |= {f"layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"}
    return keys


# ----------------------------------------------------------------------------------------------
# The reference module tree (SafeAILab/EAGLE cnets.Model) from transformers' decoder layers
# ----------------------------------------------------------------------------------------------


class ReferenceHead(torch.nn.Module):
    """EAGLE-1/2's draft: embed -> fc(concat(embedding, feature)) -> layers (layer 0 without its
    input norm) -> no final norm. Built from a head's config.json the way the reference does
    (``bias`` defaults to true, ``qkv_bias`` selects Qwen2-style attention)."""

    def __init__(self, config: dict):
        super().__init__()
        fields = {k: v for k, v in config.items() if k not in ("flatspec", "bias", "qkv_bias")}
        qwen2 = bool(config.get("qkv_bias"))
        cfg = (transformers.Qwen2Config if qwen2 else transformers.LlamaConfig)(**fields)
        cfg._attn_implementation = "eager"
        modeling = transformers.models.qwen2.modeling_qwen2 if qwen2 else transformers.models.llama.modeling_llama
        layer_cls = modeling.Qwen2DecoderLayer if qwen2 else modeling.LlamaDecoderLayer
        hidden = cfg.hidden_size
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, hidden, padding_idx=config.get("pad_token_id"))
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=config.get("bias", True))
        self.layers = torch.nn.ModuleList([layer_cls(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.layers[0].input_layernorm = torch.nn.Identity()
        self.rotary = (modeling.Qwen2RotaryEmbedding if qwen2 else modeling.LlamaRotaryEmbedding)(cfg)

    def forward(self, features, tokens):
        x = self.fc(torch.cat([self.embed_tokens(tokens), features], dim=-1))
        positions = torch.arange(x.shape[1])[None]
        cos_sin = self.rotary(x, positions)
        mask = torch.full((x.shape[1], x.shape[1]), torch.finfo(torch.float32).min).triu(1)[None, None]
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        return x


def reference_features(head_dir: Path, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The reference's output, loading the head's pytorch_model.bin strictly, in float32."""
    config = json.loads((head_dir / "config.json").read_text())
    model = ReferenceHead(config)
    state = torch.load(head_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(features), torch.from_numpy(tokens)).numpy()


def our_features(checkpoint: Path, model_dir: Path, tokenizer, features: np.ndarray, tokens: np.ndarray,
                 embedding: np.ndarray) -> np.ndarray:
    target, _ = target_of(model_dir)
    head = load_draft_head(checkpoint, target, vocab_hash(tokenizer), one_device_mesh(), RULES)
    positions = np.arange(tokens.shape[1])[None]
    out, _ = head(features, embedding[tokens].astype(np.float32), positions, causal_mask(1, tokens.shape[1]))
    return np.asarray(out)


def sample_inputs(hidden: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, SEQ, hidden)).astype(np.float32), rng.integers(0, vocab, (1, SEQ))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def test_export_writes_the_reference_layout(llama_run, llama_dir, tokenizer):
    run_dir, saved, out = llama_run
    assert out == (run_dir / "export" / "eagle").absolute()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert [p.name for p in out.parent.iterdir()] == ["eagle"]  # no temporary directory left beside it
    target, embedding = target_of(llama_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "hidden_act",
                                   "max_position_embeddings", "rms_norm_eps", "rope_theta", "torch_dtype", "bias",
                                   "tie_word_embeddings", "bos_token_id", "eos_token_id")} == {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LLAMA_LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32", "bias": True,
        "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert "qkv_bias" not in config
    block = config["flatspec"]
    assert block["target_vocab_hash"] == vocab_hash(tokenizer) and block["step"] == 3
    assert block["target_arch"] == json.loads(target.to_json())

    tensors = read_safetensors(out / "model.safetensors")
    assert set(tensors) == expected_keys(LLAMA_LAYERS, fc_bias=True, qkv_bias=False)
    d, v = 32, len(tokenizer)
    shapes = {"embed_tokens.weight": (v, d), "fc.weight": (d, 2 * d), "fc.bias": (d,),
              "layers.1.self_attn.q_proj.weight": (32, d), "layers.1.self_attn.k_proj.weight": (16, d),
              "layers.0.self_attn.o_proj.weight": (d, 32), "layers.0.mlp.gate_proj.weight": (64, d),
              "layers.1.mlp.down_proj.weight": (d, 64), "layers.1.input_layernorm.weight": (d,)}
    assert {k: tensors[k].shape for k in shapes} == shapes
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["embed_tokens.weight"], embedding)
    # [out, in] orientation: fc.weight is our [2D, D] fc transposed; layer 1 is the stacked slice 0.
    latest = saved[3]
    np.testing.assert_array_equal(tensors["fc.weight"], latest["fc"].T)
    np.testing.assert_array_equal(tensors["layers.1.mlp.up_proj.weight"], latest["more_layers/layers/mlp/up_proj"][0].T)
    np.testing.assert_array_equal(tensors["layers.0.self_attn.q_proj.weight"],
                                  latest["first_layer/self_attn/q_proj"].reshape(d, -1).T)
    binary = read_bin(out / "pytorch_model.bin")
    assert set(binary) == set(tensors)
    for key in tensors:
        np.testing.assert_array_equal(binary[key], tensors[key], err_msg=key)


def test_reference_module_loads_the_export_strictly_and_computes_our_features(llama_run, llama_dir, tokenizer):
    run_dir, _, out = llama_run
    _, embedding = target_of(llama_dir)
    features, tokens = sample_inputs(32, len(tokenizer))
    want = reference_features(out, features, tokens)
    got = our_features(run_dir / "checkpoints", llama_dir, tokenizer, features, tokens, embedding)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_qwen2_export_has_qkv_biases_and_matches_the_reference(qwen2_run, qwen2_dir, tokenizer):
    run_dir, _, out = qwen2_run
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["qkv_bias"] is True and config["bias"] is False and config["rope_theta"] == 1e6
    tensors = read_safetensors(out / "model.safetensors")
    assert set(tensors) == expected_keys(QWEN2_LAYERS, fc_bias=False, qkv_bias=True)
    assert tensors["layers.0.self_attn.k_proj.bias"].shape == (16,)
    _, embedding = target_of(qwen2_dir)  # tied embeddings: still exported
    np.testing.assert_array_equal(tensors["embed_tokens.weight"], embedding)
    features, tokens = sample_inputs(32, len(tokenizer), seed=1)
    np.testing.assert_allclose(our_features(run_dir / "checkpoints", qwen2_dir, tokenizer, features, tokens, embedding),
                               reference_features(out, features, tokens), rtol=2e-5, atol=2e-5)


def test_export_of_an_older_step_in_bfloat16(llama_run, llama_dir, tmp_path):
    run_dir, saved, _ = llama_run
    out = export.run(config_for(llama_dir, run_dir), export_args(step=1, dtype="bfloat16", out=str(tmp_path / "bf16")))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["flatspec"]["step"] == 1
    tensors = read_safetensors(out / "model.safetensors")
    binary = read_bin(out / "pytorch_model.bin")
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    for key in tensors:
        np.testing.assert_array_equal(binary[key].view(np.uint16), tensors[key].view(np.uint16), err_msg=key)
    np.testing.assert_array_equal(tensors["fc.weight"], saved[1]["fc"].T.astype(ml_dtypes.bfloat16))


def test_export_refuses_a_checkpoint_of_another_target(llama_run, qwen2_dir):
    run_dir, _, _ = llama_run
    with pytest.raises(CheckpointMismatchError, match="another target model"):
        export.run(config_for(qwen2_dir, run_dir), export_args(out=str(run_dir / "wrong")))
    assert not (run_dir / "wrong").exists()


def test_failed_export_keeps_the_previous_one(llama_run, llama_dir, tmp_path, monkeypatch):
    run_dir, _, _ = llama_run
    out = tmp_path / "eagle"
    export.run(config_for(llama_dir, run_dir), export_args(step=1, out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.run(config_for(llama_dir, run_dir), export_args(step=3, out=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["eagle"]
    monkeypatch.undo()
    export.run(config_for(llama_dir, run_dir), export_args(step=3, out=str(out)))  # replaces the old export
    assert json.loads((out / "config.json").read_text())["flatspec"]["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["eagle"]


def test_export_without_torch_writes_safetensors_and_warns(llama_run, llama_dir, tmp_path, monkeypatch, caplog):
    run_dir, _, reference = llama_run
    monkeypatch.setattr(eagle_format, "torch_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        out = export.run(config_for(llama_dir, run_dir), export_args(out=str(tmp_path / "eagle")))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "pytorch_model.bin not written" in caplog.text
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_export_for_a_llama3_scaled_target_warns_that_the_reference_cannot_load_it(llama_run, llama_dir, qwen2_run,
                                                                                   qwen2_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.stages.export"):
        export.run(config_for(llama_dir, llama_run[0]), export_args(out=str(tmp_path / "llama")))
    assert "EAGLE reference's EConfig accepts only linear and dynamic scaling" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.stages.export"):
        export.run(config_for(qwen2_dir, qwen2_run[0]), export_args(out=str(tmp_path / "qwen2")))
    assert "rope_scaling" not in caplog.text


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def test_state_dict_maps_each_stacked_layer_by_its_number_beyond_ten_layers():
    """Layers 1..L-1 are one stacked parameter. With 12 layers "layers.10" sorts before "layers.2" as
    text; export and import must still pair stack index i - 1 with layers.i (PyTorch [out, in] layout)."""
    arch = ArchSpec(architecture="llama", vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=12,
                    num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0)
    abstract = nnx.eval_shape(lambda: create_eagle_head(arch, 12))
    shapes = {k: tuple(v.get_value().shape) for k, v in flatten_params(nnx.state(abstract, nnx.Param)).items()}
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}
    tensors = eagle_format.to_state_dict(flat)
    for i in range(1, 12):
        np.testing.assert_array_equal(tensors[f"layers.{i}.mlp.down_proj.weight"],
                                      flat["more_layers/layers/mlp/down_proj"][i - 1].T)
        np.testing.assert_array_equal(tensors[f"layers.{i}.input_layernorm.weight"],
                                      flat["more_layers/layers/input_layernorm/weight"][i - 1])
    np.testing.assert_array_equal(tensors["layers.0.mlp.down_proj.weight"], flat["first_layer/mlp/down_proj"].T)
    back = eagle_format.from_state_dict(tensors, shapes, "12-layer head")
    assert back.keys() == flat.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_export_import_round_trip_is_bitwise(llama_run, llama_dir, tokenizer, tmp_path, weights):
    run_dir, saved, out = llama_run
    head_dir = tmp_path / "head"
    shutil.copytree(out, head_dir)
    (head_dir / ("pytorch_model.bin" if weights == "model.safetensors" else "model.safetensors")).unlink()
    step_dir = import_eagle.run(config_for(llama_dir, tmp_path / "run"), import_args(input=str(head_dir)))
    assert step_dir == (tmp_path / "run" / "checkpoints" / "0").absolute()
    step, meta = read_meta(tmp_path / "run" / "checkpoints")
    assert step == 0 and meta["params_only"] and meta["imported_from"]["file"].endswith(weights)
    assert meta["draft_arch"]["num_layers"] == LLAMA_LAYERS and meta["fc_bias"] is True
    imported = head_params(tmp_path / "run" / "checkpoints", llama_dir, tokenizer)
    original = head_params(run_dir / "checkpoints", llama_dir, tokenizer)
    assert imported.keys() == original.keys() == saved[3].keys()
    for key in original:
        assert imported[key].dtype == original[key].dtype == np.float32
        np.testing.assert_array_equal(imported[key], original[key], err_msg=key)
        np.testing.assert_array_equal(imported[key], saved[3][key], err_msg=key)


def test_qwen2_round_trip_is_bitwise_onto_a_sharded_mesh(qwen2_run, qwen2_dir, tokenizer, tmp_path):
    _, saved, out = qwen2_run
    cfg = config_for(qwen2_dir, tmp_path / "run", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    import_eagle.run(cfg, import_args(input=str(out), out=str(tmp_path / "imported")))
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    imported = head_params(tmp_path / "imported", qwen2_dir, tokenizer, mesh)
    assert "fc_bias" not in imported and "first_layer/self_attn/q_bias" in imported
    assert imported.keys() == saved[3].keys()
    for key, value in saved[3].items():
        np.testing.assert_array_equal(imported[key], value, err_msg=key)


def test_bfloat16_export_imports_as_the_rounded_parameters(llama_run, llama_dir, tokenizer, tmp_path):
    run_dir, saved, _ = llama_run
    out = export.run(config_for(llama_dir, run_dir), export_args(dtype="bfloat16", out=str(tmp_path / "bf16")))
    import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(out), out=str(tmp_path / "imported")))
    imported = head_params(tmp_path / "imported", llama_dir, tokenizer)
    for key, value in saved[3].items():
        np.testing.assert_array_equal(imported[key], value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)


def published_config(tokenizer, **changes) -> dict:
    """A config.json as shipped with the published heads (EAGLE-LLaMA3-Instruct-8B style), for the tiny llama."""
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "hidden_act": "silu", "hidden_size": 32,
              "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 2048,
              "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 1, "num_key_value_heads": 2,
              "pad_token_id": 0, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64},
              "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.28.1",
              "use_cache": True, "vocab_size": len(tokenizer)}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


@pytest.fixture(scope="module")
def published_head(tokenizer, tmp_path_factory) -> Path:
    """A float16 head saved by torch alone (pytorch_model.bin), no ``bias`` key (fc has a bias),
    its own random embedding, as the reference's training script writes it."""
    directory = tmp_path_factory.mktemp("published")
    config = published_config(tokenizer)
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(5)
    model = ReferenceHead(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    torch.save(model.half().state_dict(), directory / "pytorch_model.bin")
    return directory


def test_published_float16_head_imports_and_matches_the_reference(published_head, llama_dir, tokenizer, tmp_path,
                                                                   caplog):
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.stages.import_eagle"):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(published_head)))
    assert "embed_tokens.weight differs from the target's embedding" in caplog.text
    imported = head_params(tmp_path / "checkpoints", llama_dir, tokenizer)
    state = {k: v.float().numpy() for k, v in torch.load(published_head / "pytorch_model.bin",
                                                         weights_only=True).items()}
    np.testing.assert_array_equal(imported["fc"], state["fc.weight"].T)
    np.testing.assert_array_equal(imported["fc_bias"], state["fc.bias"])  # no "bias" key: the reference's default
    np.testing.assert_array_equal(imported["first_layer/self_attn/k_proj"],
                                  state["layers.0.self_attn.k_proj.weight"].T.reshape(32, 2, 8))
    features, tokens = sample_inputs(32, len(tokenizer), seed=2)
    got = our_features(tmp_path / "checkpoints", llama_dir, tokenizer, features, tokens, state["embed_tokens.weight"])
    np.testing.assert_allclose(got, reference_features(published_head, features, tokens), rtol=2e-5, atol=2e-5)


def test_fc_bias_false_in_the_config_means_no_fc_bias(llama_dir, tokenizer, tmp_path):
    config = published_config(tokenizer, bias=False, torch_dtype="float32")
    torch.manual_seed(6)
    tensors = {k: v.numpy() for k, v in ReferenceHead(config).state_dict().items()}
    _, tensors["embed_tokens.weight"] = target_of(llama_dir)
    eagle_format.write_head_dir(tmp_path / "head", config, tensors)
    import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(tmp_path / "head")))
    imported = head_params(tmp_path / "checkpoints", llama_dir, tokenizer)
    assert "fc_bias" not in imported
    np.testing.assert_array_equal(imported["fc"], tensors["fc.weight"].T)


def test_an_export_replaces_only_an_earlier_export_or_an_empty_directory(tmp_path):
    """--out naming a run directory, a published head, or any folder with other files, must not wipe it."""
    tensors = {"fc.weight": np.ones((2, 4), np.float32)}
    ours = {"flatspec": {"format_version": 1}}
    head = eagle_format.write_head_dir(tmp_path / "head", {"a": 1, **ours}, tensors)
    eagle_format.write_head_dir(head, {"a": 2, **ours}, tensors)  # an earlier export is replaced
    assert json.loads((head / "config.json").read_text()) == {"a": 2, **ours}
    (tmp_path / "empty").mkdir()
    eagle_format.write_head_dir(tmp_path / "empty", {"a": 3}, tensors)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "scores.parquet").write_bytes(b"finished work")
    with pytest.raises(FileExistsError, match=rf"{run} is a directory holding checkpoints, scores.parquet, not an "
                                              "exported head"):
        eagle_format.write_head_dir(run, {"a": 4}, tensors)
    assert (run / "scores.parquet").read_bytes() == b"finished work"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt is a file, not an exported head"):
        eagle_format.write_head_dir(tmp_path / "notes.txt", {"a": 5}, tensors)
    published = eagle_format.write_head_dir(tmp_path / "published", {"architectures": ["LlamaForCausalLM"]}, tensors)
    weights = (published / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"published is an EAGLE head that flatspec did not export"):
        eagle_format.write_head_dir(published, {"a": 6, **ours}, tensors)
    assert (published / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("head_exists", [False, True])
def test_an_export_clears_what_killed_exports_left(tmp_path, caplog, head_exists):
    """A partial head (.head.*.tmp) is deleted; a head set aside (.head.*.old/head) is put back when the kill
    came between the renames (no head), and deleted when its replacement is in place."""
    tensors = {"fc.weight": np.ones((2, 4), np.float32)}
    if head_exists:
        eagle_format.write_head_dir(tmp_path / "head", {"flatspec": {"new": 1}}, tensors)
    aside = eagle_format.write_head_dir(tmp_path / ".head.s3t4s1d3.old" / "head", {"flatspec": {"old": 1}}, tensors)
    partial = tmp_path / ".head.k1ll3d00.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a head")
    others = [".other.k1ll3d.tmp", ".head.v2.k1ll3d0.tmp", ".head.v2.s3t4s1d3.old"]  # other outputs' (head.v2)
    for name in others:
        (tmp_path / name).mkdir()
    (tmp_path / ".head.v2.s3t4s1d3.old" / "head.v2").mkdir()  # the only copy of head.v2
    with caplog.at_level("INFO", logger="flatspec_jax.checkpoint.eagle_format"):
        eagle_format.write_head_dir(tmp_path / "head", {"flatspec": {"newest": 1}}, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "head"])
    assert json.loads((tmp_path / "head" / "config.json").read_text()) == {"flatspec": {"newest": 1}}
    assert f"removing {partial}" in caplog.text
    assert (f"putting back {aside}" in caplog.text) is not head_exists


def edit_head(source: Path, destination: Path, config_changes: dict | None = None,
              tensor_changes: dict | None = None) -> Path:
    """A copy of a head directory with config fields and tensors replaced (None removes)."""
    config = json.loads((source / "config.json").read_text())
    for key, value in (config_changes or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    tensors = read_safetensors(source / "model.safetensors")
    for key, value in (tensor_changes or {}).items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return eagle_format.write_head_dir(destination, config, tensors)


@pytest.mark.parametrize("config_changes, tensor_changes, message", [
    ({"hidden_size": 64}, None, "field hidden_size = 64 does not match the target's 32"),
    ({"vocab_size": 1000}, None, "field vocab_size = 1000 does not match"),
    ({"num_key_value_heads": 4}, None, "field num_key_value_heads = 4 does not match the target's 2"),
    ({"intermediate_size": 128}, None, "field intermediate_size"),
    ({"qkv_bias": True}, None, "field qkv_bias = True but the target"),
    ({"flatspec": {"target_vocab_hash": "other"}}, None, "flatspec.target_vocab_hash: .*another tokenizer vocabulary"),
    ({"flatspec": {"target_arch": {"rms_norm_eps": 1e-6}}}, None,
     r"flatspec.target_arch: .*rms_norm_eps: head made for 1e-06, target has 1e-05"),
    (None, {"embed_tokens.weight": np.zeros((100, 32), np.float32)}, r"embed_tokens.weight has shape \(100, 32\)"),
    (None, {"layers.0.input_layernorm.weight": np.ones(32, np.float32)},
     "unexpected tensor 'layers.0.input_layernorm.weight'"),
    (None, {"layers.1.mlp.up_proj.weight": None}, "no tensor 'layers.1.mlp.up_proj.weight'"),
    (None, {"layers.1.mlp.up_proj.weight": np.zeros((32, 32), np.float32)},
     r"tensor layers.1.mlp.up_proj.weight: shape \(32, 32\) does not fit"),
    ({"num_hidden_layers": 3}, None, "no tensor 'layers.2."),
    ({"bias": False}, None, "unexpected tensor 'fc.bias'"),
    (None, {"layers.0.mlp.up_proj.weight": None, "d2t": np.zeros(8, np.int64),
            "midlayer.mlp.up_proj.weight": np.zeros((64, 32), np.float32)},
     r"an EAGLE-3 head \(tensor 'd2t'; 2 such\).*only EAGLE-1/2 heads are imported"),
])
def test_import_names_what_does_not_match_the_target(llama_run, llama_dir, tmp_path, config_changes,
                                                      tensor_changes, message):
    head = edit_head(llama_run[2], tmp_path / "head", config_changes, tensor_changes)
    if config_changes and "flatspec" in config_changes and "target_arch" in config_changes["flatspec"]:
        config = json.loads((head / "config.json").read_text())
        config["flatspec"]["target_arch"] = {**json.loads(target_of(llama_dir)[0].to_json()),
                                             **config_changes["flatspec"]["target_arch"]}
        (head / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=message):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(head)))
    assert not (tmp_path / "checkpoints").exists()


def test_imported_head_keeps_its_own_rope_and_norm_settings(llama_dir, tokenizer, tmp_path, caplog):
    """The reference runs a head with its config's RoPE and norm settings (the target here has llama3
    scaling, theta 1e4 and eps 1e-5; the head plain RoPE, theta 1e5 and the default eps 1e-6)."""
    config = published_config(tokenizer, rope_scaling=None, rope_theta=100000.0, rms_norm_eps=None,
                              torch_dtype="float32")
    torch.manual_seed(7)
    model = ReferenceHead(config)
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), head / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="flatspec_jax.checkpoint.eagle_format"):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(head)))
    assert "keeps its own rms_norm_eps = 1e-06 (the target has 1e-05)" in caplog.text
    _, meta = read_meta(tmp_path / "checkpoints")
    assert (meta["draft_arch"]["rope_theta"], meta["draft_arch"]["rope_scaling"],
            meta["draft_arch"]["rms_norm_eps"]) == (100000.0, None, 1e-6)
    features, tokens = sample_inputs(32, len(tokenizer), seed=3)
    embedding = model.embed_tokens.weight.detach().numpy()
    got = our_features(tmp_path / "checkpoints", llama_dir, tokenizer, features, tokens, embedding)
    np.testing.assert_allclose(got, reference_features(head, features, tokens), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("ids", [[], [3, 2], [1, 1], [0, 10 ** 6], [0, "1"], "0-4"])
def test_import_refuses_a_malformed_draft_vocabulary(llama_run, llama_dir, tmp_path, ids):
    head = edit_head(llama_run[2], tmp_path / "head", {"flatspec": {"draft_vocab": ids}})
    with pytest.raises(WeightsError, match=r"flatspec\.draft_vocab must be a non-empty ascending list of distinct"):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(head)))


def test_import_refuses_a_directory_that_holds_checkpoints(llama_run, llama_dir):
    run_dir, _, out = llama_run
    with pytest.raises(ConfigError, match=r"^the run's checkpoint directory \(the default --out\): .* already holds "
                                          r"checkpoints \(steps \[1, 3\]\)"):
        import_eagle.run(config_for(llama_dir, run_dir), import_args(input=str(out)))
    with pytest.raises(ConfigError, match=r"^--out: .* already holds checkpoints \(steps \[1, 3\]\)"):
        import_eagle.run(config_for(llama_dir, run_dir), import_args(input=str(out), out=str(run_dir / "checkpoints")))


def test_import_of_a_directory_without_weights_is_named(llama_dir, tmp_path):
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="field hidden_size must be an integer"):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(tmp_path / "head")))
    with pytest.raises(ValueError, match="config.json: not found"):
        import_eagle.run(config_for(llama_dir, tmp_path), import_args(input=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    """flatspec_jax.cli, keeping this session's jax configuration."""
    from flatspec_jax import cli, runtime

    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda: None)
    return cli


def test_cli_export_and_import(cli, llama_run, llama_dir, tokenizer, tmp_path, capsys):
    run_dir, saved, _ = llama_run
    common = ["--run-dir", str(run_dir), "--set", f"model.path={llama_dir}"]
    assert cli.main(["export", *common, "--format", "eagle", "--step", "1", "--dtype", "float16",
                     "--out", str(tmp_path / "fp16")]) == 0
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert cli.main(["import", *common, "--input", str(tmp_path / "fp16"), "--out", str(tmp_path / "ckpt")]) == 0
    imported = head_params(tmp_path / "ckpt", llama_dir, tokenizer)
    np.testing.assert_array_equal(imported["fc"], saved[1]["fc"].astype(np.float16).astype(np.float32))
    capsys.readouterr()
    bad = edit_head(tmp_path / "fp16", tmp_path / "bad", {"hidden_size": 48})
    assert cli.main(["import", *common, "--input", str(bad), "--out", str(tmp_path / "ckpt2")]) == 1
    err = capsys.readouterr().err
    assert "flatspec import: CheckpointMismatchError" in err and "field hidden_size = 48" in err
    with pytest.raises(SystemExit):
        cli.main(["export", *common, "--format", "onnx"])


@pytest.mark.parametrize("damage", ["garbled meta", "state removed", "state files cut", "largest array file halved"])
def test_a_damaged_checkpoint_step_is_named_with_what_to_do(llama_run, llama_dir, tokenizer, tmp_path, damage):
    import shutil

    run_dir, _, _ = llama_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", copy)
    step_dir = copy / str(max(int(p.name) for p in copy.iterdir() if p.name.isdigit()))
    if damage == "garbled meta":
        (step_dir / "meta" / "metadata").write_text("not json")
    elif damage == "state removed":
        shutil.rmtree(step_dir / "state")
    elif damage == "state files cut":
        for path in (step_dir / "state").rglob("*"):
            if path.is_file() and path.stat().st_size > 64 and path.parent.name == "d":
                path.write_bytes(path.read_bytes()[:32])
    else:  # orbax reports this one as a bare Exception
        largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                      key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match=rf"{step_dir}: cannot read its .*delete that directory"):
        head_params(copy, llama_dir, tokenizer)
