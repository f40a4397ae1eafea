"""The GGUF container (llama.cpp's file format), parsed with bounds checks: metadata, tensor infos, raw tensor bytes.

Why not gguf.GGUFReader: it builds a numpy memmap view per metadata element, which takes 7 s (and 25 s on a
busy 2-core host) for SmolLM2's 49152 tokens and 48900 merges, and a damaged file makes it fail with an
IndexError or a reshape ValueError. This reader takes ~0.3 s, and every overrun is a "truncated" LowbitError
naming the file and the byte offset. Dequantization stays with the `gguf` package (gguf_file.py).

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each
metadata entry is a key string, a value type u32 and the value (arrays: item type u32, count u64, items);
each tensor info is a name, n_dims u32, dims u64 x n_dims (innermost first), type u32, offset u64. Tensor
data starts at the next multiple of general.alignment (default 32) after the infos; offsets are relative to it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# Value type -> (struct format, numpy dtype) for the fixed-size types.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, numpy-order shape (outermost first), ggml type id, and absolute byte range in the file."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    start: int
    n_bytes: int


@dataclass(frozen=True)
class GgufContents:
    """Metadata (scalars as Python values, arrays as lists or numpy arrays) and tensor infos, in file order."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data: np.ndarray  # the whole file, uint8

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        return self.data[info.start:info.start + info.n_bytes]


class _Cursor:
    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0
        self.raw = memoryview(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise LowbitError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes but the "
                              f"file has {len(self.buf)}; download or convert it again")

    def scalar(self, type_id: int, what: str) -> Any:
        fmt, _ = _SCALARS[type_id]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        self.need(n, what)
        try:
            text = bytes(self.raw[self.pos:self.pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise LowbitError(f"{self.path}: damaged GGUF file: {what} at byte {self.pos} is not UTF-8") from None
        self.pos += n
        return text

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings; the loop of `string` inlined, as a vocabulary holds ~100k of them."""
        raw, pos, end, out = self.raw, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                self.pos = pos
                if pos + 8 > end:
                    self.need(8, what)
                (n,) = length(raw, pos)
                if pos + 8 + n > end:
                    self.pos = pos + 8
                    self.need(n, what)
                out.append(str(raw[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise LowbitError(f"{self.path}: damaged GGUF file: {what} at byte {pos} is not UTF-8") from None
        self.pos = pos
        return out

    def value(self, type_id: int, what: str) -> Any:
        if type_id in _SCALARS:
            return self.scalar(type_id, what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            item_type, count = self.scalar(4, what), self.scalar(10, what)
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                self.need(count * dtype.itemsize, what)
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return array
            if item_type == _STRING:
                return self.strings(count, what)
            if item_type == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(count)]
        raise LowbitError(f"{self.path}: damaged GGUF file: {what} has unknown value type {type_id}")


def parse_gguf(path: Path) -> GgufContents:
    """Parse a GGUF file; a LowbitError names the file for a missing, non-GGUF, unsupported or truncated one."""
    if path.is_dir():
        raise LowbitError(f"{path}: is a folder; give the path of a .gguf file")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # not a memmap: numpy's memmap views cost ~10 us each
    except FileNotFoundError:
        raise LowbitError(f"{path}: no such file; give the path of a .gguf checkpoint (llama.cpp format)") from None
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read it: {e}") from e
    magic = bytes(data[:4])
    if magic != GGUF_MAGIC:
        raise LowbitError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); convert the "
                          "checkpoint with llama.cpp's convert_hf_to_gguf.py")
    cur = _Cursor(data, path)
    cur.pos = 4
    version = cur.scalar(4, "the version")
    if version not in SUPPORTED_VERSIONS:
        raise LowbitError(f"{path}: GGUF version {version} is not supported (versions "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))}, little-endian)")
    n_tensors, n_kv = cur.scalar(10, "the tensor count"), cur.scalar(10, "the metadata count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        metadata[key] = cur.value(cur.scalar(4, f"the type of {key}"), key)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar(4, f"the rank of {name}")
        dims = [cur.scalar(10, f"the shape of {name}") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cur.scalar(4, f"the type of {name}"),
                      cur.scalar(10, f"the offset of {name}")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment < 1:
        raise LowbitError(f"{path}: damaged GGUF file: general.alignment is {alignment}")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, type_id, offset in infos:
        n_bytes = _tensor_bytes(path, name, shape, type_id)
        end = data_start + offset + n_bytes
        if end > len(data):
            raise LowbitError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end} but the file has "
                              f"{len(data)} bytes; download or convert it again")
        tensors.append(TensorInfo(name, shape, type_id, data_start + offset, n_bytes))
    return GgufContents(path, version, metadata, tuple(tensors), data)


def _tensor_bytes(path: Path, name: str, shape: tuple[int, ...], type_id: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise LowbitError(f"{path}: tensor {name} has ggml type {type_id}, which the gguf package does not "
                          "know; update it (pip install -U gguf)") from None
    n = int(np.prod(shape, dtype=np.int64))
    if not shape or shape[-1] % block:
        raise LowbitError(f"{path}: tensor {name} of shape {shape} does not split into blocks of {block}")
    return n // block * size
