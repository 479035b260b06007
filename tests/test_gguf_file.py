"""``weights.gguf_file``: the fast GGUF header parser agrees with gguf's own ``GGUFReader`` and
names the file for every kind of malformed input."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian

from flatspec_jax import assets
from flatspec_jax.weights.gguf_file import GGUFFile, GGUFFormatError

# GGUF value types, as the file spells them.
UINT8, UINT32, STRING, ARRAY, INT32 = 0, 4, 8, 9, 5


def assert_same_as_gguf_reader(path: Path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.fields) == list(expected)
    for key, value in expected.items():
        assert ours.fields[key] == value, key
        assert type(ours.fields[key]) is type(value), key
        if isinstance(value, list) and value:
            assert [type(v) for v in ours.fields[key]] == [type(v) for v in value], key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == reference.tensor_type, mine.name
        assert mine.shape == tuple(reference.shape.tolist()), mine.name
        assert mine.offset == reference.data_offset, mine.name
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        np.testing.assert_array_equal(mine.data, reference.data, err_msg=mine.name)
    return ours


def write_every_value_type(path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE, quantized: bool = True) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1e-5)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 你好 🙂")
    writer.add_string("t.empty", "")
    writer.add_array("t.strings", ["a", "", "ß", "<|im_end|>"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1e-5, -2.25])
    writer.add_array("t.bools", [True, False, True])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 8)).astype(np.float16))
    block = rng.standard_normal((4, 64)).astype(np.float32)
    for qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1) if quantized else ():
        writer.add_tensor(qtype.name.lower(), gguf.quants.quantize(block, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_every_value_and_tensor_type_reads_as_gguf_reader_does(tmp_path, endianess):
    path = write_every_value_type(tmp_path / "all.gguf", endianess, quantized=endianess == GGUFEndian.LITTLE)
    parsed = assert_same_as_gguf_reader(path)
    assert parsed.fields["t.str"] == "héllo 你好 🙂" and parsed.fields["t.u64"] == 2**63 + 5


def test_a_big_endian_file_with_block_quantised_tensors_is_refused_naming_the_tensor(tmp_path):
    """Their blocks hold multi-byte scales this parser does not byte-swap."""
    path = write_every_value_type(tmp_path / "big.gguf", GGUFEndian.BIG)
    with pytest.raises(GGUFFormatError, match=rf"{path}: tensor 'q8_0' is block-quantised \(Q8_0\) in a big-endian"):
        GGUFFile(path)


def test_a_big_endian_file_gives_the_same_weights_as_a_little_endian_one(tmp_path):
    """dequantize reads plain tensors as native-order floats: a big-endian file's must be swapped first."""
    from flatspec_jax.weights.gguf_reader import GGUFCheckpoint

    rng = np.random.default_rng(0)
    hidden, ffn, vocab = 8, 16, 10
    arrays = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (4, hidden), "blk.0.attn_v.weight": (4, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in arrays.items()}
    arrays["output_norm.weight"] = arrays["output_norm.weight"].astype(np.float16)
    read = {}
    for endianess in (GGUFEndian.LITTLE, GGUFEndian.BIG):
        path = tmp_path / f"{endianess.name}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
        for name, array in arrays.items():
            writer.add_tensor(name, array.copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        checkpoint = GGUFCheckpoint(path)
        read[endianess] = {key: checkpoint.get(key) for key in checkpoint.keys()}
    assert read[GGUFEndian.BIG].keys() == read[GGUFEndian.LITTLE].keys()
    for key, values in read[GGUFEndian.LITTLE].items():
        np.testing.assert_array_equal(read[GGUFEndian.BIG][key], values, err_msg=key)
    np.testing.assert_array_equal(read[GGUFEndian.BIG]["model.layers.0.mlp.up_proj.weight"],
                                  arrays["blk.0.ffn_up.weight"])


def test_quantized_tensors_dequantize_from_the_map(tmp_path):
    parsed = GGUFFile(write_every_value_type(tmp_path / "all.gguf"))
    reference = {t.name: t for t in gguf.GGUFReader(parsed.path).tensors}
    for tensor in parsed.tensors:
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                      gguf.quants.dequantize(reference[tensor.name].data, tensor.tensor_type))


def test_the_embedded_smollm2_header_reads_as_gguf_reader_does():
    parsed = assert_same_as_gguf_reader(assets.smollm2_gguf())
    assert len(parsed.fields["tokenizer.ggml.tokens"]) == 49152 and len(parsed.tensors) == 2 + 30 * 9


def test_every_truncation_is_a_format_error_naming_the_file(tmp_path):
    path = write_every_value_type(tmp_path / "all.gguf")
    whole = path.read_bytes()
    needed = max(t.offset + t.data.nbytes for t in GGUFFile(path).tensors)
    cut_path = tmp_path / "cut.gguf"
    for cut in range(needed):
        cut_path.write_bytes(whole[:cut])
        with pytest.raises(GGUFFormatError, match=str(cut_path)):
            GGUFFile(cut_path)


def header(fields: list[tuple[str, int, bytes]], version: int = 3, tensors: int = 0) -> bytes:
    """A little-endian GGUF header with hand-encoded metadata values."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    body = b"".join(string(key) + struct.pack("<I", value_type) + payload for key, value_type, payload in fields)
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(fields)) + body + b"\0" * 32


@pytest.mark.parametrize("content, words", [
    (b"GGML" + b"\0" * 40, "no GGUF magic"),
    (header([], version=1), "version 1"),
    (header([("k", 13, b"")]), "unknown metadata value type 13"),
    (header([("k", UINT8, b"\1"), ("k", UINT8, b"\2")]), "'k' appears twice"),
    (header([("k", STRING, struct.pack("<Q", 2) + b"\xff\xfe")]), "not UTF-8"),
    (header([("k", STRING, struct.pack("<Q", 2**40))]), "runs past the end"),
    (header([("k", ARRAY, struct.pack("<IQ", INT32, 2**40))]), "runs past the end"),
    (header([("general.alignment", UINT32, struct.pack("<I", 24))]), "not a power of two"),
    (b"GGUF\3\0", "too short"),
])
def test_malformed_headers_are_named(tmp_path, content, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match=str(path)) as info:
        GGUFFile(path)
    assert words in str(info.value)


def test_hand_encoded_header_values(tmp_path):
    path = tmp_path / "hand.gguf"
    nested = (struct.pack("<IQ", ARRAY, 2) + struct.pack("<IQ", UINT8, 2) + b"\1\2"
              + struct.pack("<IQ", UINT8, 1) + b"\3")
    empty = struct.pack("<IQ", STRING, 0)
    path.write_bytes(header([("a", UINT32, struct.pack("<I", 7)), ("nested", ARRAY, nested), ("empty", ARRAY, empty)]))
    assert GGUFFile(path).fields == {"a": 7, "nested": [[1, 2], [3]], "empty": []}


def test_a_gguf_without_tokenizer_metadata_is_a_weights_error_naming_it(tmp_path):
    from flatspec_jax.data.tokenizer import build_gguf_tokenizer
    from flatspec_jax.weights.errors import WeightsError

    path = write_every_value_type(tmp_path / "no_tokenizer.gguf")
    with pytest.raises(WeightsError, match=rf"{path}: GGUF metadata has no .*tokenizer\.ggml\.tokens"):
        build_gguf_tokenizer(path)


def test_a_model_directory_without_tokenizer_files_is_a_weights_error_naming_it(tmp_path):
    from flatspec_jax.data.tokenizer import load_tokenizer
    from flatspec_jax.weights.errors import WeightsError

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(WeightsError, match=rf"^{tmp_path}: no usable tokenizer"):
        load_tokenizer(tmp_path)
