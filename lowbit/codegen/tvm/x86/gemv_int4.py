"""Float-activation GEMV/GEMM with group-wise INT4 weights (decode and prefill linears of a decoder): AVX2 + FMA.

y[m, o] = sum_i x[m, i] * (q[o, i] - z[o, g(i)]) * s[o, g(i)], x and y float32, weights packed by
`int4_groups.pack_int4_gemv`. Per group the kernel accumulates sum_i q * x in float32 lanes (8 output
channels per vector), the nibbles unpacked in registers (shift, mask, int -> float), then folds the group into
the output with two FMAs: + s * dot and + (-z * s) * sum_i x. The per-group sums of x are computed once per call,
before the parallel loop.

Batch-1 decode reads every weight once per token, so the weights are streamed once in tiles of NV vectors of
output channels (parallel over tiles, chunked per thread); for M > 1 a register tile of MR rows reuses each
unpacked weight vector MR times.

Measured (benchmarks/bench_gemv_int4.py, 2 threads, AVX2 znver1, one core shared with other work): 3-8x faster
than ORT MatMulNBits with float32 activations (accuracy_level 0) on every SmolLM2-135M shape and group, and
1.2-2.7x faster (medians) than its int8-activation path (accuracy_level 4). It is compute-bound, not
memory-bound: about 3 GB/s of INT4 weights per core against an 11.6 GB/s single-thread read bound, at 3 vector
instructions (mask, int -> float, FMA) per 8 multiply-adds. The unpack variants ("shift": shift + mask; "mask":
mask only, x prescaled) and tiles NV 2/4/8, KS 1/2 all ran within noise of each other at M = 1.

With `out_width`, Y is [M, out_width] and the function takes a last int32 argument `col`: it writes (or adds
into) columns col .. col + N - 1 only, so linears fused at run time (q|k|v, gate|up) can be computed by separate
calls of different formats into one buffer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from .group_tiles import group_tile
from .int4_groups import LANES, NIBBLES, cdiv, check_int4_shape

REGISTERS = 16  # ymm registers on AVX2


@dataclass(frozen=True)
class Int4GemvPlan:
    """Shapes and tiles of one kernel: x [M, K], weight [N, K] in groups of `group`, NV output vectors and MR
    rows per register tile, parallel over `num_threads` tasks."""

    M: int
    K: int
    N: int
    group: int
    NV: int
    MR: int
    num_threads: int
    unpack: str = "mask"
    KS: int = 2
    accumulate: bool = False  # Y += x W^T (a residual add fused into the store) instead of Y = x W^T
    out_width: int | None = None  # Y's row length when the call writes a slice of it (module docstring)

    @classmethod
    def of(cls, M: int, K: int, N: int, group: int, num_threads: int, nv: int | None = None,
           mr: int | None = None, accumulate: bool = False, out_width: int | None = None) -> Int4GemvPlan:
        """The default tiles: MR = min(M, 4) rows; NV the largest of 4, 2, 1 that divides the output vectors with
        MR * NV <= 8 accumulators; KS = 2 partial sums per accumulator where they fit in 8 registers (the chain of
        dependent FMAs per accumulator is what limits one row; for 4 rows, 16 accumulators spill: KS = 1)."""
        check_int4_shape(N, K, group)
        if M <= 0:
            raise ValueError(f"int4 GEMV: M = {M} rows")
        if num_threads <= 0:
            raise ValueError(f"int4 GEMV: num_threads = {num_threads}")
        mr = mr or min(M, 4)
        if nv is None:
            nv = next(v for v in (4, 2, 1) if (N // LANES) % v == 0 and mr * v <= REGISTERS // 2 or v == 1)
        if (N // LANES) % nv:
            raise ValueError(f"int4 GEMV: NV = {nv} does not divide {N // LANES} output vectors")
        if out_width is not None and out_width < N:
            raise ValueError(f"int4 GEMV: output rows of {out_width} cannot hold a slice of {N} columns")
        return cls(M, K, N, group, nv, mr, num_threads, KS=2 if mr * nv * 2 <= REGISTERS // 2 else 1,
                   accumulate=accumulate, out_width=out_width)

    @property
    def YW(self) -> int:
        """Y's row length."""
        return self.N if self.out_width is None else self.out_width

    @property
    def OB(self) -> int:
        return self.N // LANES

    @property
    def NG(self) -> int:
        return cdiv(self.K, self.group)

    @property
    def GW(self) -> int:
        """Words (of 8 input columns) per full group."""
        return self.group // NIBBLES

    @property
    def LW(self) -> int:
        """Words in the last group (short where group does not divide K)."""
        return (self.K - (self.NG - 1) * self.group) // NIBBLES

    @property
    def tiles(self) -> int:
        return self.OB // self.NV

    @property
    def CH(self) -> int:
        """Tiles per task."""
        return cdiv(self.tiles, self.num_threads)


def _nibbles(word: tirx.PrimExpr, j: tirx.PrimExpr, unpack: str) -> tirx.PrimExpr:
    """Nibble j of every lane of the int32x8 `word` as float32x8: "shift": q; "mask": q * 16^j for j < 7 (x is
    prescaled by 16^-j), q for j = 7 (a logical shift; masking would make it negative)."""
    if unpack == "shift":
        v = T.shift_right(word, T.broadcast(T.Cast("int32", 4 * j), LANES))
        return T.Cast("float32x8", T.bitwise_and(v, T.broadcast(T.int32(15), LANES)))
    mask = T.int32(15)
    for i in range(1, NIBBLES - 1):  # literal masks: 15 << 4j as an expression of j overflows int32 at j = 7
        mask = T.Select(j == i, T.int32(15 << 4 * i), mask)
    masked = T.bitwise_and(word, T.broadcast(mask, LANES))
    top = T.reinterpret("int32x8", T.shift_right(T.reinterpret("uint32x8", word), T.broadcast(T.uint32(28), LANES)))
    return T.Cast("float32x8", T.Select(j == NIBBLES - 1, top, masked))


def _prescale() -> tirx.PrimExpr:
    """float32x8 [16^0, 16^-1, ..., 16^-6, 1] from its exponent bits (a constant LLVM folds)."""
    one = 127 << 23
    lane = T.ramp(0, 1, LANES)
    bits = T.Select(lane == T.broadcast(NIBBLES - 1, LANES), T.broadcast(T.int32(one), LANES),
                    T.ramp(T.int32(one), T.int32(-(4 << 23)), LANES))
    return T.reinterpret("float32x8", bits)


@functools.cache  # one parse per distinct plan
def gemv_int4_func(p: Int4GemvPlan) -> tirx.PrimFunc:
    """The PrimFunc (X [M, K], W, SCALE, NEG_ZS, Y [M, N]) of plan `p` (all float32 but W, int32); with
    `p.out_width`, (X, W, SCALE, NEG_ZS, Y [M, out_width], col)."""
    NV, MR, GW, KS = p.NV, p.MR, p.GW, p.KS
    rb, mt = p.M // MR, p.M % MR

    tile = group_tile(p, NIBBLES, lambda word, j: _nibbles(word, j, p.unpack))

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((p.M, p.K), "float32"),
        W: T.Buffer((p.OB, p.K // NIBBLES, LANES), "int32"),
        SCALE: T.Buffer((p.OB, p.NG, LANES), "float32"),
        NEG_ZS: T.Buffer((p.OB, p.NG, LANES), "float32"),
        Y: T.Buffer((p.M, p.YW), "float32"),
        col: T.int32,
    ):
        T.func_attr({"tirx.noalias": True})
        # per-(row, group) sums of x: 8 lanes of partial sums, then the lanes added
        SX = T.alloc_buffer((p.M, p.NG), "float32")
        XSA = T.alloc_buffer((p.M, p.K), "float32")
        XS = T.meta_var(XSA if p.unpack == "mask" else X)
        if p.unpack == "mask":  # x[k] * 16^-(k % 8) (exact: a power of two), but k % 8 = 7 as is
            for m in T.serial(p.M):
                for kq in T.serial(p.K // NIBBLES):
                    XSA[m, T.ramp(kq * NIBBLES, 1, LANES)] = X[m, T.ramp(kq * NIBBLES, 1, LANES)] * _prescale()
        SV = T.alloc_buffer((LANES,), "float32", scope="local")
        for m in T.serial(p.M):
            for g in T.serial(p.NG):
                SV[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                for kq in T.serial(T.min(GW, p.K // NIBBLES - g * GW)):
                    SV[T.ramp(0, 1, LANES)] = SV[T.ramp(0, 1, LANES)] + X[m, T.ramp(g * p.group + kq * NIBBLES, 1,
                                                                                      LANES)]
                SX[m, g] = ((SV[0] + SV[4]) + (SV[1] + SV[5])) + ((SV[2] + SV[6]) + (SV[3] + SV[7]))
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
