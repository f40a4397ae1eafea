"""The requantize epilogue as TIR on 8 int32 accumulator lanes (the constants and exactness proofs: `requant`).

Requantization is fused on the accumulator tile and stays exact:
1. acc is clamped (int32) to a per-channel window [A_lo, A_hi] outside of which the clipped result cannot
   change (y is monotone in acc, m >= 0); inside the window |y| < 2^31.
2. p = acc*m via vpmuldq (even / odd lanes), |p| < 2^61.
3. the arithmetic shift is a logical shift of a biased value: ``t = (p + r + 2^62) >>> s = y + 2^(62-s)``
   (vpsrlvq), and the low 32 bits of t minus the low 32 bits of 2^(62-s) give y exactly (|y| < 2^31).
4. int32 clip to [qmin, qmax] and narrow.
Where ``f64_requant_is_exact`` (every |acc| in the window that the weights, bias and input dtype can reach,
times m, plus r, is below 2^53, and m / 2^s < 1/2, as for all but the odd layer), it is instead
``floor(fma(float64(acc), m / 2^s, 0.5))`` converted to int32 (one round-down conversion with AVX-512), then
clipped: exact inside the window, monotone outside it, and never outside the int32 range.

A residual add can be fused into a GEMM's epilogue: ``floor(fma(y, m_y / 2^s, fma(skip, m_skip / 2^s,
0.5)))`` in float64 on the requantized output y and the skip tensor's values (multipliers per channel), then
clipped; exact where ``residual_is_exact`` (every integer sum below 2^53). So can a table lookup on y (`lut_vec`:
an int8 GELU after an encoder's intermediate linear), exact by construction: the table reads the same integer.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..kernel_api import Lut, Residual
from .isa import Expr, floor_clip, fma, sx32
from .packing import VEC


def requantize_vec(accv: Expr, R: tuple, ch: Expr, qmin: int, qmax: int, f64: bool = False,
                   avx512: bool = False) -> Expr:
    """Exact requantization of 8 int32 lanes (channels ch..ch+7); returns int32x8.

    `f64` (only where `f64_requant_is_exact`): floor(acc * m/2^s + 1/2) in float64, a few instructions
    instead of the int64 sequence (`avx512`: the conversion to int32 rounds down itself)."""
    ALO, AHI, MANT, C1, SH, C2, MD = R[:7]
    if f64:
        return floor_clip(fma(T.Cast("float64x8", accv), MD[T.ramp(ch, 1, VEC)], T.broadcast(T.float64(0.5), VEC)),
                           qmin, qmax, avx512)
    a = T.max(T.min(accv, AHI[T.ramp(ch, 1, VEC)]), ALO[T.ramp(ch, 1, VEC)])
    a64 = T.reinterpret("int64x4", a)
    m64 = T.reinterpret("int64x4", MANT[T.ramp(ch, 1, VEC)])
    c32 = T.broadcast(T.int64(32), 4)
    pe = sx32(a64) * sx32(m64)
    po = T.shift_right(a64, c32) * T.shift_right(m64, c32)
    te = T.shift_right(T.Cast("uint64x4", pe + C1[T.ramp(ch, 1, 4)]), T.Cast("uint64x4", SH[T.ramp(ch, 1, 4)]))
    to = T.shift_right(T.Cast("uint64x4", po + C1[T.ramp(ch + 4, 1, 4)]), T.Cast("uint64x4", SH[T.ramp(ch + 4, 1, 4)]))
    comb = T.bitwise_or(
        T.bitwise_and(te, T.broadcast(T.uint64(0xFFFFFFFF), 4)), T.shift_left(to, T.broadcast(T.uint64(32), 4))
    )
    y = T.reinterpret("int32x8", comb) - C2[T.ramp(ch, 1, VEC)]
    return T.max(T.min(y, T.broadcast(T.int32(qmax), VEC)), T.broadcast(T.int32(qmin), VEC))



def residual_vec(y: Expr, skip: Expr, y_scale: Expr, skip_scale: Expr, residual: Residual, avx512: bool) -> Expr:
    """The add fused into a GEMM's epilogue, on int32x8 outputs `y` and the 8 skip values `skip`, with
    float64x8 `y_scale` = m_y / 2^s and `skip_scale` = m_skip / 2^s (per channel; powers of two times integers,
    exact): clip(floor((y * m_y + skip * m_skip) / 2^s + 1/2), qmin, qmax), exact where `residual_is_exact`."""
    inner = fma(T.Cast("float64x8", skip), skip_scale, T.broadcast(T.float64(0.5), VEC))
    return floor_clip(fma(T.Cast("float64x8", y), y_scale, inner), residual.qmin, residual.qmax, avx512)


def lut_vec(y: Expr, table: Expr, col: Expr, lut: Lut) -> Expr:
    """The table lookup fused into a GEMM's epilogue: table[y + offset + (col..col+7) * row] for the int32x8
    requantized outputs `y` of columns col.. (a gather, one byte per lane)."""
    index = y + T.broadcast(T.int32(lut.offset), VEC)
    if lut.row:
        index = index + T.ramp(col, 1, VEC) * T.broadcast(T.int32(lut.row), VEC)
    return table[index]
