"""Weight formats: how a layer's weights are stored, dequantized and counted.

A format is a value that owns three things every other stage used to assume:
its dequantization (the float weights the integer op really computes with), its
size in bytes, and its serialization into the IR's tensors. Sizes, costs and the
fake-quant simulation ask the format; a new format (group-wise scales, codebooks
for vector quantization) is a new class here plus the backends' kernels for it.

This file's format is dense, per output channel and symmetric: int8 values, or int4
values stored two per byte (`pack_int4`). Each further format has its own file with
the same methods where they mean the same (`name`, `dequantize`, `nbytes`,
`bytes_for`): `groupwise_weights.GroupWiseWeights` (2/3/4/8-bit weights with a scale
and zero point per group of input columns, for weight-only decoder quantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

BIAS_BYTES = 4  # int32 per output channel


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric (narrow) integer range of a `bits`-bit weight, e.g. [-127, 127] or [-7, 7]."""
    q = 2 ** (bits - 1) - 1
    return -q, q


# x86 without VNNI sums u8 x s8 products in pairs with vpmaddubsw, which saturates at int16. For uint8 x (int8
# activations + 128 included) and |w| <= 64 a pair sum is at most 2 * 255 * 64 = 32640 <= 32767: exact. 7-bit
# weights ([-63, 63]) always meet it; int8 ones reach 127. ORT's kernels (model.onnx) and lowbit's AVX2 GEMMs
# both use it to pick the fast instruction only where it is exact.
U8S8_EXACT_WEIGHT_MAX = 64
assert 2 * 255 * U8S8_EXACT_WEIGHT_MAX < 2 ** 15


def u8s8_pairs_exact(weight: np.ndarray) -> bool:
    """Whether every u8 x s8 pair sum with these integer weights fits int16 (`U8S8_EXACT_WEIGHT_MAX`)."""
    return int(np.abs(np.asarray(weight).astype(np.int64)).max(initial=0)) <= U8S8_EXACT_WEIGHT_MAX


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (in [-8, 7]) -> bytes, two per byte, the first in the low nibble; odd sizes pad a 0."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_int4`: int8 values of `shape`."""
    n = int(np.prod(shape))
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:n].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


@dataclass(frozen=True)
class PerChannelWeights:
    """Dense integer weights [out, ...] with one float32 scale per output channel (axis 0), zero point 0.

    `values` are int8 arrays holding `bits`-bit integers; 4-bit ones are stored packed.
    """

    values: np.ndarray
    scale: np.ndarray  # float32 [out]
    bits: int

    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (4, 7, 8)  # 7: int8 storage, values in [-63, 63]

    def __post_init__(self) -> None:
        if self.bits not in self.SUPPORTED_BITS:
            raise ValueError(f"per-channel weights of {self.bits} bits; supported: {self.SUPPORTED_BITS}")

    @property
    def name(self) -> str:
        return f"int{self.bits} per channel"

    def dequantize(self) -> np.ndarray:
        """The float32 weights the integer op computes with: values * scale, per output channel."""
        shape = (-1, *[1] * (self.values.ndim - 1))
        return self.values.astype(np.float32) * self.scale.astype(np.float32).reshape(shape)

    @property
    def nbytes(self) -> float:
        """Bytes of the weights and their int32 bias (scales are metadata, as in every format here)."""
        return self.bytes_for(self.values.shape, self.bits)

    @staticmethod
    def bytes_for(shape: tuple[int, ...], bits: int) -> float:
        """Size of a layer with weights of `shape` at `bits` bits as stored: half a byte per int4 weight, one per
        int7/int8 weight, plus its int32 bias. Fractional for odd int4 counts; totals over a model are rounded once."""
        return float(np.prod(shape)) * (0.5 if bits == 4 else 1.0) + BIAS_BYTES * shape[0]

    def stored(self) -> np.ndarray:
        """The array written to the IR's tensors (int4 packed two per byte)."""
        return pack_int4(self.values) if self.bits == 4 else np.ascontiguousarray(self.values)

    @staticmethod
    def unstored(array: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
        """Inverse of `stored`: the int8 values."""
        return unpack_int4(array, shape) if bits == 4 else array
