"""Float-activation GEMV/GEMM with vector-quantized weights (`VQWeights`: vq2, vq3): AVX2 + FMA.

y[m, o] = row_scale[o] * sum_j sum_t x[m, v*j + t] * C[o, j, t], with C[o, j] = sum over stages s of
codewords_s[idx_s[o, j]] (the float32 codewords, int8 codebook times its scale). x and y are float32; with
`accumulate` the kernel adds into y (a residual add fused into the store).

Layout (`pack_vq_gemv`, numpy only), operands in the kernel's order after x:
- `row_scale`: float32 [N];
- per stage s: `codebook{s}` float32 [2^bits_s, v], the codewords dequantized once at pack time (8 KB for 256 x 4
  ... 4 KB; the residual's 16 x 4 is 256 bytes), so a codeword is one v-wide vector load;
- per stage s: `indices{s}` int32 [N, (K / v) / (32 / bits_s)]: each row's indices, 32 / bits_s to a word, index
  of vector j in bits bits_s * (j % (32 / bits_s)) of word j // (32 / bits_s) (little-endian, as the stored
  `pack_bits` stream: an 8-bit index is one byte of the row). A word load and a shift + mask per index.

Two schedules (`method`):
- "direct": per output row, gather each codeword (one v-wide load per stage, a vector add for the residual) and
  FMA it against x's v columns: a v-lane accumulator per (row, output), summed across lanes at the end. A tile of NR
  output rows shares each x load; MR rows of x share each codeword (prefill).
- "lut": per row of x, a table LUT[j, c] = x[v*j : v*j + v] . codewords[c] (K / v x 2^bits floats: 147 KB for
  K = 576 and 256 entries), then y[o] = sum_j LUT[j, idx[o, j]]: scalar loads and adds, no multiply (VPTQ's and
  AQLM's CPU kernels). The table is built once per call, before the parallel loop, for every output.

Measured (benchmarks/bench_gemv_vq.py, 1 thread, AVX2 znver1, a machine shared with other work): see
`DEFAULT_METHOD`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ....errors import LowbitError
from ....ir.vq_weights import VQWeights
from .int4_groups import cdiv

WORD_BITS = 32
INDEX_BITS = (1, 2, 4, 8)  # indices that tile an int32 word
VECTORS = (4, 8)  # codeword lengths that are one float32 xmm / ymm register
REGISTERS = 16  # ymm/xmm registers on AVX2
LANES = 8  # float32 lanes of a ymm register (the LUT is built 8 codewords at a time)
METHODS = ("direct", "lut")
# "direct" at every M: see the module docstring's measurements.
DEFAULT_METHOD = "direct"


def _check(M: int, K: int, N: int, v: int, bits: tuple[int, ...], where: str) -> None:
    if not 1 <= len(bits) <= VQWeights.MAX_STAGES:
        raise LowbitError(f"{where}: {len(bits)} codebook stages; the kernel takes 1 or 2")
    if v not in VECTORS:
        raise LowbitError(f"{where}: vectors of {v} columns; the kernel loads codewords of {VECTORS} floats")
    for s, b in enumerate(bits):
        if b not in INDEX_BITS:
            raise LowbitError(f"{where}: stage {s} has {b}-bit indices; the kernel packs {INDEX_BITS}-bit "
                              f"indices into int32 words (requantize the layer with one of those)")
    step = v * max(WORD_BITS // b for b in bits)
    if K <= 0 or K % step:
        raise LowbitError(f"{where}: {K} input columns; the kernel reads a word of indices at a time ({step} "
                          f"columns), so pad the weight's columns (and x) with zeros to a multiple of {step}")
    if M <= 0 or N <= 0:
        raise LowbitError(f"{where}: M = {M} rows, N = {N} outputs")


@dataclass(frozen=True)
class VQPacked:
    """`pack_vq_gemv`'s result: the kernel's constant operands (module docstring)."""

    row_scale: np.ndarray
    codebooks: tuple[np.ndarray, ...]
    indices: tuple[np.ndarray, ...]

    def arrays(self) -> list[np.ndarray]:
        """The operands after x, in the kernel's parameter order."""
        return [self.row_scale, *self.codebooks, *self.indices]

    @property
    def nbytes(self) -> int:
        """Bytes a call reads from these weights."""
        return sum(a.nbytes for a in self.arrays())


def pack_indices_words(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint16 [N, J] indices < 2^bits -> int32 [N, J / (32 / bits)], index j in bits bits * (j % per) of word
    j // per (per = 32 / bits)."""
    per = WORD_BITS // bits
    n, j = indices.shape
    shifts = (bits * np.arange(per)).astype(np.uint32)
    words = (indices.astype(np.uint32).reshape(n, j // per, per) << shifts).sum(axis=-1, dtype=np.uint32)
    return np.ascontiguousarray(words).view(np.int32)


def pack_vq_gemv(weights: VQWeights) -> VQPacked:
    """The `gemv_vq` kernel's operands for `weights` (layout in the module docstring)."""
    out_f, in_f = weights.shape
    vs = {s.vector for s in weights.stages}
    if len(vs) != 1:
        raise LowbitError(f"pack_vq_gemv: stages with vectors of {sorted(vs)} columns; the kernel needs one length")
    _check(1, in_f, out_f, vs.pop(), tuple(s.bits for s in weights.stages), "pack_vq_gemv")
    return VQPacked(np.ascontiguousarray(weights.row_scale, np.float32),
                    tuple(np.ascontiguousarray(s.codewords(), np.float32) for s in weights.stages),
                    tuple(pack_indices_words(s.indices, s.bits) for s in weights.stages))


@dataclass(frozen=True)
class VQGemvPlan:
    """x [M, K] times a VQ weight [N, K] (vectors of `v`, one index width per stage in `bits`): NR outputs and
    MR rows of x per register tile, parallel over `num_threads` tasks; `method` "direct" or "lut"."""

    M: int
    K: int
    N: int
    v: int
    bits: tuple[int, ...]
    num_threads: int
    NR: int
    MR: int
    method: str = DEFAULT_METHOD
    KS: int = 1  # partial sums per output (the FMA or add chain's latency limits one output)
    combine: bool = False  # "direct" with 2 stages: one table of summed codewords (k0 * k1 of them) per call
    accumulate: bool = False  # Y += x W^T instead of Y = x W^T

    @classmethod
    def of(cls, M: int, K: int, N: int, stages: int, v: int, bits: int | Sequence[int], num_threads: int,
           accumulate: bool = False, method: str = DEFAULT_METHOD, nr: int | None = None,
           mr: int | None = None, ks: int | None = None, combine: bool = False) -> VQGemvPlan:
        """Default tiles (measured, module docstring): at M = 1, NR = 8 outputs for one stage, NR = 4 with KS = 2
        partial sums for two (their index words and codeword sums need the registers); at M > 1, MR = 6 rows of x
        by NR = 2 outputs. NR falls to the largest power of two dividing N."""
        bits = (bits,) * stages if isinstance(bits, int) else tuple(int(b) for b in bits)
        if len(bits) != stages:
            raise LowbitError(f"VQ GEMV: {stages} stages but index bits {bits}")
        _check(M, K, N, v, bits, "VQ GEMV")
        if method not in METHODS:
            raise LowbitError(f"VQ GEMV: method {method!r}; expected one of {METHODS}")
        if num_threads <= 0:
            raise LowbitError(f"VQ GEMV: num_threads = {num_threads}")
        mr = mr or (1 if M == 1 else min(M, 6))
        if nr is None:
            nr = (8 if stages == 1 else 4) if mr == 1 else 2
            while N % nr:
                nr //= 2
        if N % nr:
            raise LowbitError(f"VQ GEMV: NR = {nr} does not divide {N} outputs")
        if ks is None:  # up to 8 accumulators in all
            ks = 2 if method == "lut" else max(1, REGISTERS // 2 // (mr * nr))
        if ks < 1 or LANES % ks:
            raise LowbitError(f"VQ GEMV: KS = {ks} partial sums; expected 1, 2, 4 or 8")
        return cls(M, K, N, v, bits, num_threads, nr, mr, method, ks, bool(combine), bool(accumulate))

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


def _index(p: VQGemvPlan, s: int, IDX: tirx.Buffer, o: tirx.PrimExpr, st: tirx.PrimExpr, b: int) -> tirx.PrimExpr:
    """Stage s's index of vector st * S + b of output o (b a Python int: the shift is a constant)."""
    per = p.per(s)
    word = IDX[o, st * (p.S // per) + b // per]
    return T.bitwise_and(T.shift_right(word, T.int32(p.bits[s] * (b % per))), T.int32((1 << p.bits[s]) - 1))


def _direct(p: VQGemvPlan) -> tirx.PrimFunc:
    v, NR, MR, S, KS = p.v, p.NR, p.MR, p.S, p.KS
    vec, fma = f"float32x{v}", f"llvm.fma.v{v}f32"
    rb, mt = p.M // MR, p.M % MR
    two, comb = p.stages == 2, p.stages == 2 and p.combine
    k0, k1 = 1 << p.bits[0], 1 << p.bits[-1]

    @T.macro
    def tile(X, RS, CB0, CB1, IDX0, IDX1, TAB, Y, acc, cw, m0, mr, o0):
        for a in T.unroll(mr * NR * KS):
            acc[T.ramp(a * v, 1, v)] = T.broadcast(T.float32(0), v)
        for st in T.serial(p.J // S):
            for b in T.unroll(S):
                for r in T.unroll(NR):
                    if comb:
                        cw[T.ramp(r * v, 1, v)] = TAB[_index(p, 0, IDX0, o0 + r, st, b) * k1
                                                      + _index(p, 1, IDX1, o0 + r, st, b), T.ramp(0, 1, v)]
                    elif two:
                        cw[T.ramp(r * v, 1, v)] = (CB0[_index(p, 0, IDX0, o0 + r, st, b), T.ramp(0, 1, v)]
                                                   + CB1[_index(p, 1, IDX1, o0 + r, st, b), T.ramp(0, 1, v)])
                    else:
                        cw[T.ramp(r * v, 1, v)] = CB0[_index(p, 0, IDX0, o0 + r, st, b), T.ramp(0, 1, v)]
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
        # vq3 with `combine`: every sum of a codeword and a residual codeword, once per call (k0 * k1 vectors)
        TAB = T.alloc_buffer((k0 * k1 if comb else 1, v), "float32")
        if comb:
            for i in T.serial(k0):
                for i1 in T.serial(k1):
                    TAB[i * k1 + i1, T.ramp(0, 1, v)] = CB0[i, T.ramp(0, 1, v)] + CB1[i1, T.ramp(0, 1, v)]
        for tid in T.parallel(p.num_threads):
            acc = T.alloc_buffer((MR * NR * KS * v,), "float32", scope="local")
            cw = T.alloc_buffer((NR * v,), "float32", scope="local")
            for ti in T.serial(p.CH):
                if tid * p.CH + ti < p.tiles:
                    for mb in T.serial(rb):
                        tile(X, RS, CB0, CB1, IDX0, IDX1, TAB, Y, acc, cw, mb * MR, MR, (tid * p.CH + ti) * NR)
                    if mt > 0:
                        tile(X, RS, CB0, CB1, IDX0, IDX1, TAB, Y, acc, cw, rb * MR, mt, (tid * p.CH + ti) * NR)

    return _signature(p, body)


def _hsum(buf: tirx.Buffer, base: int, n: int) -> tirx.PrimExpr:
    """buf[base] + ... + buf[base + n - 1], as a tree."""
    terms = [buf[base + i] for i in range(n)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    return terms[0]


def _dot(X: tirx.Buffer, CBT: tirx.Buffer, m: tirx.PrimExpr, j: tirx.PrimExpr, c: tirx.PrimExpr, v: int,
         lw: int) -> tirx.PrimExpr:
    """x[m, v*j : v*j + v] . codewords[c*lw : c*lw + lw] for lw codewords at once (CBT: the codebook [v, k])."""
    dot = T.broadcast(X[m, j * v], lw) * CBT[0, T.ramp(c * lw, 1, lw)]
    for t in range(1, v):
        dot = T.call_llvm_pure_intrin(f"float32x{lw}", f"llvm.fma.v{lw}f32", CBT[t, T.ramp(c * lw, 1, lw)],
                                      T.broadcast(X[m, j * v + t], lw), dot)
    return dot


def _lut(p: VQGemvPlan) -> tirx.PrimFunc:
    v, NR, S, KS, J = p.v, p.NR, p.S, p.KS, p.J
    ks = [1 << b for b in p.bits]
    lw = [min(LANES, k) for k in ks]  # codewords per vector of the table build
    two = p.stages == 2

    @T.macro
    def transpose(CB, CBT, k):
        for c in T.serial(k):
            for t in T.serial(v):
                CBT[t, c] = CB[c, t]

    @T.macro
    def build(X, CBT, L, m, k, w):
        for j in T.serial(J):
            for c in T.serial(k // w):
                L[j, T.ramp(c * w, 1, w)] = _dot(X, CBT, m, j, c, v, w)

    @T.macro
    def lookup(RS, IDX0, IDX1, L0, L1, Y, acc, m, o0):
        for a in T.unroll(NR * KS):
            acc[a] = T.float32(0)
        for st in T.serial(J // S):
            for b in T.unroll(S):
                for r in T.unroll(NR):
                    if two:
                        acc[r * KS + b % KS] = acc[r * KS + b % KS] + (
                            L0[st * S + b, _index(p, 0, IDX0, o0 + r, st, b)]
                            + L1[st * S + b, _index(p, 1, IDX1, o0 + r, st, b)])
                    else:
                        acc[r * KS + b % KS] = acc[r * KS + b % KS] + L0[st * S + b,
                                                                         _index(p, 0, IDX0, o0 + r, st, b)]
        for r in T.unroll(NR):
            if p.accumulate:
                Y[m, o0 + r] = Y[m, o0 + r] + RS[o0 + r] * _hsum(acc, r * KS, KS)
            else:
                Y[m, o0 + r] = RS[o0 + r] * _hsum(acc, r * KS, KS)

    @T.macro
    def body(X, RS, CB0, CB1, IDX0, IDX1, Y):
        L0 = T.alloc_buffer((J, ks[0]), "float32")
        CBT0 = T.alloc_buffer((v, ks[0]), "float32")
        L1 = T.alloc_buffer((J, ks[-1] if two else 1), "float32")  # a one-float stand-in when unused
        CBT1 = T.alloc_buffer((v, ks[-1] if two else 1), "float32")
        if two:
            transpose(CB1, CBT1, ks[1])
        transpose(CB0, CBT0, ks[0])
        for m in T.serial(p.M):
            build(X, CBT0, L0, m, ks[0], lw[0])
            if two:
                build(X, CBT1, L1, m, ks[1], lw[1])
            for tid in T.parallel(p.num_threads):
                acc = T.alloc_buffer((NR * KS,), "float32", scope="local")
                for ti in T.serial(p.CH):
                    if tid * p.CH + ti < p.tiles:
                        lookup(RS, IDX0, IDX1, L0, L1, Y, acc, m, (tid * p.CH + ti) * NR)

    return _signature(p, body)


def _signature(p: VQGemvPlan, body: object) -> tirx.PrimFunc:
    """The PrimFunc (X, ROW_SCALE, CODEBOOK0[, CODEBOOK1], INDICES0[, INDICES1], Y) around `body`."""
    cb = [(1 << b, p.v) for b in p.bits]
    idx = [(p.N, p.J // p.per(s)) for s in range(p.stages)]
    if p.stages == 1:
        @T.prim_func(private=True)
        def one(X: T.Buffer((p.M, p.K), "float32"), RS: T.Buffer((p.N,), "float32"),
                CB0: T.Buffer(cb[0], "float32"), IDX0: T.Buffer(idx[0], "int32"), Y: T.Buffer((p.M, p.N), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(X, RS, CB0, None, IDX0, None, Y)

        return one

    @T.prim_func(private=True)
    def two(X: T.Buffer((p.M, p.K), "float32"), RS: T.Buffer((p.N,), "float32"), CB0: T.Buffer(cb[0], "float32"),
            CB1: T.Buffer(cb[1], "float32"), IDX0: T.Buffer(idx[0], "int32"), IDX1: T.Buffer(idx[1], "int32"),
            Y: T.Buffer((p.M, p.N), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(X, RS, CB0, CB1, IDX0, IDX1, Y)

    return two


@functools.cache  # one parse per distinct plan
def gemv_vq_func(p: VQGemvPlan) -> tirx.PrimFunc:
    """The PrimFunc (X [M, K], ROW_SCALE, CODEBOOK0[, CODEBOOK1], INDICES0[, INDICES1], Y [M, N]) of plan `p`:
    all float32 but the indices, int32 (module docstring)."""
    return _direct(p) if p.method == "direct" else _lut(p)
