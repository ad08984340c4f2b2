"""A minimal GGUF reader: metadata as Python values, tensors as views into a memory map.

``gguf.GGUFReader`` builds a numpy view per string of the vocabulary, which takes seconds for a
50k-token tokenizer; reading the same bytes with ``struct`` takes milliseconds. Layout (all
little-endian): magic, version, tensor count, metadata count, metadata key/values, tensor infos,
padding to ``general.alignment``, tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# value type -> (struct format, numpy dtype) for the fixed-size scalar types
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the contiguous dimension (ne0) first
    tensor_type: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray  # uint8 [rows, bytes per row], a read-only view of the file


class GGUFFile:
    """Parses one GGUF file once; tensor data stay in the (shared, read-only) memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:4] != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic {self._map[:4]!r}).")
        self._pos = 4
        self.version = self._scalar(4)
        if self.version < 2:
            raise ValueError(f"{path}: GGUF version {self.version} is too old (need 2 or 3).")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(*info, data_start) for info in infos]

    def _scalar(self, value_type: int) -> Any:
        fmt = _SCALARS[value_type][0]
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + length
        return self._map[start:self._pos].decode("utf-8", errors="replace")

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            return self._scalar(value_type)
        item_type, count = self._scalar(4), self._scalar(10)
        if item_type in _SCALARS and item_type != 7:
            dtype = np.dtype(_SCALARS[item_type][1])
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
            self._pos += dtype.itemsize * count
            return values.tolist()
        return [self._value(item_type) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._scalar(4)
        shape = tuple(self._scalar(10) for _ in range(n_dims))
        tensor_type = self._scalar(4)
        offset = self._scalar(10)
        return name, shape, tensor_type, offset

    def _tensor(self, name: str, shape: tuple[int, ...], tensor_type: int, offset: int,
                data_start: int) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
        row_bytes = shape[0] // block_size * type_size
        rows = int(np.prod(shape[1:], dtype=np.int64))
        data = np.frombuffer(self._map, dtype=np.uint8, count=rows * row_bytes,
                             offset=data_start + offset).reshape(rows, row_bytes)
        return GGUFTensor(name, shape, tensor_type, data)
