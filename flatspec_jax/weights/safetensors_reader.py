"""A Hugging Face model directory: ``config.json`` plus safetensors weights, single or sharded.

Also the safetensors format itself, read and written one tensor at a time (the GGUF cache is
a safetensors file too). Why not ``safetensors.safe_open(..., framework="numpy")``: in
safetensors 0.8 it raises ``TypeError: data type 'bfloat16' not understood`` on BF16 tensors,
the usual dtype of HF checkpoints, and its other frameworks would pull in torch or jax. The
format is small and documented (https://huggingface.co/docs/safetensors): an 8-byte
little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the data buffer, offsets counted from its
start. BF16 and FP8 map to ``ml_dtypes`` (which jax installs), so tensors come back bit-exact
in their stored dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from flatspec_jax.weights.arch import ArchSpec, with_generation_stops
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.reader import CheckpointReader

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Headers are a few MB at most (one small JSON entry per tensor); this bounds what a corrupt
# length field could make us allocate.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the data buffer."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """An open ``.safetensors`` file whose header has been validated.

    Only the header is read when opening; :meth:`read` reads one tensor into a fresh array,
    so peak host memory is one tensor, and reads may run from several threads.

    Raises:
      WeightsError: naming the file (and tensor) when it is missing, truncated or malformed.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._file: BinaryIO | None = open(path, "rb")
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot open safetensors file ({e.strerror})") from e
        try:
            self._data_start, self.metadata, self.tensors = self._parse_header(os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self.close()
            raise

    def _parse_header(self, size: int) -> tuple[int, dict[str, str], dict[str, TensorInfo]]:
        """(data buffer start, metadata, tensors), validated against the file size."""
        if size < 8:
            raise WeightsError(f"{self.path}: not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", self._pread(8, 0))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(f"{self.path}: not a safetensors file, or truncated "
                               f"(header of {header_len} bytes in a file of {size})")
        try:
            header = json.loads(self._pread(header_len, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object)")
        data_start = 8 + header_len
        tensors = {name: self._info(name, entry, size - data_start) for name, entry in header.items()}
        return data_start, metadata, tensors

    def _info(self, name: str, entry: object, data_size: int) -> TensorInfo:
        try:
            dtype = _DTYPES[entry["dtype"]]  # type: ignore[index]
            shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
            begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from e
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or min(shape, default=0) < 0:
            raise WeightsError(f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not fit "
                               f"shape {shape} of {entry['dtype']}")  # type: ignore[index]
        if end > data_size:
            raise WeightsError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of a "
                               f"{data_size}-byte data buffer")
        return TensorInfo(dtype, shape, begin, end)

    def read(self, name: str) -> np.ndarray:
        """A fresh array of one tensor, in its stored dtype and shape (KeyError if absent)."""
        info = self.tensors[name]
        out = np.empty(info.shape, info.dtype)
        self._pread_into(out.reshape(-1).view(np.uint8), self._data_start + info.begin)
        return out

    def _pread(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        self._pread_into(memoryview(buffer), offset)
        return bytes(buffer)

    def _pread_into(self, buffer: np.ndarray | memoryview, offset: int) -> None:
        """Fills ``buffer`` from the file at ``offset``.

        Positional reads rather than mmap: mapped pages would stay in the process's resident
        set until close (the whole model, for a full load), and pread keeps reads thread-safe.
        """
        if self._file is None:
            raise WeightsError(f"{self.path}: read after close()")
        done = 0
        while done < len(buffer):  # a single call returns at most ~2 GiB on Linux
            count = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            if count == 0:
                raise WeightsError(f"{self.path}: truncated at byte {offset + done}")
            done += count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_safetensors(f: BinaryIO, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                      arrays: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> None:
    """Streams tensors into a safetensors file, holding only one in memory at a time.

    The header must come first, so the dtypes and shapes are declared up front in ``specs``;
    ``arrays`` then yields the tensors in the same order.

    Raises:
      ValueError: when an array does not match its declared name, dtype or shape.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, shape) in specs.items():
        end = offset + math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec pads the header to 8-byte alignment
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    expected = iter(specs.items())
    for name, array in arrays:
        want_name, (dtype, shape) = next(expected)
        if (name, array.dtype, array.shape) != (want_name, np.dtype(dtype), tuple(shape)):
            raise ValueError(f"tensor {name} {array.dtype}{array.shape} does not match the declared "
                             f"{want_name} {np.dtype(dtype)}{tuple(shape)}")
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    if next(expected, None) is not None:
        raise ValueError("fewer arrays than declared tensors")


CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path, what: str) -> Any:
    """A JSON file's contents; WeightsError naming the path if it is missing or malformed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: {what} not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read {what} ({e})") from e


class SafetensorsCheckpoint(CheckpointReader):
    """Tensors of an HF directory, in their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Names and orientation are exactly the checkpoint's (HF ``[out, in]``). Every shard's
    header is read and checked against the index when opening; tensor data only on :meth:`get`.

    Raises:
      WeightsError: naming the path for a missing directory, config or weights file, an index
        entry whose shard is missing or lacks the tensor, or a malformed file.
    """

    def __init__(self, directory: str | Path):
        root = Path(directory)
        self.source = str(root)
        if not root.is_dir():
            raise WeightsError(f"{root}: not a directory (expected an HF model directory)")
        config_path = root / CONFIG_NAME
        config = _read_json(config_path, "model config")
        if not isinstance(config, dict):
            raise WeightsError(f"{config_path}: not a JSON object")
        self.arch = ArchSpec.from_hf_config(config, str(config_path))
        generation_path = root / GENERATION_CONFIG_NAME
        if generation_path.is_file():  # generation stops at its eos ids too, as in transformers' generate
            self.arch = with_generation_stops(self.arch, _read_json(generation_path, "generation config"),
                                              str(generation_path))
        self._files: dict[str, SafetensorsFile] = {}
        try:
            self._shard_of = self._open_shards(root)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, root: Path) -> dict[str, SafetensorsFile]:
        """Opens every weights file; returns the file holding each tensor."""
        index_path = root / INDEX_NAME
        if not index_path.exists():
            if not (root / SINGLE_NAME).exists():
                raise WeightsError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors weights are read)")
            single = self._files[SINGLE_NAME] = SafetensorsFile(root / SINGLE_NAME)
            return dict.fromkeys(single.tensors, single)
        weight_map = _read_json(index_path, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise WeightsError(f"{index_path}: no weight_map of tensor name -> shard file")
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise WeightsError(f"{index_path}: shard {shard} (tensors e.g. "
                                   f"{next(n for n, s in weight_map.items() if s == shard)}) "
                                   f"does not exist: {root / shard}")
            self._files[shard] = SafetensorsFile(root / shard)
        for name, shard in weight_map.items():
            if name not in self._files[shard].tensors:
                raise WeightsError(f"{index_path}: tensor {name} is mapped to {root / shard}, which lacks it")
        return {name: self._files[shard] for name, shard in weight_map.items()}

    def keys(self) -> list[str]:
        return sorted(self._shard_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shard_of:
            raise self._missing(name)
        return self._shard_of[name].tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        if name not in self._shard_of:
            raise self._missing(name)
        return self._shard_of[name].read(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
