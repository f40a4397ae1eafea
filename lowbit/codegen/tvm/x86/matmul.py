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

from tvm import tirx
from tvm.script import tirx as T

from .isa import VPDPBUSD, word4, xbyte
from .packing import VEC, cdiv
from .plans import NUM_THREADS


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
