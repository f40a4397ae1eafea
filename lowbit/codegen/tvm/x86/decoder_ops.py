"""The small float32 kernels of a Llama decoder step around its GEMVs: RMSNorm, RoPE with the KV-cache write,
attention over the cache (grouped-query, causal, length from the position argument) and SiLU(gate) * up.

Each is a PrimFunc over M rows (1 for a decode step, the prefill chunk otherwise) at positions pos .. pos + M - 1,
`pos` an int32 argument, so one compiled function serves every position. Vectors are 8 float32 lanes (AVX2):
hidden size and head_dim must be multiples of 8. They compute what `lowbit.runtime.decoder.DecoderModel` computes
in numpy, in float32 (the order of additions differs, so results agree to float rounding, not bit for bit).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .int4_groups import LANES


def _hsum(v: tirx.Buffer) -> tirx.PrimExpr:
    """The sum of the 8 lanes held in v[0..7], as a tree."""
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))


@functools.cache
def rmsnorm_func(m_in: int, m_out: int, dim: int, eps: float) -> tirx.PrimFunc:
    """(X [m_in, dim], GAIN [dim], Y [m_out, dim], row): Y[m] = X[row + m] / sqrt(mean(X[row + m]^2) + eps) * GAIN
    (row = 0 for a block's norms; the final norm reads only the last position)."""
    vecs = dim // LANES

    @T.prim_func(private=True)
    def func(X: T.Buffer((m_in, dim), "float32"), GAIN: T.Buffer((dim,), "float32"),
             Y: T.Buffer((m_out, dim), "float32"), row: T.int32):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((LANES,), "float32", scope="local")
        r = T.alloc_buffer((1,), "float32", scope="local")
        for m in T.serial(m_out):
            acc[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for k in T.serial(vecs):
                acc[T.ramp(0, 1, LANES)] = acc[T.ramp(0, 1, LANES)] + (X[row + m, T.ramp(k * LANES, 1, LANES)]
                                                                       * X[row + m, T.ramp(k * LANES, 1, LANES)])
            r[0] = T.float32(1) / T.sqrt(_hsum(acc) / T.float32(dim) + T.float32(eps))
            for k in T.serial(vecs):
                Y[m, T.ramp(k * LANES, 1, LANES)] = (X[row + m, T.ramp(k * LANES, 1, LANES)]
                                                     * T.broadcast(r[0], LANES) * GAIN[T.ramp(k * LANES, 1, LANES)])

    return func


@functools.cache
def rope_cache_func(m: int, heads: int, kv_heads: int, head_dim: int, context: int) -> tirx.PrimFunc:
    """(QKV [m, (heads + 2 kv_heads) head_dim], COS, SIN [context, head_dim / 2], KT [kv_heads, head_dim,
    context], V [kv_heads, context, head_dim], Q [m, heads head_dim], pos): rotate adjacent pairs of q and k by
    position pos + row (llama.cpp's layout), write q to Q and k, v into the caches at pos + row (keys transposed:
    attention scores contiguous keys)."""
    half, rotated = head_dim // 2, heads + kv_heads
    width = (heads + 2 * kv_heads) * head_dim

    @T.prim_func(private=True)
    def func(QKV: T.Buffer((m, width), "float32"), COS: T.Buffer((context, half), "float32"),
             SIN: T.Buffer((context, half), "float32"), KT: T.Buffer((kv_heads, head_dim, context), "float32"),
             V: T.Buffer((kv_heads, context, head_dim), "float32"), Q: T.Buffer((m, heads * head_dim), "float32"),
             pos: T.int32):
        T.func_attr({"tirx.noalias": True})
        for r in T.serial(m):
            for h in T.serial(rotated):
                for i in T.serial(half):
                    x0 = T.meta_var(QKV[r, h * head_dim + 2 * i])
                    x1 = T.meta_var(QKV[r, h * head_dim + 2 * i + 1])
                    c = T.meta_var(COS[pos + r, i])
                    s = T.meta_var(SIN[pos + r, i])
                    if h < heads:
                        Q[r, h * head_dim + 2 * i] = x0 * c - x1 * s
                        Q[r, h * head_dim + 2 * i + 1] = x0 * s + x1 * c
                    else:
                        KT[h - heads, 2 * i, pos + r] = x0 * c - x1 * s
                        KT[h - heads, 2 * i + 1, pos + r] = x0 * s + x1 * c
            for kv in T.serial(kv_heads):
                for d in T.serial(head_dim // LANES):
                    V[kv, pos + r, T.ramp(d * LANES, 1, LANES)] = QKV[r, T.ramp(
                        (rotated + kv) * head_dim + d * LANES, 1, LANES)]

    return func


KEYS = 4 * LANES  # keys scored per block of the attention kernel (the cache's context must be a multiple)


def _exp8(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp of float32x8 x <= 0 (softmax's x - max): 2^n * p(r), r = x - n ln 2 in two parts (Cody-Waite), p
    Cephes' degree-6 expf polynomial (relative error about 1e-7); below -87 it flushes to about 1e-38."""
    x = T.max(x, T.broadcast(T.float32(-87.0), LANES))
    n = T.floor(x * T.broadcast(T.float32(1.44269504), LANES) + T.broadcast(T.float32(0.5), LANES))
    r = x - n * T.broadcast(T.float32(0.693359375), LANES) + n * T.broadcast(T.float32(2.12194440e-4), LANES)
    p = T.broadcast(T.float32(1.9875691500e-4), LANES)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.broadcast(T.float32(c), LANES)
    y = p * r * r + r + T.broadcast(T.float32(1), LANES)
    two_n = T.reinterpret("float32x8", T.shift_left(T.Cast("int32x8", n) + T.broadcast(T.int32(127), LANES),
                                                    T.broadcast(T.int32(23), LANES)))
    return y * two_n


@functools.cache
def attention_func(m: int, heads: int, kv_heads: int, head_dim: int, context: int,
                   num_threads: int) -> tirx.PrimFunc:
    """(Q [m, heads head_dim], KT [kv_heads, head_dim, context] (keys transposed), V [kv_heads, context,
    head_dim], S [m heads, context] (scratch), OUT [m, heads head_dim], pos): row r of query head h attends to
    cache positions 0 .. pos + r of KV head h // (heads / kv_heads), softmax(q k^T / sqrt(head_dim)) v.

    Parallel over (row, head) pairs, three passes: scores of KEYS keys at a time (keys are contiguous in KT, so
    a score vector is head_dim FMAs, no horizontal sums; positions past the row's last are masked), exponentials
    (vectorized, `_exp8`) and their sum, then the values weighted one key at a time."""
    vecs, group, blocks = head_dim // LANES, heads // kv_heads, KEYS // LANES
    scale = float(head_dim) ** -0.5
    lowest = T.min_value("float32")

    @T.prim_func(private=True)
    def func(Q: T.Buffer((m, heads * head_dim), "float32"), KT: T.Buffer((kv_heads, head_dim, context), "float32"),
             V: T.Buffer((kv_heads, context, head_dim), "float32"), S: T.Buffer((m * heads, context), "float32"),
             OUT: T.Buffer((m, heads * head_dim), "float32"), pos: T.int32):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(m * heads):
            acc = T.alloc_buffer((KEYS,), "float32", scope="local")
            top = T.alloc_buffer((LANES,), "float32", scope="local")
            out = T.alloc_buffer((head_dim,), "float32", scope="local")
            r = T.meta_var(t // heads)
            h = T.meta_var(t % heads)
            kv = T.meta_var(t % heads // group)
            length = T.meta_var(pos + r + 1)
            top[T.ramp(0, 1, LANES)] = T.broadcast(lowest, LANES)
            for b in T.serial((length + KEYS - 1) // KEYS):
                for a in T.unroll(blocks):
                    acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                for d in T.unroll(head_dim):
                    for a in T.unroll(blocks):
                        acc[T.ramp(a * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "float32x8", "llvm.fma.v8f32", T.broadcast(Q[r, h * head_dim + d], LANES),
                            KT[kv, d, T.ramp(b * KEYS + a * LANES, 1, LANES)], acc[T.ramp(a * LANES, 1, LANES)])
                for a in T.unroll(blocks):
                    S[t, T.ramp(b * KEYS + a * LANES, 1, LANES)] = T.Select(
                        T.ramp(b * KEYS + a * LANES, 1, LANES) < T.broadcast(length, LANES),
                        acc[T.ramp(a * LANES, 1, LANES)] * T.broadcast(T.float32(scale), LANES),
                        T.broadcast(lowest, LANES))
                    top[T.ramp(0, 1, LANES)] = T.max(top[T.ramp(0, 1, LANES)],
                                                     S[t, T.ramp(b * KEYS + a * LANES, 1, LANES)])
            top[0] = T.max(T.max(T.max(top[0], top[4]), T.max(top[1], top[5])),
                           T.max(T.max(top[2], top[6]), T.max(top[3], top[7])))
            acc[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for b in T.serial((length + LANES - 1) // LANES):
                S[t, T.ramp(b * LANES, 1, LANES)] = T.Select(
                    T.ramp(b * LANES, 1, LANES) < T.broadcast(length, LANES),
                    _exp8(S[t, T.ramp(b * LANES, 1, LANES)] - T.broadcast(top[0], LANES)),
                    T.broadcast(T.float32(0), LANES))
                acc[T.ramp(0, 1, LANES)] = acc[T.ramp(0, 1, LANES)] + S[t, T.ramp(b * LANES, 1, LANES)]
            for v in T.unroll(vecs):
                out[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for j in T.serial(length):
                for v in T.unroll(vecs):
                    out[T.ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                        "float32x8", "llvm.fma.v8f32", T.broadcast(S[t, j], LANES),
                        V[kv, j, T.ramp(v * LANES, 1, LANES)], out[T.ramp(v * LANES, 1, LANES)])
            for v in T.unroll(vecs):
                OUT[r, T.ramp(h * head_dim + v * LANES, 1, LANES)] = (
                    out[T.ramp(v * LANES, 1, LANES)] * T.broadcast(T.float32(1) / _hsum(acc), LANES))

    return func


@functools.cache
def silu_mul_func(m: int, intermediate: int) -> tirx.PrimFunc:
    """(GU [m, 2 intermediate] = [gate | up], A [m, intermediate]): A = SiLU(gate) * up."""

    @T.prim_func(private=True)
    def func(GU: T.Buffer((m, 2 * intermediate), "float32"), A: T.Buffer((m, intermediate), "float32")):
        T.func_attr({"tirx.noalias": True})
        for r in T.serial(m):
            for i in T.serial(intermediate):
                A[r, i] = GU[r, i] / (T.float32(1) + T.exp(-GU[r, i])) * GU[r, intermediate + i]

    return func
