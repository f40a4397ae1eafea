"""Vector-quantized weights: a linear's weight [out, in] as codebook indices (VPTQ / AQLM style).

Each row is normalized by its own float32 scale (`row_scale`: the codebook is shared by rows of very different
magnitudes) and cut into vectors of `v` consecutive input columns. A stage is an int8 codebook [k, v] with one
float32 scale and one index (log2(k) bits) per vector; with a second (residual) stage the vector is the sum of
the two stages' codewords. So a weight is

    w[r, j*v + t] = row_scale[r] * sum over stages s of codebook_s[index_s[r, j], t] * codebook_scale_s

Storage (`to_tensors`, under a prefix such as ``layers.0.mlp.up_proj.weight.``):
- `layout`: int64 [3 + 2 * stages] = (out, in, stages, v_0, bits_0, v_1, bits_1, ...), so the tensors describe
  themselves;
- `row_scales`: float32 [out];
- per stage s: `codebook{s}` int8 [2^bits_s, v_s], `codebook_scale{s}` float32 [1], and `indices{s}`: uint8, each
  row's indices packed as `pack_bits` packs (one little-endian bit stream per row). Indices of more than 8 bits
  are two streams side by side in the row: the low 8 bits of every index, then the high bits_s - 8.

`nbytes` counts those stored bytes exactly: packed indices, codebooks, their scales and the row scales (not the
`layout` header). Bits per weight are therefore index bits / v plus the codebook and scale overhead: a 256 x 4
int8 codebook on a 576 x 576 linear adds 0.025, its row scales 0.056.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import LowbitError
from .groupwise_weights import pack_bits, packed_bytes, unpack_bits

SCALE_BYTES = 4  # row and codebook scales are float32
MAX_INDEX_BITS = 16


def index_bytes(n: int, bits: int) -> int:
    """Bytes of one row of `n` packed indices of `bits` bits (two streams above 8 bits)."""
    return packed_bytes(n, bits) if bits <= 8 else packed_bytes(n, 8) + packed_bytes(n, bits - 8)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint16 indices [rows, n] < 2^bits -> uint8 [rows, index_bytes(n, bits)]."""
    if bits <= 8:
        return pack_bits(indices.astype(np.uint8), bits)
    return np.concatenate([pack_bits((indices & 0xFF).astype(np.uint8), 8),
                           pack_bits((indices >> 8).astype(np.uint8), bits - 8)], axis=1)


def unpack_indices(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_indices`: uint16 [rows, n]."""
    if bits <= 8:
        return unpack_bits(packed, n, bits).astype(np.uint16)
    low = packed_bytes(n, 8)
    return (unpack_bits(packed[:, :low], n, 8).astype(np.uint16)
            | (unpack_bits(packed[:, low:], n, bits - 8).astype(np.uint16) << 8))


@dataclass(frozen=True)
class VQStage:
    """One codebook stage: int8 codewords [2^bits, v] times a float32 `scale`, and an index per vector."""

    codebook: np.ndarray
    scale: np.float32
    indices: np.ndarray  # uint16 [out, in / v]

    @property
    def vector(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def bits(self) -> int:
        return int(self.codebook.shape[0]).bit_length() - 1

    def codewords(self) -> np.ndarray:
        """The float32 codewords [k, v] the weights are made of."""
        return self.codebook.astype(np.float32) * np.float32(self.scale)


@dataclass(frozen=True)
class VQWeights:
    """Row-normalized vector-quantized weights [out, in]: `row_scale` float32 [out] and one or two `stages`."""

    row_scale: np.ndarray
    stages: tuple[VQStage, ...]
    in_features: int

    MAX_STAGES: ClassVar[int] = 2
    KEY: ClassVar[str] = "codebook0"  # the tensor that tells this format's files from the others

    def __post_init__(self) -> None:
        if self.row_scale.ndim != 1 or self.row_scale.dtype != np.float32:
            raise ValueError(f"row_scale must be float32 [out], not {self.row_scale.dtype} "
                             f"{list(self.row_scale.shape)}")
        if not np.all(np.isfinite(self.row_scale)) or not np.all(self.row_scale > 0):
            raise ValueError("row scales must be finite and positive")
        if not 1 <= len(self.stages) <= self.MAX_STAGES:
            raise ValueError(f"{len(self.stages)} codebook stages; expected 1 (plain) or 2 (with a residual)")
        out, k = len(self.row_scale), self.in_features
        for s, stage in enumerate(self.stages):
            cb = stage.codebook
            entries = cb.shape[0] if cb.ndim == 2 else 0
            if cb.dtype != np.int8 or cb.ndim != 2 or entries < 2 or entries & (entries - 1) or cb.shape[1] < 1:
                raise ValueError(f"codebook {s} must be int8 [2^bits, v] with 1 <= bits <= {MAX_INDEX_BITS}, "
                                 f"not {cb.dtype} {list(cb.shape)}")
            if stage.bits > MAX_INDEX_BITS:
                raise ValueError(f"codebook {s} has {entries} entries; at most 2^{MAX_INDEX_BITS}")
            if k % stage.vector:
                raise ValueError(f"codebook {s}: vectors of {stage.vector} do not tile {k} input columns")
            if not (np.isfinite(stage.scale) and stage.scale > 0):
                raise ValueError(f"codebook {s} scale {stage.scale}: expected finite and positive")
            shape = [out, k // stage.vector]
            if stage.indices.dtype != np.uint16 or list(stage.indices.shape) != shape:
                raise ValueError(f"indices {s} must be uint16 {shape}, not {stage.indices.dtype} "
                                 f"{list(stage.indices.shape)}")
            if stage.indices.size and int(stage.indices.max()) >= entries:
                raise ValueError(f"indices {s} reach {int(stage.indices.max())}; codebook {s} has {entries} entries")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_scale), self.in_features

    @property
    def name(self) -> str:
        return " + ".join(f"v{s.vector} k{1 << s.bits}" for s in self.stages)

    def dequantize(self) -> np.ndarray:
        """The float32 weights [out, in] the layer computes with."""
        out, k = self.shape
        w = np.zeros((out, k), np.float32)
        for stage in self.stages:
            w += stage.codewords()[stage.indices].reshape(out, k)
        return w * self.row_scale[:, None]

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed indices, int8 codebooks, their float32 scales and the float32 row scales."""
        out, k = self.shape
        return SCALE_BYTES * out + sum(out * index_bytes(k // s.vector, s.bits) + s.codebook.size + SCALE_BYTES
                                       for s in self.stages)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def take_rows(self, start: int, stop: int) -> VQWeights:
        """Rows [start, stop) as their own weights (each with a copy of the codebooks, counted in its nbytes)."""
        rows = slice(start, stop)
        return VQWeights(self.row_scale[rows], tuple(VQStage(s.codebook, s.scale, s.indices[rows])
                                                     for s in self.stages), self.in_features)

    def to_tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays to write into a safetensors file (module docstring), named `prefix + name`."""
        out, k = self.shape
        layout = [out, k, len(self.stages)] + [n for s in self.stages for n in (s.vector, s.bits)]
        tensors = {f"{prefix}layout": np.array(layout, np.int64),
                   f"{prefix}row_scales": np.ascontiguousarray(self.row_scale)}
        for i, s in enumerate(self.stages):
            tensors[f"{prefix}codebook{i}"] = np.ascontiguousarray(s.codebook)
            tensors[f"{prefix}codebook_scale{i}"] = np.array([s.scale], np.float32)
            tensors[f"{prefix}indices{i}"] = pack_indices(s.indices, s.bits)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str = "", where: str = "") -> VQWeights:
        """Inverse of `to_tensors`; a LowbitError names the missing or malformed tensor (`where`: the file)."""
        at = f"{where}: " if where else ""

        def get(key: str, dtype: type, shape: list[int]) -> np.ndarray:
            name = prefix + key
            if name not in tensors:
                raise LowbitError(f"{at}vector-quantized weights lack the tensor {name!r}; the file is incomplete "
                                  "(write it with VQWeights.to_tensors)")
            array = tensors[name]
            if array.dtype != dtype or list(array.shape) != shape:
                raise LowbitError(f"{at}tensor {name!r} is {array.dtype} {list(array.shape)}, expected "
                                  f"{np.dtype(dtype)} {shape}; the file is corrupt or from another format")
            return array

        name = f"{prefix}layout"
        layout = tensors.get(name)
        if layout is None or layout.dtype != np.int64 or layout.ndim != 1 or len(layout) < 5:
            raise LowbitError(f"{at}tensor {name!r} must be int64 (out, in, stages, v_0, bits_0, ...)")
        out, k, n_stages = (int(v) for v in layout[:3])
        if out < 1 or k < 1 or not 1 <= n_stages <= cls.MAX_STAGES or len(layout) != 3 + 2 * n_stages:
            raise LowbitError(f"{at}tensor {name!r} = {layout.tolist()} is not (out, in, stages, v_0, bits_0, ...) "
                              f"with positive sizes and 1 to {cls.MAX_STAGES} stages")
        stages = []
        for s in range(n_stages):
            v, bits = int(layout[3 + 2 * s]), int(layout[4 + 2 * s])
            if v < 1 or k % v or not 1 <= bits <= MAX_INDEX_BITS:
                raise LowbitError(f"{at}tensor {name!r}: stage {s} has vectors of {v} and {bits}-bit indices; "
                                  f"expected v dividing {k} and 1 to {MAX_INDEX_BITS} bits")
            codebook = get(f"codebook{s}", np.int8, [1 << bits, v])
            scale = get(f"codebook_scale{s}", np.float32, [1])[0]
            packed = get(f"indices{s}", np.uint8, [out, index_bytes(k // v, bits)])
            stages.append(VQStage(codebook, np.float32(scale), unpack_indices(packed, k // v, bits)))
        row_scale = get("row_scales", np.float32, [out])
        try:
            return cls(row_scale, tuple(stages), k)
        except ValueError as e:
            raise LowbitError(f"{at}vector-quantized weights {prefix!r}: {e}") from e
