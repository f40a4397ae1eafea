"""Float-activation GEMV/GEMM with vector-quantized weights (`VQWeights`: vq2, vq3): AVX2 + FMA.

y[m, o] = row_scale[o] * sum_j sum_t x[m, v*j + t] * C[o, j, t], with C[o, j] = sum over stages s of
codewords_s[idx_s[o, j]] (float32 codewords: the int8 codebook times its scale). x and y are float32; with
`accumulate` the kernel adds into y (a residual add fused into the store). Operands as `vq_layout` packs them.

Per output row the kernel gathers each vector's codeword (one v-wide load per stage, a vector add for vq3's
residual) and FMAs it against x's v columns into a v-lane accumulator per (row of x, output), summed across
lanes at the end and scaled once by the row scale. A tile of NR outputs shares each x load; MR rows of x share
each codeword (prefill); KS partial sums per output shorten the FMA chains.

Measured (benchmarks/bench_gemv_vq.py at commit 4408992, every schedule in one run; 1 thread, CPU time per call,
AVX2 znver1 shared with other jobs: load average 5 on 2 cores; medians of 5 rounds), SmolLM2-135M's shapes
[in -> out], us per call at M = 1:

| schedule | 576 -> 576 | 576 -> 192 | 576 -> 1536 | 1536 -> 576 |
|---|---|---|---|---|
| vq2, this kernel (NR 8) | 34.9 | 12.1 | 93.3 | 90.7 |
| vq3, this kernel (NR 4, KS 2) | 70.3 | 23.5 | 190 | 184 |
| vq3, NR 8, KS 1 | 87.1 | 29.0 | 227 | 230 |
| vq2, LUT (VPTQ / AQLM style, below) | 92.5 | 37.6 | 245 | 245 |
| vq3, LUT | 131 | 52.7 | 331 | 397 |
| INT4 g128 (`gemv_int4`), for reference | 55.9 | 19.2 | 148 | 149 |

- The LUT schedule built, per row of x, LUT[j, c] = x[v*j : v*j + v] . codeword c (K / v x 256 floats, 147 KB at
  K = 576) and then summed y[o] = sum_j LUT[j, idx[o, j]] with scalar loads and adds: 2-3x slower here. The
  table build (K * 256 multiply-adds, as many as 256 outputs of this kernel) and the L2-resident table cost more
  than the FMAs it saves, and both are bound by the same integer work per index. At M = 32 it rebuilds the table
  per row of x: 3-5x slower than this kernel.
- vq3 as one table of the 256 x 16 summed codewords (64 KB, built per call; one load per vector instead of two
  and an add): no faster (85 against 73 us on 576 -> 576; 205 against 183 on 576 -> 1536): the table misses L1.
- Both removed after measuring (commit 4408992 has them).
- What bounds this kernel: the instructions per (output, vector): a word of indices serves 4 vectors, and each
  index costs a copy, a shift and a mask (the codeword load folds into the FMA), about 3.75 instructions per 4
  multiply-adds. A rotate (BMI2 rorx, no copy) written as llvm.fshr is turned back into shift + mask by LLVM.
- At M = 32, MR 6 x NR 2 ran 682 us (vq2) and 792 us (vq3) on 576 -> 576 (MR 4 x NR 2: 776 / 894; MR 8 x NR 1:
  783 / 849; MR 4 x NR 3 or 4: 980-1250, spilling), INT4 g128 835 us.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate as running_sum

from tvm import tirx
from tvm.script import tirx as T

from ....errors import LowbitError
from .int4_groups import cdiv
from .vq_layout import WORD_BITS, VQPacked, check_vq_shape

REGISTERS = 16  # xmm/ymm registers on AVX2
MAX_KS = 8


@dataclass(frozen=True)
class VQGemvPlan:
    """x [M, K] times a VQ weight [N, K] (vectors of `v`, one index width per stage in `bits`, one codebook per
    segment of rows): NR outputs by MR rows of x per register tile with KS partial sums each, parallel over
    `num_threads` tasks."""

    M: int
    K: int
    N: int
    v: int
    bits: tuple[int, ...]
    num_threads: int
    NR: int
    MR: int
    KS: int
    segments: tuple[int, ...]  # rows per codebook, in order (q, k, v stacked: three); sums to N
    accumulate: bool = False  # Y += x W^T instead of Y = x W^T

    @classmethod
    def of(cls, M: int, K: int, N: int, stages: int, v: int, bits: int | Sequence[int], num_threads: int,
           accumulate: bool = False, nr: int | None = None, mr: int | None = None, ks: int | None = None,
           segments: Sequence[int] | None = None) -> VQGemvPlan:
        """Default tiles (measured, module docstring): at M = 1, NR = 8 outputs for one stage, NR = 4 with KS = 2
        partial sums for two (their index words and codeword sums need the registers); at M > 1, MR = 6 rows of x
        by NR = 2 outputs. NR falls to the largest power of two dividing every segment."""
        bits = (bits,) * stages if isinstance(bits, int) else tuple(int(b) for b in bits)
        if len(bits) != stages:
            raise LowbitError(f"VQ GEMV: {stages} stages but index bits {bits}")
        check_vq_shape(K, N, v, bits)
        segments = (N,) if segments is None else tuple(int(n) for n in segments)
        if sum(segments) != N or min(segments) <= 0:
            raise LowbitError(f"VQ GEMV: segments {segments} must be positive row counts summing to N = {N}")
        if M <= 0 or num_threads <= 0:
            raise LowbitError(f"VQ GEMV: M = {M} rows, num_threads = {num_threads}")
        mr = mr or (1 if M == 1 else min(M, 6))
        rows = math.gcd(*segments)
        if nr is None:
            nr = (8 if stages == 1 else 4) if mr == 1 else 2
            while rows % nr:
                nr //= 2
        if nr <= 0 or rows % nr:
            raise LowbitError(f"VQ GEMV: NR = {nr} does not divide the segments {segments} of {N} outputs")
        if ks is None:  # up to 8 accumulators in all
            ks = max(1, REGISTERS // 2 // (mr * nr))
        if not 1 <= ks <= MAX_KS:
            raise LowbitError(f"VQ GEMV: KS = {ks} partial sums; expected 1 to {MAX_KS}")
        return cls(M, K, N, v, bits, num_threads, nr, mr, ks, segments, bool(accumulate))

    @classmethod
    def for_packed(cls, packed: VQPacked, M: int, num_threads: int, accumulate: bool = False) -> VQGemvPlan:
        """The default plan for `pack_vq_gemv`'s operands (shapes, index widths and segments read from them)."""
        v = packed.codebooks[0].shape[2]
        bits = tuple(int(cb.shape[1]).bit_length() - 1 for cb in packed.codebooks)
        K = packed.indices[0].shape[1] * (WORD_BITS // bits[0]) * v
        return cls.of(M, K, len(packed.row_scale), len(bits), v, bits, num_threads, accumulate,
                      segments=packed.segments)

    @property
    def stages(self) -> int:
        return len(self.bits)

    @property
    def J(self) -> int:
        """Vectors per row."""
        return self.K // self.v

    @property
    def S(self) -> int:
        """Vectors per step: one word of the narrowest stage's indices."""
        return max(WORD_BITS // b for b in self.bits)

    def per(self, s: int) -> int:
        """Indices per word of stage s."""
        return WORD_BITS // self.bits[s]

    @property
    def tiles(self) -> int:
        return self.N // self.NR

    @property
    def CH(self) -> int:
        """Tiles per task."""
        return cdiv(self.tiles, self.num_threads)


def _index(p: VQGemvPlan, s: int, IDX: tirx.Buffer, o: tirx.PrimExpr, st: tirx.PrimExpr,
           b: tirx.PrimExpr) -> tirx.PrimExpr:
    """Stage s's index of vector st * S + b of output o (b an unrolled loop's variable: the shift is a constant)."""
    per = p.per(s)
    word = IDX[o, st * (p.S // per) + b // per]
    return T.bitwise_and(T.shift_right(word, p.bits[s] * (b % per)), T.int32((1 << p.bits[s]) - 1))


def _segment(p: VQGemvPlan, o: tirx.PrimExpr) -> tirx.PrimExpr:
    """The codebook of output o: how many segment boundaries lie at or below it."""
    g = T.int32(0)
    for bound in list(running_sum(p.segments))[:-1]:
        g = g + T.Select(o >= bound, T.int32(1), T.int32(0))
    return g


def _hsum(buf: tirx.Buffer, base: tirx.PrimExpr, n: int) -> tirx.PrimExpr:
    """buf[base] + ... + buf[base + n - 1], as a tree."""
    terms = [buf[base + i] for i in range(n)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


@functools.cache  # one parse per distinct plan
def gemv_vq_func(p: VQGemvPlan) -> tirx.PrimFunc:
    """The PrimFunc (X [M, K], ROW_SCALE, CODEBOOK0[, CODEBOOK1], INDICES0[, INDICES1], Y [M, N]) of plan `p`:
    all float32 but the indices, int32 (layout: `vq_layout`)."""
    v, NR, MR, S, KS = p.v, p.NR, p.MR, p.S, p.KS
    vec, fma = f"float32x{v}", f"llvm.fma.v{v}f32"
    rb, mt = p.M // MR, p.M % MR
    two = p.stages == 2

    @T.macro
    def tile(X, RS, CB0, CB1, IDX0, IDX1, Y, acc, cw, m0, mr, o0):
        g = _segment(p, o0)
        for a in T.unroll(mr * NR * KS):
            acc[T.ramp(a * v, 1, v)] = T.broadcast(T.float32(0), v)
        for st in T.serial(p.J // S):
            for b in T.unroll(S):
                for r in T.unroll(NR):
                    if two:
                        cw[T.ramp(r * v, 1, v)] = (CB0[g, _index(p, 0, IDX0, o0 + r, st, b), T.ramp(0, 1, v)]
                                                   + CB1[g, _index(p, 1, IDX1, o0 + r, st, b), T.ramp(0, 1, v)])
                    else:
                        cw[T.ramp(r * v, 1, v)] = CB0[g, _index(p, 0, IDX0, o0 + r, st, b), T.ramp(0, 1, v)]
                for mm in T.unroll(mr):
                    for r in T.unroll(NR):
                        acc[T.ramp(((mm * NR + r) * KS + b % KS) * v, 1, v)] = T.call_llvm_pure_intrin(
                            vec, fma, cw[T.ramp(r * v, 1, v)], X[m0 + mm, T.ramp((st * S + b) * v, 1, v)],
                            acc[T.ramp(((mm * NR + r) * KS + b % KS) * v, 1, v)])
        for mm in T.unroll(mr):
            for r in T.unroll(NR):
                if p.accumulate:
                    Y[m0 + mm, o0 + r] = Y[m0 + mm, o0 + r] + RS[o0 + r] * _hsum(acc, (mm * NR + r) * KS * v, KS * v)
                else:
                    Y[m0 + mm, o0 + r] = RS[o0 + r] * _hsum(acc, (mm * NR + r) * KS * v, KS * v)

    @T.macro
    def body(X, RS, CB0, CB1, IDX0, IDX1, Y):
        for tid in T.parallel(p.num_threads):
            acc = T.alloc_buffer((MR * NR * KS * v,), "float32", scope="local")
            cw = T.alloc_buffer((NR * v,), "float32", scope="local")
            for ti in T.serial(p.CH):
                if tid * p.CH + ti < p.tiles:
                    for mb in T.serial(rb):
                        tile(X, RS, CB0, CB1, IDX0, IDX1, Y, acc, cw, mb * MR, MR, (tid * p.CH + ti) * NR)
                    if mt > 0:
                        tile(X, RS, CB0, CB1, IDX0, IDX1, Y, acc, cw, rb * MR, mt, (tid * p.CH + ti) * NR)

    G = len(p.segments)
    cb = [(G, 1 << b, v) for b in p.bits]
    idx = [(p.N, p.J // p.per(s)) for s in range(p.stages)]
    if not two:
        @T.prim_func(private=True)
        def one_stage(X: T.Buffer((p.M, p.K), "float32"), RS: T.Buffer((p.N,), "float32"),
                      CB0: T.Buffer(cb[0], "float32"), IDX0: T.Buffer(idx[0], "int32"),
                      Y: T.Buffer((p.M, p.N), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(X, RS, CB0, None, IDX0, None, Y)

        return one_stage

    @T.prim_func(private=True)
    def two_stages(X: T.Buffer((p.M, p.K), "float32"), RS: T.Buffer((p.N,), "float32"),
                   CB0: T.Buffer(cb[0], "float32"), CB1: T.Buffer(cb[1], "float32"), IDX0: T.Buffer(idx[0], "int32"),
                   IDX1: T.Buffer(idx[1], "int32"), Y: T.Buffer((p.M, p.N), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(X, RS, CB0, CB1, IDX0, IDX1, Y)

    return two_stages
