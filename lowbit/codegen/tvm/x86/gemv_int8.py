"""Float-activation GEMV with group-wise asymmetric INT8 weights (a decoder's LM head and int8 linears): AVX2 + FMA.

The sibling of `gemv_int4` for 8-bit values: y[m, o] = sum_i x[m, i] * (q[o, i] - z[o, g(i)]) * s[o, g(i)],
x and y float32, q and z in [0, 255]. Per group the kernel accumulates sum_i q * x in float32 lanes (8 output
channels per vector), the bytes unpacked in registers (one mask or shift, int -> float: byte j is read in place
as q * 256^j against x prescaled by 256^-j, as `gemv_int4` does with nibbles), and folds the group into the
output with two FMAs: + s * dot and + (-z * s) * sum_i x. As in `gemv_int4`: register tiles of up to 4 rows
reuse each unpacked weight vector (prefill chunks), `accumulate` adds into Y (a residual), and with `out_width`
Y is [M, out_width] and a last int32 argument `col` places the N columns written.

Layout (`pack_int8_gemv`, numpy only): `w` int32 [N / 8, K / 4, 8], the word for step k4 and lane c holds
q[8 * ob + c, 4 * k4 + j] in bits 8j..8j+7 (so a lane's words, read as little-endian bytes, are its row of q);
`scale` and `neg_zs` float32 [N / 8, groups, 8] as in `int4_groups` (`neg_zs` is a float minimum's offset for a
grid with float minimums).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ....errors import LowbitError
from .group_tiles import group_tile
from .int4_groups import LANES, cdiv

BYTES = 4  # 8-bit values per int32 word: input columns per step
REGISTERS = 16  # ymm registers on AVX2


@dataclass(frozen=True)
class Int8Packed:
    """`pack_int8_gemv`'s result: the kernel's constant operands, in the order it takes them."""

    w: np.ndarray
    scale: np.ndarray
    neg_zs: np.ndarray

    def arrays(self) -> list[np.ndarray]:
        return [self.w, self.scale, self.neg_zs]


def pack_int8_gemv(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, group: int,
                   offset: np.ndarray | None = None) -> Int8Packed:
    """Pack q (uint8 [out, in]), scale (float32 [out, ceil(in / group)]) and zero (uint8, same shape) into the
    kernel's layout (module docstring); a grid with float minimums gives `offset` (w = q * s + offset) instead."""
    q = np.asarray(q, np.uint8)
    out_f, in_f = q.shape
    if group <= 0 or group % BYTES or out_f % LANES or in_f % BYTES:
        raise LowbitError(f"int8 GEMV: weight [{out_f}, {in_f}] in groups of {group}: the kernel needs out a "
                          f"multiple of {LANES}, in and group multiples of {BYTES}")
    groups = cdiv(in_f, group)
    if (zero is None) == (offset is None):
        raise LowbitError("int8 GEMV: give either integer zero points or float offsets")
    per_group = zero if offset is None else offset
    if scale.shape != (out_f, groups) or per_group.shape != (out_f, groups):
        raise LowbitError(f"int8 GEMV: scale {scale.shape} / zero or offset {per_group.shape}, expected "
                          f"{(out_f, groups)}")
    ob = out_f // LANES
    rows = np.ascontiguousarray(q.reshape(ob, LANES, in_f)).view(np.int32)  # [ob, lane, k4]: 4 bytes per word

    def tiled(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.astype(np.float32).reshape(ob, LANES, groups).transpose(0, 2, 1))

    neg_zs = -(zero.astype(np.float32) * scale.astype(np.float32)) if offset is None else offset
    return Int8Packed(np.ascontiguousarray(rows.transpose(0, 2, 1)), tiled(scale), tiled(neg_zs))


def unpack_int8_rows(packed: Int8Packed, rows: np.ndarray, group: int) -> np.ndarray:
    """Rows of the dequantized weight, float32 [len(rows), in] (q * s + (-z * s)): the embedding lookup of a tied
    LM head, read from the kernel's layout."""
    rows = np.asarray(rows, np.int64)
    words = packed.w[rows // LANES, :, rows % LANES]  # [r, k4]
    q = np.ascontiguousarray(words).view(np.uint8).astype(np.float32)  # little-endian: the row's bytes in order
    cols = np.arange(q.shape[1]) // group
    return q * packed.scale[rows // LANES, :, rows % LANES][:, cols] + packed.neg_zs[rows // LANES, :,
                                                                                      rows % LANES][:, cols]


@dataclass(frozen=True)
class Int8GemvPlan:
    """x [M, K], weight [N, K] in groups of `group`; register tiles of MR rows x NV output vectors with KS partial
    sums per accumulator (as `gemv_int4`), parallel over `num_threads` tasks."""

    M: int
    K: int
    N: int
    group: int
    NV: int
    num_threads: int
    accumulate: bool = False  # Y += x W^T instead of Y = x W^T
    out_width: int | None = None  # Y's row length when the call writes a slice of it (module docstring)
    MR: int = 1
    KS: int = 2

    @classmethod
    def of(cls, M: int, K: int, N: int, group: int, num_threads: int, accumulate: bool = False,
           out_width: int | None = None) -> Int8GemvPlan:
        """`gemv_int4`'s default tiles: MR = min(M, 4) rows (each unpacked weight vector serves MR rows), NV the
        largest of 4, 2, 1 dividing the output vectors with MR * NV <= 8 accumulators, KS = 2 where they fit."""
        if N % LANES or K % BYTES or group % BYTES or M <= 0 or num_threads <= 0 or (out_width or N) < N:
            raise LowbitError(f"int8 GEMV: M {M}, K {K}, N {N}, group {group}, {num_threads} threads, output rows "
                              f"of {out_width or N}")
        mr = min(M, 4)
        nv = next(v for v in (4, 2, 1) if (N // LANES) % v == 0 and mr * v <= REGISTERS // 2 or v == 1)
        return cls(M, K, N, group, nv, num_threads, accumulate, out_width, mr,
                   2 if mr * nv * 2 <= REGISTERS // 2 else 1)

    @property
    def YW(self) -> int:
        """Y's row length."""
        return self.N if self.out_width is None else self.out_width

    @property
    def NG(self) -> int:
        return cdiv(self.K, self.group)

    @property
    def GW(self) -> int:
        """Words (of 4 input columns) per full group."""
        return self.group // BYTES

    @property
    def LW(self) -> int:
        """Words in the last group (short where group does not divide K)."""
        return (self.K - (self.NG - 1) * self.group) // BYTES

    @property
    def tiles(self) -> int:
        return self.N // LANES // self.NV

    @property
    def CH(self) -> int:
        return cdiv(self.tiles, self.num_threads)


def _bytes(word: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Byte j of every lane of the int32x8 `word` as float32x8, times 256^j for j < 3 (one mask; x is prescaled
    by 256^-j), the top byte by a logical shift (masking would make it negative)."""
    mask = T.Select(j == 1, T.int32(255 << 8), T.Select(j == 2, T.int32(255 << 16), T.int32(255)))
    masked = T.bitwise_and(word, T.broadcast(mask, LANES))
    top = T.reinterpret("int32x8", T.shift_right(T.reinterpret("uint32x8", word), T.broadcast(T.uint32(24), LANES)))
    return T.Cast("float32x8", T.Select(j == BYTES - 1, top, masked))


@functools.cache
def gemv_int8_func(p: Int8GemvPlan) -> tirx.PrimFunc:
    """The PrimFunc (X [M, K], W, SCALE, NEG_ZS, Y [M, N]) of plan `p` (with `p.out_width`: Y [M, out_width],
    then col)."""
    NV, MR, KS = p.NV, p.MR, p.KS
    rb, mt = p.M // MR, p.M % MR

    tile = group_tile(p, BYTES, _bytes)

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((p.M, p.K), "float32"),
        W: T.Buffer((p.N // LANES, p.K // BYTES, LANES), "int32"),
        SCALE: T.Buffer((p.N // LANES, p.NG, LANES), "float32"),
        NEG_ZS: T.Buffer((p.N // LANES, p.NG, LANES), "float32"),
        Y: T.Buffer((p.M, p.YW), "float32"),
        col: T.int32,
    ):
        T.func_attr({"tirx.noalias": True})
        SX = T.alloc_buffer((p.M, p.NG), "float32")
        XS = T.alloc_buffer((p.M, p.K), "float32")
        for m in T.serial(p.M):  # x[k] * 256^-(k % 4) (exact: a power of two), but k % 4 = 3 as is
            for k in T.serial(p.K):
                XS[m, k] = X[m, k] * T.Select(k % BYTES == 1, T.float32(2.0 ** -8), T.Select(
                    k % BYTES == 2, T.float32(2.0 ** -16), T.float32(1)))
        for m in T.serial(p.M):
            for g in T.serial(p.NG):
                SX[m, g] = T.float32(0)
                for k in T.serial(T.min(p.group, p.K - g * p.group)):
                    SX[m, g] = SX[m, g] + X[m, g * p.group + k]
        for tid in T.parallel(p.num_threads):
            gacc = T.alloc_buffer((MR * NV * KS * LANES,), "float32", scope="local")
            acc = T.alloc_buffer((MR * NV * LANES,), "float32", scope="local")
            for ti in T.serial(p.CH):
                if tid * p.CH + ti < p.tiles:
                    for b in T.serial(rb):
                        tile(XS, W, SCALE, NEG_ZS, SX, Y, gacc, acc, b * MR, MR, tid * p.CH + ti, col)
                    if mt > 0:
                        tile(XS, W, SCALE, NEG_ZS, SX, Y, gacc, acc, rb * MR, mt, tid * p.CH + ti, col)

    return func if p.out_width is not None else func.specialize({func.params[-1]: 0})
