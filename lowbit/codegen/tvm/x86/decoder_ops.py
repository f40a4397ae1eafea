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
    """(QKV [m, (heads + 2 kv_heads) head_dim], COS, SIN [context, head_dim / 2], KC, VC [kv_heads, context,
    head_dim], Q [m, heads head_dim], pos): rotate adjacent pairs of q and k by position pos + row (llama.cpp's
    layout), write q to Q and k, v into the caches at pos + row."""
    half, rotated = head_dim // 2, heads + kv_heads
    width = (heads + 2 * kv_heads) * head_dim

    @T.prim_func(private=True)
    def func(QKV: T.Buffer((m, width), "float32"), COS: T.Buffer((context, half), "float32"),
             SIN: T.Buffer((context, half), "float32"), KC: T.Buffer((kv_heads, context, head_dim), "float32"),
             VC: T.Buffer((kv_heads, context, head_dim), "float32"), Q: T.Buffer((m, heads * head_dim), "float32"),
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
                        KC[h - heads, pos + r, 2 * i] = x0 * c - x1 * s
                        KC[h - heads, pos + r, 2 * i + 1] = x0 * s + x1 * c
            for kv in T.serial(kv_heads):
                for d in T.serial(head_dim // LANES):
                    VC[kv, pos + r, T.ramp(d * LANES, 1, LANES)] = QKV[r, T.ramp(
                        (rotated + kv) * head_dim + d * LANES, 1, LANES)]

    return func


@functools.cache
def attention_func(m: int, heads: int, kv_heads: int, head_dim: int, context: int,
                   num_threads: int) -> tirx.PrimFunc:
    """(Q [m, heads head_dim], KC, VC [kv_heads, context, head_dim], S [m heads, context] (scratch), OUT [m, heads
    head_dim], pos): row r of query head h attends to cache positions 0 .. pos + r of KV head h // (heads /
    kv_heads), softmax(q k^T / sqrt(head_dim)) v. Parallel over (row, head) pairs; three passes over the keys
    (scores and their max, exponentials and their sum, the weighted values)."""
    vecs, group = head_dim // LANES, heads // kv_heads
    scale = float(head_dim) ** -0.5

    @T.prim_func(private=True)
    def func(Q: T.Buffer((m, heads * head_dim), "float32"), KC: T.Buffer((kv_heads, context, head_dim), "float32"),
             VC: T.Buffer((kv_heads, context, head_dim), "float32"), S: T.Buffer((m * heads, context), "float32"),
             OUT: T.Buffer((m, heads * head_dim), "float32"), pos: T.int32):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(m * heads):
            acc = T.alloc_buffer((LANES,), "float32", scope="local")
            out = T.alloc_buffer((head_dim,), "float32", scope="local")
            mx = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "float32", scope="local")
            r = T.meta_var(t // heads)
            h = T.meta_var(t % heads)
            kv = T.meta_var(t % heads // group)
            mx[0] = T.min_value("float32")
            for j in T.serial(pos + r + 1):
                acc[T.ramp(0, 1, LANES)] = Q[r, T.ramp(h * head_dim, 1, LANES)] * KC[kv, j, T.ramp(0, 1, LANES)]
                for v in T.unroll(1, vecs):
                    acc[T.ramp(0, 1, LANES)] = acc[T.ramp(0, 1, LANES)] + (
                        Q[r, T.ramp(h * head_dim + v * LANES, 1, LANES)] * KC[kv, j, T.ramp(v * LANES, 1, LANES)])
                S[t, j] = _hsum(acc) * T.float32(scale)
                mx[0] = T.max(mx[0], S[t, j])
            total[0] = T.float32(0)
            for j in T.serial(pos + r + 1):
                S[t, j] = T.exp(S[t, j] - mx[0])
                total[0] = total[0] + S[t, j]
            for v in T.unroll(vecs):
                out[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for j in T.serial(pos + r + 1):
                for v in T.unroll(vecs):
                    out[T.ramp(v * LANES, 1, LANES)] = out[T.ramp(v * LANES, 1, LANES)] + (
                        T.broadcast(S[t, j], LANES) * VC[kv, j, T.ramp(v * LANES, 1, LANES)])
            for v in T.unroll(vecs):
                OUT[r, T.ramp(h * head_dim + v * LANES, 1, LANES)] = (
                    out[T.ramp(v * LANES, 1, LANES)] * T.broadcast(T.float32(1) / total[0], LANES))

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
