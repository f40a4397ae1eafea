"""x86 instruction-set features and the LLVM intrinsics the kernels call, as TIR expression helpers.

Which features a kernel may use always comes from the caller's target (`Isa`); nothing here names a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm.script import tirx as T

from .packing import VEC

Expr = Any  # a TIR expression (PrimExpr) as TVMScript hands it to these helpers

PMADDWD = "llvm.x86.avx2.pmadd.wd"  # int16 x int16 pair sums into int32 (exact)
PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"  # u8 x s8 pair sums into int16 (saturates: used only where it cannot)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"  # AVX512-VNNI + VL: u8 x s8 quad sums into int32 (LLVM also emits it
# for AVX-VNNI)
VPDPWSSD = "llvm.x86.avx512.vpdpwssd.256"  # AVX512-VNNI + VL: acc + pair sums of int16 products
CVTPD2DQ_512 = "llvm.x86.avx512.mask.cvtpd2dq.512"  # float64x8 -> int32x8 with an explicit rounding mode
ROUND_DOWN = 9  # _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC


@dataclass(frozen=True)
class Isa:
    """The x86 instruction-set features a kernel may use (from the caller's target; never guessed here).

    vnni: AVX-512 VNNI with VL, or AVX-VNNI (vpdpbusd, vpdpwssd on ymm registers).
    avx512: AVX-512F, for its 32 vector registers and float64 -> int32 conversions with a rounding mode."""

    vnni: bool = False
    avx512: bool = False

    @property
    def registers(self) -> int:
        """Vector registers the register tile may fill."""
        return 32 if self.avx512 else 16


def sx32(v: Expr) -> Expr:
    """Sign-extend the low dword of each int64 lane (lets LLVM pick vpmuldq)."""
    c = T.broadcast(T.int64(32), 4)
    return T.shift_right(T.shift_left(v, c), c)


def fma(a: Expr, b: Expr, c: Expr) -> Expr:
    """a * b + c in float64x8, rounded once."""
    return T.call_llvm_pure_intrin("float64x8", "llvm.fma.v8f64", a, b, c)


def floor_clip(d: Expr, qmin: int, qmax: int, avx512: bool) -> Expr:
    """clip(floor(d), qmin, qmax) of float64x8 `d` as int32x8 (`avx512`: the conversion rounds down itself)."""
    if avx512:
        y = T.call_llvm_pure_intrin("int32x8", CVTPD2DQ_512, d, T.broadcast(T.int32(0), VEC), T.int8(-1),
                                    T.int32(ROUND_DOWN))
    else:
        y = T.Cast("int32x8", T.floor(d))
    return T.max(T.min(y, T.broadcast(T.int32(qmax), VEC)), T.broadcast(T.int32(qmin), VEC))


def nib16(word: Expr, j: int) -> Expr:
    """Signed nibble j (bits 4j..4j+3) of every int16 lane of ``word`` as int16x16 (shift up, arithmetic down)."""
    v = T.reinterpret("int16x16", word)
    return T.shift_right(T.shift_left(v, T.broadcast(T.Cast("int16", 12 - 4 * j), 16)), T.broadcast(T.int16(12), 16))


def nib8(word: Expr, hi: int) -> Expr:
    """Signed nibbles (low: hi=0, high: hi=1) of every byte of ``word`` as int8x32 (stored as w+8)."""
    v = T.reinterpret("int32x8", word)
    if hi:
        v = T.shift_right(v, T.broadcast(T.int32(4), VEC))
    return T.reinterpret("int8x32", T.bitwise_and(v, T.broadcast(T.int32(0x0F0F0F0F), VEC))) - T.broadcast(
        T.int8(8), 32
    )


def xbyte(x: Expr, x_dtype: str, lanes: int) -> Expr:
    """Activation as the unsigned vpmaddubsw operand: uint8 as is, int8 biased by +128."""
    t = "uint8" if lanes == 1 else f"uint8x{lanes}"
    if x_dtype == "uint8":
        return x
    return T.bitwise_xor(T.reinterpret(t, x), T.broadcast(T.uint8(0x80), lanes) if lanes > 1 else T.uint8(0x80))


def word4(byte_at: Callable[..., Expr], k0: Expr, K: int, *args: object) -> Expr:
    """int32 word of the 4 bytes byte_at(*args, k) for k = k0..k0+3 (uint8), zero for k >= K."""
    w = T.int32(0)
    for b in range(4):
        byte = T.if_then_else(k0 + b < K, T.Cast("int32", byte_at(*args, k0 + b)), T.int32(0))
        w = T.bitwise_or(w, T.shift_left(byte, 8 * b))
    return w
