"""The header of a llama.cpp ``.gguf`` file: metadata values and tensor descriptions, parsed fast.

gguf's own ``GGUFReader`` builds a numpy view for every element of every metadata array. For a
tokenizer of 49k tokens and 49k merges that is ~4 s per open, and a cold ``flatspec score``
opened the file twice (weights, then tokenizer). This parser decodes the same header with
``struct`` over a memory map in ~0.1 s and returns plain Python values, equal to what
``GGUFReader``'s ``field.contents()`` returns (``tests/test_gguf_file.py`` checks both on the
embedded SmolLM2 file and on written files holding every value type), except that an array of
arrays stays nested where gguf flattens it. Tensor data is left in the map, in the layout
``gguf.quants.dequantize`` takes.

Format (version 2 and 3): magic ``GGUF``, version u32, tensor count u64, metadata count u64;
each metadata entry is a string key, a u32 value type and the value (string: u64 length + UTF-8
bytes; array: u32 element type, u64 count, elements); each tensor description is a string name,
a u32 dimension count, that many u64 dimensions (innermost first), a u32 ggml type and a u64
offset into the data section, which starts at the next multiple of ``general.alignment``
(default 32). A file written on a big-endian machine is read with the byte order swapped (its
plain tensors only: block-quantised ones are refused).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format of one scalar (byte order prefixed at use).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Tensor types stored element by element; every other type is blocks of bytes.
_PLAIN_TENSOR_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """A file that is not a well-formed GGUF file; the message names the file and the offset."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description and its bytes in the memory-mapped file.

    ``shape`` is in GGUF order (innermost dimension first, e.g. ``[in, out]`` for a linear
    weight). ``data`` is a read-only view of the file: for element-wise types
    ``[*reversed(shape)]`` of that dtype, for block-quantized types ``uint8`` rows of blocks
    (``[*reversed(shape)[:-1], bytes per row]``), which ``gguf.quants.dequantize`` takes.
    ``offset``: where ``data`` starts in the file, in bytes.
    """

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    data: np.ndarray


class GGUFFile:
    """The parsed header of a GGUF file: ``fields`` (key -> value) and ``tensors`` (in file order).

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      GGUFFormatError: naming the file for a bad magic or version, an unknown value or tensor
        type, a duplicated key or tensor name, invalid UTF-8, or data past the end of the file.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise GGUFFormatError(f"{self.path}: {size} bytes, too short for a GGUF header")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)
        if self._view[:4] != MAGIC:
            raise GGUFFormatError(f"{self.path}: no GGUF magic (starts with {bytes(self._view[:4])!r})")
        (version,) = struct.unpack_from("<I", self._view, 4)
        self._order = "<" if version & 0xFFFF else ">"
        if self._order == ">":
            (version,) = struct.unpack_from(">I", self._view, 4)
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{self.path}: GGUF version {version}; supported: {SUPPORTED_VERSIONS}")
        self.version = version
        tensor_count, field_count = struct.unpack_from(self._order + "QQ", self._view, 8)
        self._offset = 24
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            if key in self.fields:
                raise GGUFFormatError(f"{self.path}: metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._unpack("I"))
        descriptions = [self._tensor_description() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = self._tensors(descriptions, data_start)

    def _unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(self._order + fmt, self._view, self._offset)
        except struct.error as err:
            raise GGUFFormatError(f"{self.path}: truncated at byte {self._offset}") from err
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("Q")
        start, end = self._offset, self._offset + length
        if end > len(self._view):
            raise GGUFFormatError(f"{self.path}: string of {length} bytes at byte {start} runs past the end")
        self._offset = end
        try:
            return str(self._view[start:end], "utf-8")
        except UnicodeDecodeError as err:
            raise GGUFFormatError(f"{self.path}: string at byte {start} is not UTF-8") from err

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            element_type, count = self._unpack("I"), self._unpack("Q")
            if element_type in _SCALAR_FORMATS:
                return self._scalar_array(element_type, count)
            return [self._value(element_type) for _ in range(count)]
        if value_type in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[value_type])
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {value_type} before byte {self._offset}")

    def _scalar_array(self, element_type: int, count: int) -> list[Any]:
        dtype = np.dtype(self._order + _SCALAR_FORMATS[element_type])
        end = self._offset + count * dtype.itemsize
        if end > len(self._view):
            raise GGUFFormatError(f"{self.path}: array of {count} values at byte {self._offset} runs past the end")
        values = np.frombuffer(self._view, dtype=dtype, count=count, offset=self._offset).tolist()
        self._offset = end
        return values

    def _tensor_description(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        shape = tuple(self._unpack("Q") for _ in range(self._unpack("I")))
        return name, shape, self._unpack("I"), self._unpack("Q")

    def _tensors(self, descriptions: list[tuple[str, tuple[int, ...], int, int]],
                 data_start: int) -> list[GGUFTensor]:
        tensors, names = [], set()
        for name, shape, raw_type, offset in descriptions:
            if name in names:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} appears twice")
            names.add(name)
            try:
                tensor_type = GGMLQuantizationType(raw_type)
            except ValueError as err:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} has unknown ggml type {raw_type}") from err
            rows = tuple(reversed(shape))
            if tensor_type in _PLAIN_TENSOR_DTYPES:
                dtype = np.dtype(_PLAIN_TENSOR_DTYPES[tensor_type]).newbyteorder(self._order)
            elif self._order == ">":
                raise GGUFFormatError(f"{self.path}: tensor {name!r} is block-quantised ({tensor_type.name}) in a "
                                      "big-endian file; only its plain (F32, F16, ...) tensors can be byte-swapped")
            else:
                dtype, rows = np.dtype(np.uint8), quant_shape_to_byte_shape(rows, tensor_type)
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            n_bytes = int(np.prod(shape, dtype=np.int64)) * type_size // block_size
            start = data_start + offset
            if start + n_bytes > len(self._view):
                raise GGUFFormatError(f"{self.path}: data of tensor {name!r} ({n_bytes} bytes at byte {start}) "
                                      "runs past the end (truncated file?)")
            data = np.frombuffer(self._view, dtype=dtype, count=n_bytes // dtype.itemsize, offset=start)
            tensors.append(GGUFTensor(name, tensor_type, shape, start, data.reshape(rows)))
        return tensors
