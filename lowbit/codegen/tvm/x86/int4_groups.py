"""Group-wise asymmetric INT4 weights for the float-activation GEMV/GEMM (`gemv_int4`): the layout and its numpy
packer (no TVM here, so they test alone).

The weight W [out, in] is stored as integers q in [0, 15], with one float32 scale s and one integer zero point z
per (row, group of `group` consecutive input columns): W ~= (q - z) * s. The kernel computes, per group g,
y[m, o] += s[o, g] * sum_i q[o, i] * x[m, i] - z[o, g] * s[o, g] * sum_i x[m, i], so it multiplies the raw
nibbles and never subtracts z per weight. The last group may be short (in = 576 with group 128).

Packed arrays (OB = out / 8 output tiles of 8 channels, one channel per float32 lane of a ymm register):
- `w`: int32 [OB, in / 8, 8]: the word for step k8, lane c holds q[8 * ob + c, 8 * k8 + j] in bits 4j..4j+3,
  so nibble j of 8 channels is one shift and one mask over a vector;
- `scale`: float32 [OB, groups, 8], s of channel 8 * ob + lane;
- `neg_zs`: float32 [OB, groups, 8], -z * s (the zero point's term, added with one FMA per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ....errors import LowbitError

LANES = 8  # float32 lanes in a ymm register: output channels per tile
NIBBLES = 8  # 4-bit values per int32 word: input columns per step


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


@dataclass(frozen=True)
class Int4Packed:
    """`pack_int4_gemv`'s result: the kernel's constant operands, in the order it takes them."""

    w: np.ndarray
    scale: np.ndarray
    neg_zs: np.ndarray
    out_features: int
    in_features: int
    group: int

    def arrays(self) -> list[np.ndarray]:
        """The operands after x, in the kernel's parameter order."""
        return [self.w, self.scale, self.neg_zs]

    @property
    def nbytes(self) -> int:
        """Bytes a call reads from these weights (nibbles, scales and zero-point terms)."""
        return sum(a.nbytes for a in self.arrays())


def check_int4_shape(out_features: int, in_features: int, group: int, where: str = "int4 GEMV") -> None:
    """Raise LowbitError unless the kernel's layout covers a [out_features, in_features] weight."""
    if group <= 0 or group % NIBBLES:
        raise LowbitError(f"{where}: group {group} must be a positive multiple of {NIBBLES} (e.g. 32, 64, 128)")
    if out_features <= 0 or out_features % LANES:
        raise LowbitError(f"{where}: {out_features} output features; the kernel tiles outputs in vectors of {LANES},"
                          f" so pad the weight's rows to a multiple of {LANES}")
    if in_features <= 0 or in_features % NIBBLES:
        raise LowbitError(f"{where}: {in_features} input features; a packed word holds {NIBBLES} input columns, "
                          f"so pad the weight's columns (and x) with zeros to a multiple of {NIBBLES}")


def pack_int4_gemv(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, group: int,
                   offset: np.ndarray | None = None) -> Int4Packed:
    """Pack q (uint8 [out, in], values 0..15), scale (float32 [out, ceil(in / group)]) and zero (uint8, same
    shape as scale, values 0..15) into the `gemv_int4` kernel's layout (module docstring). A grid with a float
    minimum per group gives `offset` (the minimum, w = q * s + offset) instead of `zero`."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise LowbitError(f"pack_int4_gemv: q must be 2-D [out, in], got shape {q.shape}")
    out_f, in_f = (int(d) for d in q.shape)
    check_int4_shape(out_f, in_f, group, "pack_int4_gemv")
    groups = cdiv(in_f, group)
    scale = np.asarray(scale, np.float32)
    if (zero is None) == (offset is None):
        raise LowbitError("pack_int4_gemv: give either integer zero points or float offsets")
    zero = np.zeros(scale.shape, np.uint8) if zero is None else np.asarray(zero)
    for name, a in (("scale", scale), ("zero", zero)):
        if a.shape != (out_f, groups):
            raise LowbitError(f"pack_int4_gemv: {name} has shape {a.shape}, expected {(out_f, groups)} "
                              f"(one per row and group of {group} input columns)")
    for name, a in (("q", q), ("zero", zero)):
        if a.size and (a.min() < 0 or a.max() > 15):
            raise LowbitError(f"pack_int4_gemv: {name} holds values outside [0, 15] (min {a.min()}, max {a.max()})")
    if not np.isfinite(scale).all():
        raise LowbitError("pack_int4_gemv: scale holds non-finite values")
    ob = out_f // LANES
    nib = q.astype(np.uint32).reshape(ob, LANES, in_f // NIBBLES, NIBBLES)  # [ob, lane, k8, j]
    words = (nib << (4 * np.arange(NIBBLES, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    w = np.ascontiguousarray(words.transpose(0, 2, 1)).view(np.int32)  # [ob, k8, lane]

    def tiled(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.astype(np.float32).reshape(ob, LANES, groups).transpose(0, 2, 1))

    # -z * s rounded once to float32, as the kernel's FMA operand (or the float minimum itself)
    neg_zs = -(zero.astype(np.float32) * scale) if offset is None else np.asarray(offset, np.float32)
    return Int4Packed(w, tiled(scale), tiled(neg_zs), out_f, in_f, group)


def dequantize_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """W = (q - z) * s in float64, [out, in] (the reference the kernel is tested against)."""
    cols = np.arange(q.shape[1]) // group
    return (q.astype(np.float64) - zero.astype(np.float64)[:, cols]) * scale.astype(np.float64)[:, cols]
