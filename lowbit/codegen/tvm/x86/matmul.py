"""Batched int8 matmul of two run-time tensors, out[b, m, n] = sum_k x[b, m, k] * y[b, n, k] (int32), with VNNI.

Attention needs this shape twice (Q.K^T; A.V with V transposed). Neither operand is a constant, so both are
packed at run time, into the words the GEMM micro-kernel reads (`gemm`, VNNI int8):
- y into [B, N/8, KB/4, 8] int32 words, byte b of the word for step q and lane c the value y[c, 4q+b]
  (`packing.pack_k_major_vnni` is the same layout built in numpy), N and K zero-padded;
- x into bytes x' (uint8: x; int8: x + 128), 4 per int32 word, K zero-padded;
- for int8 x, sum_k x' y = sum_k x y + 128 * sum_k y, so each output starts from -128 * sum_k y[b, n], summed
  in the same packing pass.
Then `vpdpbusd` (u8 * s8 quads, summed exactly into int32) accumulates one 8-column vector per output row.
Exact while |sum_k x y| + 128 * sum_k |y| < 2^31: K <= 65,000 or so.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ....ir.dtypes import qrange
from .epilogue import requantize_vec
from .isa import PMADDWD, VPDPBUSD, word4, xbyte
from .packing import VEC, cdiv
from .plans import NUM_THREADS, choose_tile
from .requant import epilogue_constants, f64_requant_is_exact, requant_arrays


def matmul_nt(x_shape: tuple[int, int, int], y_shape: tuple[int, int, int], x_dtype: str, y_dtype: str = "int8",
              num_threads: int = NUM_THREADS, vnni: bool = True) -> tuple[tirx.PrimFunc, list]:
    """PrimFunc (x [B, M, K] x_dtype, y [B, N, K] int8, out [B, M, N] int32) and its constants (none)."""
    B, M, K = (int(v) for v in x_shape)
    By, N, Ky = (int(v) for v in y_shape)
    if (By, Ky) != (B, K):
        raise ValueError(f"matmul_nt: x {tuple(x_shape)} and y {tuple(y_shape)} differ in batch or K")
    if x_dtype not in ("int8", "uint8") or y_dtype != "int8":
        raise ValueError(f"matmul_nt takes int8/uint8 x and int8 y, not {x_dtype} x {y_dtype}")
    if not vnni:
        raise ValueError("matmul_nt needs VNNI (AVX-512 VNNI with VL, or AVX-VNNI)")
    KQ = cdiv(K, 4)  # int32 words per row, K zero-padded to 4 * KQ
    NB = cdiv(N, VEC)  # 8-column vectors of y
    NB_FULL = N // VEC
    offset = x_dtype == "int8"  # x' = x + 128

    def y_byte(Y, b, n, k):
        """y[b, n, k] as its two's complement byte; zero for columns past N."""
        return T.if_then_else(n < N, T.reinterpret("uint8", Y[b, T.min(n, N - 1), k]), T.uint8(0))

    def x_byte(X, b, m, k):
        return xbyte(X[b, m, k], x_dtype, 1)

    @T.prim_func(private=True)
    def func(X: T.Buffer((B, M, K), x_dtype), Y: T.Buffer((B, N, K), "int8"), OUT: T.Buffer((B, M, N), "int32")):
        T.func_attr({"tirx.noalias": True})
        YW = T.alloc_buffer((B, NB, KQ, VEC), "int32")
        START = T.alloc_buffer((B, NB * VEC), "int32")  # each output's starting value: -128 * sum_k y, or 0
        XW = T.alloc_buffer((B, M, KQ), "int32")
        for bn in T.parallel(B * NB):
            for lane in T.serial(VEC):
                START[bn // NB, bn % NB * VEC + lane] = 0
                for q in T.serial(KQ):
                    YW[bn // NB, bn % NB, q, lane] = word4(y_byte, 4 * q, K, Y, bn // NB, bn % NB * VEC + lane)
                if offset:
                    for k in T.serial(K):
                        START[bn // NB, bn % NB * VEC + lane] = START[bn // NB, bn % NB * VEC + lane] - 128 * T.Cast(
                            "int32", T.if_then_else(bn % NB * VEC + lane < N,
                                                    Y[bn // NB, T.min(bn % NB * VEC + lane, N - 1), k], T.int8(0)))
        for bm in T.parallel(B * M):
            for q in T.serial(KQ):
                XW[bm // M, bm % M, q] = word4(x_byte, 4 * q, K, X, bm // M, bm % M)
        for task in T.parallel(num_threads):
            acc = T.alloc_buffer((VEC,), "int32", scope="local")
            for i in T.serial(cdiv(B * M * NB, num_threads)):
                if task * cdiv(B * M * NB, num_threads) + i < B * M * NB:
                    t = T.meta_var(task * cdiv(B * M * NB, num_threads) + i)
                    b = T.meta_var(t // (M * NB))
                    m = T.meta_var(t // NB % M)
                    nb = T.meta_var(t % NB)
                    acc[T.ramp(0, 1, VEC)] = START[b, T.ramp(nb * VEC, 1, VEC)]
                    for q in T.serial(KQ):
                        acc[T.ramp(0, 1, VEC)] = T.call_llvm_pure_intrin(
                            "int32x8", VPDPBUSD, acc[T.ramp(0, 1, VEC)],
                            T.reinterpret("int8x32", T.broadcast(XW[b, m, q], VEC)),
                            T.reinterpret("int8x32", YW[b, nb, q, T.ramp(0, 1, VEC)]))
                    if nb < NB_FULL:
                        OUT[b, m, T.ramp(nb * VEC, 1, VEC)] = acc[T.ramp(0, 1, VEC)]
                    else:
                        for lane in T.serial(N - NB_FULL * VEC):
                            OUT[b, m, NB_FULL * VEC + lane] = acc[lane]

    return func, []


View = tuple[tuple[int, ...], tuple[int, ...]]  # (a stored tensor's shape, dims): see `matmul_pairs`


def _indexer(shape: tuple[int, ...], view: View | None, stored_out: bool = False):
    """(the buffer's shape, at(t, i, j) -> its flat index) for element [.., i, j] of batch item t (the leading
    axes of `shape` flattened) of a logical operand of `shape`. Without `view` the buffer is the operand. An
    input view (shape S, dims) is the operand transpose(x, dims) read from x [S]; an output view stores the
    result as transpose(out, dims). Flat, because only a buffer's last index may be a vector (j a ramp)."""
    lead = shape[:-2]
    stored, dims = (shape, tuple(range(len(shape)))) if view is None else (
        tuple(int(v) for v in view[0]), tuple(int(d) for d in view[1]))
    if sorted(dims) != list(range(len(shape))) or tuple(
            (shape[d] for d in dims) if stored_out else (stored[d] for d in dims)) != (stored if stored_out else shape):
        raise ValueError(f"matmul_pairs: view {view} does not give an operand of shape {shape}")
    strides = [int(np.prod(stored[q + 1:], dtype=np.int64)) for q in range(len(stored))]

    def at(t, i, j):
        logical = (*_unflatten(t, lead), i, j)
        if stored_out:
            index = [logical[d] for d in dims]
        else:
            index = [None] * len(dims)
            for axis, d in enumerate(dims):
                index[d] = logical[axis]
        flat = index[-1]
        for q in range(len(index) - 1):
            flat = index[q] * strides[q] + flat
        return flat

    return stored, at


def _unflatten(t, lead: tuple[int, ...]) -> list:
    """The indices over axes `lead` of flat index t (row-major)."""
    out = []
    for q, size in enumerate(lead):
        inner = int(np.prod(lead[q + 1:], dtype=np.int64))
        out.append(t // inner if q == 0 else t // inner % size)
    return out


def matmul_pairs(a_shape: tuple[int, ...], b_shape: tuple[int, ...], a_dtype: str, b_dtype: str,
                 requant: tuple[int, int, int, int, str] | None = None, num_threads: int = NUM_THREADS,
                 avx512: bool = False, a_view: View | None = None, b_view: View | None = None,
                 out_view: View | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    """Batched a [..., M, K] @ b [..., K, N] of 8-bit operands (int8 or uint8 each), the exact int32 sum, then the
    per-tensor requantizer (mantissa, shift, qmin, qmax, dtype) or the raw sum: AVX2, no VNNI needed.

    Each batch item's operands are packed at run time into int16 pairs along K (the AVX2 GEMM's words, `gemm`):
    a into [M, KP] words (a[m, 2p] low, a[m, 2p+1] high), b into [N/8, KP, 8] words (lane c: column 8j+c), both
    zero-padded; then an MR x NV register tile of int32x8 accumulators takes one broadcast a word per row and
    one b vector per column block, `vpmaddwd` (two int16 products summed exactly into int32: |a b| <= 2^15, so
    no sum of K < 2^16 terms leaves int32). The requantizer is the GEMM's epilogue (`epilogue.requantize_vec`).
    PrimFunc (a, b, [ALO, AHI, MANT, C1, SH, C2, MD,] out) and the constants to pass after a and b.

    Views fold an attention's permutes into the operand reads and the result's writes: `a_view` = (S, dims)
    takes a as transpose(x, dims) of a tensor x of shape S, read in place (the PrimFunc's a is x); so does
    `b_view`; `out_view` = (S, dims) writes transpose(out, dims), of shape S."""
    a_shape, b_shape = tuple(int(v) for v in a_shape), tuple(int(v) for v in b_shape)
    if a_shape[:-2] != b_shape[:-2] or a_shape[-1] != b_shape[-2] or len(a_shape) < 3:
        raise ValueError(f"matmul_pairs: a {a_shape} and b {b_shape} are not [..., M, K] @ [..., K, N]")
    if a_dtype not in ("int8", "uint8") or b_dtype not in ("int8", "uint8"):
        raise ValueError(f"matmul_pairs takes 8-bit operands, not {a_dtype} x {b_dtype}")
    M, K, N = a_shape[-2], a_shape[-1], b_shape[-1]
    TB = int(np.prod(a_shape[:-2]))  # batch items
    KP, NB = cdiv(K, 2), cdiv(N, VEC)
    NB_FULL, LAST = N // VEC, N - N // VEC * VEC
    MR, NV = choose_tile(M, NB)
    NCT_FULL, NV_TAIL = NB // NV, NB % NV
    NRB, MR_TAIL = M // MR, M % MR
    CH = cdiv(TB, num_threads)
    out_shape = (*a_shape[:-1], N)
    a_buf, a_at = _indexer(a_shape, a_view)
    b_buf, b_at = _indexer(b_shape, b_view)
    out_buf, out_at = _indexer(out_shape, out_view, stored_out=True)
    out_dtype = "int32" if requant is None else requant[4]
    consts: list[np.ndarray] = []
    f64 = False
    if requant is not None:
        mantissa, shift, qmin, qmax, _ = requant
        m_arr, s_arr = np.full(N, mantissa, np.int64), np.full(N, shift, np.int64)
        bound = K * max(abs(v) for v in qrange(a_dtype)) * max(abs(v) for v in qrange(b_dtype))
        f64 = f64_requant_is_exact(m_arr, s_arr, qmin, qmax, np.full(N, bound, np.int64))
        consts = epilogue_constants(requant_arrays(np.zeros(N, np.int64), m_arr, s_arr, qmin, qmax, N, NB * VEC),
                                    True)[1:]  # no bias

    def pair(lo, hi, lanes=1):
        """int32 words (`lanes` of them) of the int16 pairs (lo, hi)."""
        mask, sixteen = (T.int32(0xFFFF), T.int32(16)) if lanes == 1 else (T.broadcast(T.int32(0xFFFF), lanes),
                                                                           T.broadcast(T.int32(16), lanes))
        return T.bitwise_or(T.bitwise_and(lo, mask), T.shift_left(hi, sixteen))

    def b_odd(BF, t, p, n, lanes=1):
        """b[t, 2p + 1, n] (n a ramp of `lanes`), zero past K."""
        if K % 2 == 0:
            return BF[b_at(t, 2 * p + 1, n)]
        inside = T.Cast(b_dtype, 2 * p + 1 < K)
        return BF[b_at(t, T.min(2 * p + 1, K - 1), n)] * (inside if lanes == 1 else T.broadcast(inside, lanes))

    def result(R, nb, accv):
        """The 8 sums of column block nb as stored: requantized where asked."""
        if requant is None:
            return accv
        return T.Cast(f"{out_dtype}x{VEC}", requantize_vec(accv, R, nb * VEC, requant[2], requant[3], f64, avx512))

    @T.macro
    def tile(AW, BW, R, OF, acc, t, m0, nb0, mr, nv):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = T.broadcast(T.int32(0), VEC)
        for p in T.serial(KP):
            for r in T.unroll(mr):
                for v in T.unroll(nv):
                    acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[T.ramp((r * nv + v) * VEC, 1, VEC)] + \
                        T.call_llvm_pure_intrin("int32x8", PMADDWD,
                                                T.reinterpret("int16x16", T.broadcast(AW[m0 + r, p], VEC)),
                                                T.reinterpret("int16x16", BW[nb0 + v, p, T.ramp(0, 1, VEC)]))
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                if LAST == 0:
                    OF[out_at(t, m0 + r, T.ramp((nb0 + v) * VEC, 1, VEC))] = result(
                        R, nb0 + v, acc[T.ramp((r * nv + v) * VEC, 1, VEC)])
                elif nb0 + v < NB_FULL:
                    OF[out_at(t, m0 + r, T.ramp((nb0 + v) * VEC, 1, VEC))] = result(
                        R, nb0 + v, acc[T.ramp((r * nv + v) * VEC, 1, VEC)])
                else:  # the partial last block: lane by lane
                    acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = T.Cast("int32x8", result(
                        R, nb0 + v, acc[T.ramp((r * nv + v) * VEC, 1, VEC)]))
                    for ln in T.serial(LAST):
                        OF[out_at(t, m0 + r, NB_FULL * VEC + ln)] = T.Cast(out_dtype, acc[(r * nv + v) * VEC + ln])

    @T.macro
    def body(A, B, R, OUT):
        AF = T.decl_buffer((int(np.prod(a_buf)),), a_dtype, data=A.data)
        BF = T.decl_buffer((int(np.prod(b_buf)),), b_dtype, data=B.data)
        OF = T.decl_buffer((int(np.prod(out_buf)),), out_dtype, data=OUT.data)
        for task in T.parallel(num_threads):
            AW = T.alloc_buffer((M, KP), "int32")
            BW = T.alloc_buffer((NB, KP, VEC), "int32")
            acc = T.alloc_buffer((MR * NV * VEC,), "int32", scope="local")
            for ti in T.serial(CH):
                if task * CH + ti < TB:
                    t = T.meta_var(task * CH + ti)
                    # b: int16 pairs of rows 2p, 2p+1 per column lane, zero past K and N
                    for p in T.serial(KP):
                        for nb in T.serial(NB_FULL):
                            cols = T.meta_var(T.ramp(nb * VEC, 1, VEC))
                            BW[nb, p, T.ramp(0, 1, VEC)] = pair(T.Cast("int32x8", BF[b_at(t, 2 * p, cols)]),
                                                                T.Cast("int32x8", b_odd(BF, t, p, cols, VEC)), VEC)
                        for ln in T.serial(VEC * (NB - NB_FULL)):
                            BW[NB_FULL, p, ln] = T.if_then_else(
                                NB_FULL * VEC + ln < N,
                                pair(T.Cast("int32", BF[b_at(t, 2 * p, T.min(NB_FULL * VEC + ln, N - 1))]),
                                     T.Cast("int32", b_odd(BF, t, p, T.min(NB_FULL * VEC + ln, N - 1)))), 0)
                    # a: int16 pairs along K, 16 values (8 words) at a time
                    for m in T.serial(M):
                        for q in T.serial(K // 16):
                            AW[m, T.ramp(q * 8, 1, 8)] = T.reinterpret(
                                "int32x8", T.Cast("int16x16", AF[a_at(t, m, T.ramp(q * 16, 1, 16))]))
                        for p in T.serial(KP - K // 16 * 8):
                            AW[m, K // 16 * 8 + p] = T.bitwise_or(
                                T.bitwise_and(T.Cast("int32", AF[a_at(t, m, K // 16 * 16 + 2 * p)]), 0xFFFF),
                                T.shift_left(T.Cast("int32", AF[a_at(t, m, T.min(K // 16 * 16 + 2 * p + 1, K - 1))])
                                             * T.Cast("int32", K // 16 * 16 + 2 * p + 1 < K), 16))
                    for ct in T.serial(NCT_FULL):
                        for rb in T.serial(NRB):
                            tile(AW, BW, R, OF, acc, t, rb * MR, ct * NV, MR, NV)
                        if MR_TAIL > 0:
                            tile(AW, BW, R, OF, acc, t, NRB * MR, ct * NV, MR_TAIL, NV)
                    if NV_TAIL > 0:
                        for rb in T.serial(NRB):
                            tile(AW, BW, R, OF, acc, t, rb * MR, NCT_FULL * NV, MR, NV_TAIL)
                        if MR_TAIL > 0:
                            tile(AW, BW, R, OF, acc, t, NRB * MR, NCT_FULL * NV, MR_TAIL, NV_TAIL)

    if requant is None:

        @T.prim_func(private=True)
        def func(A: T.Buffer(a_buf, a_dtype), B: T.Buffer(b_buf, b_dtype), OUT: T.Buffer(out_buf, "int32")):
            T.func_attr({"tirx.noalias": True})
            body(A, B, None, OUT)

    else:
        NP = NB * VEC

        @T.prim_func(private=True)
        def func(A: T.Buffer(a_buf, a_dtype), B: T.Buffer(b_buf, b_dtype), ALO: T.Buffer((NP,), "int32"),
                 AHI: T.Buffer((NP,), "int32"), MANT: T.Buffer((NP + VEC,), "int32"), C1: T.Buffer((NP,), "int64"),
                 SH: T.Buffer((NP,), "int64"), C2: T.Buffer((NP,), "int32"), MD: T.Buffer((NP,), "float64"),
                 OUT: T.Buffer(out_buf, out_dtype)):
            T.func_attr({"tirx.noalias": True})
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
            body(A, B, R, OUT)

    return func, consts
