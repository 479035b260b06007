"""A llama.cpp ``.gguf`` file: metadata -> ArchSpec, tensors -> float32 under HF names, cached.

Reading a GGUF file directly costs seconds every process (for SmolLM2-135M Q4_1: ~2 s to
dequantize in numpy, after a header parse that :mod:`.gguf_file` keeps to ~0.1 s). So
:func:`open_gguf` writes the dequantized, un-permuted float32 tensors, under their HF names,
once, to ``<cache dir>/<sha256 of the .gguf>.v1.safetensors`` together with the ArchSpec;
later opens hash the file and read tensors lazily from the cache, never touching the GGUF
parser. :class:`GGUFCheckpoint` reads the file directly and builds the cache.

* Cache dir: the ``cache_dir`` argument, else ``gguf/`` under the project's cache root,
  ``$FLATSPEC_CACHE_DIR`` or ``~/.cache/flatspec_jax`` (as ``runtime.cache_root``, which we
  cannot import: it imports jax).
* Key: sha256 of the whole .gguf file. It costs ~0.1 s for a 100 MB file (~1 s/GB) and
  cannot be fooled by a file edited in place or copied with new timestamps, which cheaper
  keys (size, mtime, sampled bytes) can.
* Writes are atomic: a temporary file in the cache dir, fsynced and renamed over the final
  name only when complete, so a killed process (or a power cut) leaves no partial cache, only a
  stale temporary file that a later build removes. A cache that fails to parse (wrong format,
  truncated, bad header) is ignored with a warning and rebuilt. The data is not checksummed: a
  cache whose bytes were altered after it was written is not detected.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from gguf.quants import dequantize

from flatspec_jax.fingerprint import file_sha256
from flatspec_jax.weights.arch import ArchSpec
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.gguf_file import GGUFFile, GGUFTensor
from flatspec_jax.weights.reader import CheckpointReader
from flatspec_jax.weights.safetensors_reader import SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The HF key of a GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None for a tensor we have no place for."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _PER_LAYER:
        return f"model.layers.{int(match[1])}.{_PER_LAYER[match[2]]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: GGUF rows -> HF rows.

    llama.cpp's converter (``LlamaModel.permute``) reorders each head's output rows from HF's
    rotate-half layout to interleaved pairs: ``w.reshape(n, 2, H/2, in).swapaxes(1, 2)``. This
    is its inverse. ``weight``: ``[num_heads * head_dim, ...]`` with ``num_heads`` the KV head
    count for K.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint(CheckpointReader):
    """Tensors of a GGUF file, dequantized to float32 on :meth:`get`, in HF names and orientation.

    GGUF lists dimensions innermost first (``ne``), i.e. ``[in, out]`` for a linear weight;
    the row-major data is the same as HF's ``[out, in]``, so the shapes are reversed here.

    Raises:
      WeightsError: naming the file for a missing, truncated or malformed file, a missing or
        invalid metadata key, an unsupported architecture, or a tensor with no HF equivalent.
    """

    def __init__(self, path: str | Path):
        self.source = str(path)
        try:
            reader = GGUFFile(path)
        except FileNotFoundError as e:
            raise WeightsError(f"{path}: GGUF file not found") from e
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from e
        self._tensors: dict[str, GGUFTensor] = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if tensor.name == "rope_freqs.weight":
                raise WeightsError(f"{path}: GGUF tensor 'rope_freqs.weight' holds RoPE frequency factors (Llama "
                                   "3.1-style scaling), which a GGUF target cannot use here; load the model's HF "
                                   "checkpoint directory, whose config.json rope_scaling is supported")
            if name is None:
                raise WeightsError(f"{path}: GGUF tensor {tensor.name!r} has no HF Llama-family equivalent "
                                   "(unsupported model feature)")
            self._tensors[name] = tensor
        self.arch = ArchSpec.from_hf_config(_hf_config(reader, self._tensors, self.source), self.source)
        # Only llama.cpp's LlamaModel permutes Q/K; Qwen2 GGUFs keep HF's row order.
        self._rope_heads: dict[str, int] = {}
        if self.arch.architecture == "llama":
            for i in range(self.arch.num_layers):
                self._rope_heads[f"model.layers.{i}.self_attn.q_proj.weight"] = self.arch.num_heads
                self._rope_heads[f"model.layers.{i}.self_attn.k_proj.weight"] = self.arch.num_kv_heads

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise self._missing(name)
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        """One tensor as a fresh float32 array, HF orientation and row order."""
        if name not in self._tensors:
            raise self._missing(name)
        tensor = self._tensors[name]
        data = tensor.data  # a big-endian file's plain tensors to native order: dequantize reads them as native
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        try:
            values = dequantize(data, tensor.tensor_type)
        except NotImplementedError as err:
            raise WeightsError(f"{self.source}: GGUF tensor {name} is stored as {tensor.tensor_type.name}, which "
                               f"cannot be dequantized ({err})") from None
        if np.may_share_memory(values, tensor.data):  # F32 comes back as a view of the mapped file
            values = values.copy()
        values = values.reshape(self.shape(name)).astype(np.float32, copy=False)
        if name in self._rope_heads:
            values = unpermute_rope_rows(values, self._rope_heads[name])
        return values

    def close(self) -> None:
        self._tensors = {}


def _hf_config(reader: GGUFFile, tensors: dict[str, GGUFTensor], source: str) -> dict[str, Any]:
    """GGUF metadata as the HF config keys :meth:`ArchSpec.from_hf_config` validates."""

    def value(key: str, required: bool = True) -> Any:
        if key not in reader.fields and required:
            raise WeightsError(f"{source}: GGUF metadata key {key} is missing")
        return reader.fields.get(key)

    arch = value("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise WeightsError(f"{source}: GGUF general.architecture is {arch!r}, which is not supported; "
                           f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    if value(f"{arch}.expert_count", required=False):
        raise WeightsError(f"{source}: GGUF {arch}.expert_count is set; mixture-of-experts is not supported")
    scaling = value(f"{arch}.rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise WeightsError(f"{source}: GGUF {arch}.rope.scaling.type is {scaling!r}, which is not supported")
    for key in (f"{arch}.rope.scale_linear", f"{arch}.rope.scaling.factor") if scaling is None else ():
        factor = value(key, required=False)  # older files scale without naming a type
        if factor not in (None, 0, 1):
            raise WeightsError(f"{source}: GGUF {key} is {factor}, a RoPE scaling that is not supported")
    if "model.embed_tokens.weight" not in tensors:
        raise WeightsError(f"{source}: GGUF tensor token_embd.weight is missing")

    hidden = value(f"{arch}.embedding_length")
    num_heads = value(f"{arch}.attention.head_count")
    head_dim = value(f"{arch}.attention.key_length", required=False)
    rotary_dims = value(f"{arch}.rope.dimension_count", required=False)
    if rotary_dims is not None and num_heads and rotary_dims != (head_dim or hidden // num_heads):
        raise WeightsError(f"{source}: GGUF {arch}.rope.dimension_count = {rotary_dims} is not the head size; "
                           "partial RoPE is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size", required=False) or (len(tokens) if tokens else None)
    embedding_rows = int(tensors["model.embed_tokens.weight"].shape[-1])
    if vocab is not None and vocab != embedding_rows:
        raise WeightsError(f"{source}: vocabulary of {vocab} tokens but token_embd.weight has {embedding_rows} rows")
    return {
        "model_type": arch,
        "vocab_size": embedding_rows,
        "hidden_size": hidden,
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv", required=False),
        "head_dim": head_dim,
        "rms_norm_eps": value(f"{arch}.attention.layer_norm_rms_epsilon"),
        # Absent means llama.cpp's default base, 10000, which is also HF's.
        "rope_theta": value(f"{arch}.rope.freq_base", required=False),
        "max_position_embeddings": value(f"{arch}.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": value("tokenizer.ggml.bos_token_id", required=False),
        # Generation stops at either (Llama 3 GGUFs may name <|end_of_text|> as eos, <|eot_id|> as eot).
        "eos_token_id": list(dict.fromkeys(i for i in (value("tokenizer.ggml.eos_token_id", required=False),
                                                       value("tokenizer.ggml.eot_token_id", required=False))
                                           if i is not None)),
        # For llama this flags q/k/v biases, which from_hf_config refuses (see there).
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
    }


# --- the float32 cache ------------------------------------------------------------------

CACHE_DIR_ENV = "FLATSPEC_CACHE_DIR"
# Bumped whenever what is cached changes (names, orientation, dtype, ArchSpec fields).
_VERSION = "v2"
_FORMAT = f"flatspec_jax.gguf_cache.{_VERSION}"
# A temporary file untouched this long belongs to a build that died.
_STALE_TEMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """``$FLATSPEC_CACHE_DIR/gguf``, else ``~/.cache/flatspec_jax/gguf``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "flatspec_jax") / "gguf"


def _gguf_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read GGUF file ({e.strerror})") from e


class CachedGGUFCheckpoint(CheckpointReader):
    """The float32 tensors of a GGUF file, read lazily (one tensor at a time) from its cache.

    ``source`` is the .gguf file, so errors name the model the user asked for.

    Raises:
      WeightsError: naming the cache file when it is not a complete cache of this GGUF file.
    """

    def __init__(self, cache_file: Path, gguf_path: str, digest: str):
        self.source = gguf_path
        self.cache_file = cache_file
        self._file = SafetensorsFile(cache_file)
        try:
            metadata = self._file.metadata
            if metadata.get("format") != _FORMAT or metadata.get("gguf_sha256") != digest:
                raise WeightsError(f"{cache_file}: not a {_FORMAT} cache of {gguf_path}")
            self.arch = ArchSpec.from_json(str(metadata.get("arch")), str(cache_file))
        except WeightsError:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return sorted(self._file.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._file.tensors:
            raise self._missing(name)
        return self._file.tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        if name not in self._file.tensors:
            raise self._missing(name)
        return self._file.read(name)

    def close(self) -> None:
        self._file.close()


def open_gguf(path: str | Path, cache_dir: str | Path | None = None) -> CheckpointReader:
    """A reader of a .gguf file, served from the float32 cache, which is built on first use.

    When the cache cannot be written (read-only dir, full disk), warns and returns a direct
    :class:`GGUFCheckpoint` instead.

    Raises:
      WeightsError: naming the file when it is missing, unreadable or unsupported.
    """
    path = str(path)
    digest = _gguf_sha256(path)
    cache_file = Path(cache_dir or default_cache_dir()) / f"{digest}.{_VERSION}.safetensors"
    if cache_file.exists():
        try:
            return CachedGGUFCheckpoint(cache_file, path, digest)
        except WeightsError as e:
            warnings.warn(f"ignoring unreadable GGUF cache, rebuilding it: {e}", RuntimeWarning, stacklevel=2)
    direct = GGUFCheckpoint(path)
    try:
        _build(direct, cache_file, digest)
    except OSError as e:
        warnings.warn(f"cannot write GGUF cache {cache_file} ({e}); dequantizing {path} on every read",
                      RuntimeWarning, stacklevel=2)
        return direct
    direct.close()
    return CachedGGUFCheckpoint(cache_file, path, digest)


def _build(reader: GGUFCheckpoint, cache_file: Path, digest: str) -> None:
    """Writes every tensor of ``reader`` to ``cache_file`` atomically, one tensor in memory at a time."""
    start = time.perf_counter()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_file)
    names = reader.keys()
    specs = {name: (np.dtype(np.float32), reader.shape(name)) for name in names}
    metadata = {"format": _FORMAT, "gguf_sha256": digest, "gguf_path": reader.source, "arch": reader.arch.to_json()}
    fd, temp = tempfile.mkstemp(dir=cache_file.parent, prefix=f"{cache_file.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "wb") as f:
            write_safetensors(f, specs, ((name, reader.get(name)) for name in names), metadata)
            # On disk before the rename, so not even a power cut can leave a complete-looking
            # file with missing data (~0.7 s once, for 540 MB).
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, cache_file)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    log.info("cached dequantized %s as %s in %.1f s", reader.source, cache_file, time.perf_counter() - start)


def _remove_stale_temps(cache_file: Path) -> None:
    """Deletes temporary files that builds of this cache left when they were killed."""
    for temp in cache_file.parent.glob(f"{cache_file.name}.*.tmp"):
        try:
            if time.time() - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                temp.unlink()
        except OSError:
            pass  # another process removed or renamed it meanwhile
