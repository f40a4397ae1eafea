"""Group-wise weights: a linear's weight [out, in] with a scale and a zero point per (row, group of columns).

The format of weight-only decoder quantization (GPTQ, ORT's `MatMulNBits`, GGUF's Q4_1-style blocks): each output
row is cut into groups of `group` consecutive input columns, and every (row, group) has its own float32 scale `s`
and unsigned integer zero point `z`, so a weight is w = (q - z) * s with q, z in [0, 2^bits - 1].
`group == in_features` is per output channel.

When `in_features % group != 0` the last group of each row is a shorter tail group holding the remaining
columns (SmolLM2's hidden size 576 is 4.5 groups of 128); there are ceil(in / group) groups per row.

Two kinds of grid:
- integer zero point (uint8 `zero`, stored packed at `bits` like the values) and float32 scale: w = (q - z) * s,
  so 0 is exactly on the grid;
- float minimum (`minimum`, as GGUF's Q4_1 blocks): w = q * s + m, each group's grid spanning its own [min, max],
  `scale` and `minimum` in float16 where that holds every group's values as normal float16 numbers, else float32.
  An integer zero point cannot follow a grid whose minimum is not a multiple of its step: SmolLM2's released
  weights sit exactly on Q4_1's g32 grid, which float minimums reproduce and integer zero points do not.
`offset` gives both as w = q * s + offset per group, the form the kernels compute.

Storage (`to_tensors`), per row, each row starting on a byte boundary:
- `qweight`: uint8 [out, ceil(in * bits / 8)]. The row's values form one little-endian bit stream: value j
  occupies stream bits [j * bits, (j + 1) * bits), its lowest bit first, and stream bit k is bit k % 8 of byte
  k // 8. So 4-bit values go two per byte, the first in the low nibble (as `pack_int4` and MatMulNBits do),
  3-bit ones eight per three bytes, 2-bit ones four per byte; the unused high bits of a row's last byte are 0.
- `qzeros`: uint8 [out, ceil(groups * bits / 8)], integer zero points packed the same way; or
- `mins`: float16 or float32 [out, groups], float minimums;
- `scales`: float32 [out, groups] (float16 or float32 with `mins`).
- `layout`: int64 [4] = (out, in, bits, group), so the tensors describe themselves.

`nbytes` counts exactly those stored bytes: packed values, zero points or minimums, and scales; the `layout`
header and a float bias, which stays with the layer, are not weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import LowbitError

SCALE_BYTES = 4  # integer zero points come with float32 scales
FLOAT_TYPES = (np.float16, np.float32)  # of a float-minimum grid's scales and minimums


def n_groups(in_features: int, group: int) -> int:
    """Groups per row: ceil(in / group), the last one a shorter tail when `group` does not divide `in`."""
    return -(-in_features // group)


def expand_groups(per_group: np.ndarray, in_features: int, group: int) -> np.ndarray:
    """[out, groups] -> [out, in]: each group's entry repeated over its columns (the tail group's fewer)."""
    return np.repeat(per_group, group, axis=1)[:, :in_features]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of `n` values of `bits` bits packed as one bit stream."""
    return -(-n * bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values [rows, n] -> uint8 [rows, ceil(n * bits / 8)], each row one little-endian
    bit stream (module docstring). Eight values make exactly `bits` bytes, so the work goes eight at a time."""
    rows, n = values.shape
    if values.size and int(values.max()) >= 1 << bits:
        raise ValueError(f"{bits}-bit values must lie in [0, {(1 << bits) - 1}]")
    padded = np.zeros((rows, -(-n // 8) * 8), np.uint64)
    padded[:, :n] = values
    octets = padded.reshape(rows, -1, 8)
    word = np.zeros(octets.shape[:2], np.uint64)  # 8 values of up to 8 bits: at most 64 bits
    for j in range(8):
        word |= octets[:, :, j] << np.uint64(j * bits)
    out = np.stack([(word >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(bits)], axis=-1)
    return out.reshape(rows, -1)[:, :packed_bytes(n, bits)].astype(np.uint8)


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [rows, n]."""
    rows = packed.shape[0]
    full = np.zeros((rows, -(-n // 8) * bits), np.uint64)
    full[:, :packed.shape[1]] = packed
    chunks = full.reshape(rows, -1, bits)
    word = np.zeros(chunks.shape[:2], np.uint64)
    for k in range(bits):
        word |= chunks[:, :, k] << np.uint64(8 * k)
    mask = np.uint64((1 << bits) - 1)
    values = np.stack([(word >> np.uint64(j * bits)) & mask for j in range(8)], axis=-1)
    return values.reshape(rows, -1)[:, :n].astype(np.uint8)


@dataclass(frozen=True)
class GroupWiseWeights:
    """Asymmetric unsigned weights [out, in], one scale and one zero point or float minimum per (row, group).

    `values` (uint8 [out, in], one value per byte in memory; packed only in `to_tensors`), `scale` [out, groups],
    and either `zero` (uint8 [out, groups]) or `minimum` (float [out, groups]), as the module docstring says.
    """

    values: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    group: int
    minimum: np.ndarray | None = None

    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "mins", "scales", "layout")  # qzeros or mins

    def __post_init__(self) -> None:
        if self.bits not in self.SUPPORTED_BITS:
            raise ValueError(f"group-wise weights of {self.bits} bits; supported: {self.SUPPORTED_BITS}")
        if self.group < 1:
            raise ValueError(f"group size {self.group}: expected a positive number of input columns")
        if self.values.ndim != 2 or self.values.dtype != np.uint8:
            raise ValueError(f"values must be uint8 [out, in], not {self.values.dtype} {list(self.values.shape)}")
        out, k = self.values.shape
        per_group = [out, n_groups(k, self.group)]
        if (self.zero is None) == (self.minimum is None):
            raise ValueError("give either integer zero points or float minimums")
        if self.zero is not None:
            per_group_arrays = (("scale", self.scale, (np.float32,)), ("zero", self.zero, (np.uint8,)))
        else:
            per_group_arrays = (("scale", self.scale, FLOAT_TYPES), ("minimum", self.minimum, FLOAT_TYPES))
        for name, array, dtypes in per_group_arrays:
            if array.dtype not in dtypes or list(array.shape) != per_group:
                raise ValueError(f"{name} must be {' or '.join(str(np.dtype(d)) for d in dtypes)} {per_group} "
                                 f"(rows, groups of {self.group} of {k} columns), not {array.dtype} "
                                 f"{list(array.shape)}")
        qmax = (1 << self.bits) - 1
        for name, array in (("values", self.values), ("zero", self.zero)):
            if array is not None and array.size and int(array.max()) > qmax:
                raise ValueError(f"{name} exceed {qmax}, the largest {self.bits}-bit value")
        if self.minimum is not None and not np.all(np.isfinite(self.minimum)):
            raise ValueError("minimums must be finite")
        if not np.all(np.isfinite(self.scale)) or not np.all(self.scale > 0):
            raise ValueError("scales must be finite and positive")

    @property
    def float_minimum(self) -> bool:
        return self.minimum is not None

    @property
    def name(self) -> str:
        return f"int{self.bits} g{self.group}" + (" float min" if self.float_minimum else "")

    @property
    def offset(self) -> np.ndarray:
        """float32 [out, groups]: w = q * scale + offset per group (-zero * scale, or the minimum)."""
        if self.minimum is not None:
            return self.minimum.astype(np.float32)
        return -self.zero.astype(np.float32) * self.scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """The float32 weights [out, in] the layer computes with: (values - zero) * scale, per group."""
        k = self.values.shape[1]
        scale = expand_groups(self.scale, k, self.group).astype(np.float32)
        if self.minimum is not None:
            return self.values.astype(np.float32) * scale + expand_groups(self.minimum, k, self.group).astype(
                np.float32)
        return (self.values.astype(np.float32) - expand_groups(self.zero, k, self.group).astype(np.float32)) * scale

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed values, zero points or minimums, and scales (not a bias: it stays float)."""
        out, k = self.shape
        groups = n_groups(k, self.group)
        if self.minimum is not None:
            return out * (packed_bytes(k, self.bits) + groups * (self.scale.itemsize + self.minimum.itemsize))
        return self.bytes_for(self.shape, self.bits, self.group)

    @staticmethod
    def bytes_for(shape: tuple[int, int], bits: int, group: int, float_minimum: bool = False) -> int:
        """Size of a [out, in] weight at `bits` bits in groups of `group` columns, as `to_tensors` stores it
        (float minimums counted with float16 scales and minimums)."""
        out, k = shape
        groups = n_groups(k, group)
        if float_minimum:
            return out * (packed_bytes(k, bits) + groups * 2 * np.dtype(np.float16).itemsize)
        return out * (packed_bytes(k, bits) + packed_bytes(groups, bits) + SCALE_BYTES * groups)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and zero points included (int4 g128 on 576 columns: about 4.33)."""
        return 8 * self.nbytes / self.values.size

    def take_rows(self, start: int, stop: int) -> GroupWiseWeights:
        """Rows [start, stop) as their own weights (linears rounded as one stack of rows, split again)."""
        rows = slice(start, stop)
        return GroupWiseWeights(self.values[rows], self.scale[rows], None if self.zero is None else self.zero[rows],
                                self.bits, self.group, None if self.minimum is None else self.minimum[rows])

    def to_tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays to write into a safetensors file, named `prefix + qweight|qzeros|scales|layout`."""
        out, k = self.shape
        grid = ({f"{prefix}mins": np.ascontiguousarray(self.minimum)} if self.minimum is not None
                else {f"{prefix}qzeros": pack_bits(self.zero, self.bits)})
        return {
            f"{prefix}qweight": pack_bits(self.values, self.bits),
            **grid,
            f"{prefix}scales": np.ascontiguousarray(self.scale),
            f"{prefix}layout": np.array([out, k, self.bits, self.group], np.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str = "", where: str = "") -> GroupWiseWeights:
        """Inverse of `to_tensors`; a LowbitError names the missing or malformed tensor (`where`: the file)."""
        at = f"{where}: " if where else ""

        def get(key: str, dtypes: tuple[type, ...], shape: list[int]) -> np.ndarray:
            name = prefix + key
            if name not in tensors:
                raise LowbitError(f"{at}group-wise weights lack the tensor {name!r}; a file written by "
                                  f"GroupWiseWeights.to_tensors has {prefix}qweight, {prefix}qzeros (or {prefix}mins), "
                                  f"{prefix}scales and {prefix}layout")
            array = tensors[name]
            if array.dtype not in dtypes or list(array.shape) != shape:
                raise LowbitError(f"{at}tensor {name!r} is {array.dtype} {list(array.shape)}, expected "
                                  f"{' or '.join(str(np.dtype(d)) for d in dtypes)} {shape}; the file is corrupt or "
                                  "from another format")
            return array

        layout = get("layout", (np.int64,), [4])
        out, k, bits, group = (int(v) for v in layout)
        if bits not in cls.SUPPORTED_BITS or group < 1 or out < 1 or k < 1:
            raise LowbitError(f"{at}tensor {prefix}layout = {layout.tolist()} is not (out, in, bits, group) with "
                              f"bits in {cls.SUPPORTED_BITS} and positive sizes")
        groups = n_groups(k, group)
        values = unpack_bits(get("qweight", (np.uint8,), [out, packed_bytes(k, bits)]), k, bits)
        float_minimum = prefix + "mins" in tensors
        scales = get("scales", FLOAT_TYPES if float_minimum else (np.float32,), [out, groups])
        try:
            if float_minimum:
                return cls(values, scales, None, bits, group, minimum=get("mins", FLOAT_TYPES, [out, groups]))
            zero = unpack_bits(get("qzeros", (np.uint8,), [out, packed_bytes(groups, bits)]), groups, bits)
            return cls(values, scales, zero, bits, group)
        except ValueError as e:
            raise LowbitError(f"{at}tensors {prefix}qweight/qzeros/scales: {e}") from e
