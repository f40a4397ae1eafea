"""Integer-only requantization by dyadic numbers (HAWQ-V3; Jacob et al. 2018).

A real multiplier M (for example s_in * s_w / s_out) is written as b / 2^c with
an integer mantissa b in [2^29, 2^30) and a shift c. Requantizing an integer
accumulator `acc` is then

    q = clip(((acc * b) + r) >> c  + zero_point, qmin, qmax),   r = (1 << c) >> 1

computed in int64, with `>>` an arithmetic (flooring) shift. So the result is
acc * M rounded to nearest, ties rounded up (towards +inf), then saturated.
|acc| < 2^31 and b < 2^30 keep |acc * b| < 2^61: no int64 overflow.

An accumulator that can reach 2^31 or beyond (a layer reading int16 activations:
see `lowbit.ir.ops._layer.int16_acc_bound`) gets a shorter mantissa,
b < 2^mantissa_bits_for(A) <= 2^61 / A for its bound A, so |acc * b| < 2^61 holds
for every |acc| <= A: the same invariant, and so the same exactness, everywhere.

Every backend (reference executor, integer ONNX, TVM) implements exactly these
rules; this module is the one place they are written down.
"""

from __future__ import annotations

import numpy as np

MANTISSA_BITS = 30
MAX_SHIFT = 62


def mantissa_bits_for(acc_bound: int) -> int:
    """The most mantissa bits (at most MANTISSA_BITS) that keep |acc * b| < 2^61 for every |acc| <= acc_bound:
    b < 2^n and acc_bound < 2^(61 - n) (the bit length of acc_bound is at most 61 - n)."""
    n = min(MANTISSA_BITS, 61 - int(acc_bound).bit_length())
    if n < 8:
        raise ValueError(f"accumulator bound {acc_bound} leaves under 8 mantissa bits for requantization")
    return n


def dyadic(multiplier: np.ndarray | float, mantissa_bits: int = MANTISSA_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Mantissas b < 2^mantissa_bits (int64) and shifts c (int64) with b / 2^c closest to `multiplier`."""
    m = np.atleast_1d(np.asarray(multiplier, dtype=np.float64))
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"requantization multipliers must be finite and non-negative, got {m}")
    b = np.zeros(m.shape, dtype=np.int64)
    c = np.full(m.shape, MAX_SHIFT, dtype=np.int64)
    nz = m > 0
    if np.any(nz):
        exponent = np.floor(np.log2(m[nz])).astype(np.int64)
        shift = (mantissa_bits - 1) - exponent
        if np.any(shift < 0):
            raise ValueError(f"requantization multiplier too large for a dyadic number: {m.max()}")
        shift = np.minimum(shift, MAX_SHIFT)
        mant = np.round(m[nz] * np.exp2(shift.astype(np.float64))).astype(np.int64)
        # Rounding can carry into one more bit: renormalize.
        carry = mant >= (1 << mantissa_bits)
        mant[carry] >>= 1
        shift[carry] -= 1
        b[nz], c[nz] = mant, shift
    return b, c


def rounding_term(shift: np.ndarray) -> np.ndarray:
    """r = 2^(c-1), or 0 when c == 0: what makes the flooring shift round to nearest."""
    shift = np.asarray(shift, dtype=np.int64)
    return np.left_shift(np.int64(1), shift) >> 1


def requantize(acc: np.ndarray, mantissa: np.ndarray, shift: np.ndarray, qmin: int, qmax: int,
               zero_point: int = 0) -> np.ndarray:
    """The reference requantizer; `mantissa`/`shift` broadcast against `acc`. Returns int64."""
    acc = np.asarray(acc, dtype=np.int64)
    scaled = (acc * mantissa + rounding_term(shift)) >> shift
    return np.clip(scaled + zero_point, qmin, qmax)
