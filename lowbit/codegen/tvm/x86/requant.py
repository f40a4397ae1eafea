"""The requantize epilogue's constants and the conditions under which its fast forms are exact (no TVM here).

The integer rule (`lowbit.ir.dyadic`) is y = clip((int64(acc) * m + 2^(s-1)) >> s, qmin, qmax). The
kernels compute it (see `epilogue`) either exactly in int64 lanes, on accumulators first clamped to the window
`_acc_window` outside of which y cannot change, or in float64 where `f64_requant_is_exact` proves that equal.
"""

from __future__ import annotations

import numpy as np

from ....ir.dtypes import qrange
from ..kernel_api import Residual
from .packing import VEC


def _acc_window(mc: int, sc: int, qmin: int, qmax: int) -> tuple[int, int]:
    """[lo, hi]: the int32 accumulators outside of which the clipped requantized value cannot change."""
    imin, imax = -(1 << 31), (1 << 31) - 1
    if mc == 0:
        return 0, 0
    r = (1 << sc) >> 1
    # largest acc with y(acc) <= qmin; smallest acc with y(acc) >= qmax
    lo = -((r - (qmin + 1) * (1 << sc)) // mc) - 1
    hi = -((r - qmax * (1 << sc)) // mc)
    lo = min(max(lo, imin), imax)
    hi = min(max(hi, imin), imax)
    return min(lo, hi), hi


def f64_requant_is_exact(mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int,
                         acc_bound: np.ndarray | None = None) -> bool:
    """Whether y = clip(floor(acc * (m / 2^s) + 1/2), qmin, qmax), computed in float64 and converted to int32
    before the clip, equals the integer rule for every int32 acc (every |acc| <= acc_bound[c], where given:
    see `acc_bound`). It does when
    - |acc| * m + 2^(s-1) < 2^53 for every acc in the window: there every step is exact (products of integers
      below 2^53, scaling by powers of two, adding 1/2) and floor is exact;
    - outside the window the float64 value is monotone in acc, so it clips as the integer rule does;
    - m / 2^s < 1/2: no acc converts outside the int32 range."""
    if mantissa is None:
        return False
    mantissa, shift = np.asarray(mantissa).reshape(-1).tolist(), np.asarray(shift).reshape(-1).tolist()
    bounds = [None] * len(mantissa) if acc_bound is None else np.asarray(acc_bound).reshape(-1).tolist()
    for mc, sc, bound in zip(mantissa, shift, bounds, strict=True):
        lo, hi = _acc_window(int(mc), int(sc), int(qmin), int(qmax))
        reach = max(abs(lo), abs(hi)) if bound is None else min(max(abs(lo), abs(hi)), int(bound))
        if reach * int(mc) + ((1 << int(sc)) >> 1) >= 1 << 53 or 2 * int(mc) >= 1 << int(sc):
            return False
    return True


def acc_bound(weight: np.ndarray, bias: np.ndarray, x_dtype: str) -> np.ndarray:
    """Per output channel, the largest |acc| = |bias + sum_k x w| any input of `x_dtype` can give (int64)."""
    w = np.abs(np.asarray(weight).astype(np.int64)).reshape(np.asarray(weight).shape[0], -1).sum(axis=1)
    x_max = max(abs(v) for v in qrange(x_dtype))
    return np.abs(np.asarray(bias, np.int64).reshape(-1)[: w.shape[0]]) + x_max * w


def residual_is_exact(residual: Residual, y_range: tuple[int, int]) -> bool:
    """Whether the fused add (`epilogue.residual_vec`) is exact in float64 for conv outputs y in `y_range` and
    every skip value of its dtype: each sum y*m_y + skip*m_skip + 2^(s-1) is an integer below 2^53 (so every
    fma step is exact and floor is exact), and the result converts to int32."""
    m_y, m_skip = multipliers(residual.y_multiplier), multipliers(residual.skip_multiplier)
    if min(*m_y, *m_skip) < 0 or not 0 <= residual.shift <= 62:
        return False
    skip_lo, skip_hi = qrange(residual.skip_dtype)
    bound = (max(abs(v) for v in y_range) * max(m_y)
             + max(-skip_lo, skip_hi) * max(m_skip) + ((1 << residual.shift) >> 1))
    return bound < 1 << 53 and bound >> residual.shift < 1 << 30


def multipliers(m: int | tuple[int, ...]) -> tuple[int, ...]:
    """A `Residual` multiplier as a tuple: one per channel, or the one for all."""
    return tuple(int(v) for v in m) if isinstance(m, tuple) else (int(m),)


def residual_scales(residual: Residual, n: int, n_pad: int) -> list[np.ndarray]:
    """The fused add's float64 constants m_y / 2^s and m_skip / 2^s for `n` channels, padded to `n_pad` (exact:
    integers below 2^53 times a power of two)."""
    out = []
    for m in (residual.y_multiplier, residual.skip_multiplier):
        values = np.zeros(n_pad, np.float64)
        values[:n] = np.asarray(multipliers(m), np.float64) * 2.0 ** -residual.shift
        out.append(values)
    return out


def fold_input_offset(bias: np.ndarray, weight: np.ndarray, x_dtype: str, n: int) -> np.ndarray:
    """The bias of the first `n` channels, for kernels fed x' = x + 128 where x is int8 (VNNI and int4 kernels
    multiply unsigned bytes): sum_k x' w = sum_k x w + 128 * sum_k w, so -128 * sum_k w goes into the bias
    (int64; uint8 inputs are fed as they are)."""
    folded = np.asarray(bias, dtype=np.int64).reshape(-1)[:n]
    if x_dtype == "int8":
        folded = folded - 128 * np.asarray(weight).astype(np.int64).reshape(n, -1).sum(axis=1)
    return folded


def requant_arrays(bias: np.ndarray, mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int,
                   n: int, n_pad: int) -> dict[str, np.ndarray]:
    """Per-channel constant arrays (padded to n_pad channels).

    Returns dict with bias(int32), alo/ahi (int32 acc clamp window), mant (int32,
    n_pad+8 long), c1 / sh (int64, even-odd interleaved per 8-channel block),
    c2 (int32 low word of 2^(62-s)), md (float64 m / 2^s, for the float64 path).
    """
    b = np.zeros(n_pad, np.int32)
    b[:n] = np.asarray(bias, dtype=np.int64).reshape(-1)[:n]
    out = {"bias": b, "md": np.zeros(n_pad, np.float64)}
    if mantissa is None:
        return out
    m = [int(v) for v in np.asarray(mantissa, dtype=np.int64).reshape(-1)[:n]]
    sh = [int(v) for v in np.asarray(shift, dtype=np.int64).reshape(-1)[:n]]
    qmin, qmax = int(qmin), int(qmax)
    if qmin > qmax:
        raise ValueError("qmin > qmax")
    alo = np.zeros(n_pad, np.int32)
    ahi = np.zeros(n_pad, np.int32)
    mant = np.zeros(n_pad + VEC, np.int32)
    c1 = np.zeros(n_pad, np.int64)
    shv = np.zeros(n_pad, np.int64)
    c2 = np.zeros(n_pad, np.int32)
    for c in range(n):
        mc, sc = m[c], sh[c]
        if not (0 <= mc < (1 << 30)):
            raise ValueError(f"mantissa[{c}]={mc} outside [0, 2^30)")
        if not (0 <= sc <= 62):
            raise ValueError(f"shift[{c}]={sc} outside [0, 62]")
        r = (1 << sc) >> 1
        alo[c], ahi[c] = _acc_window(mc, sc, qmin, qmax)
        mant[c] = mc
        out["md"][c] = np.ldexp(float(mc), -sc)
        c1[c] = r + (1 << 62)
        shv[c] = sc
        c2[c] = np.array([(1 << (62 - sc)) & 0xFFFFFFFF], np.uint32).view(np.int32)[0]
    for c in range(n, n_pad):
        c1[c] = 1 << 62
        c2[c] = 0  # 2^62 has zero low word
    # even/odd interleave within each block of 8 channels: [0,2,4,6,1,3,5,7]
    perm = np.concatenate([np.arange(0, VEC, 2), np.arange(1, VEC, 2)])
    idx = (np.arange(n_pad) // VEC) * VEC + np.tile(perm, n_pad // VEC)
    out.update(alo=alo, ahi=ahi, mant=mant, c1=c1[idx].copy(), sh=shv[idx].copy(), c2=c2)
    return out


def epilogue_constants(arrays: dict[str, np.ndarray], requant: bool) -> list[np.ndarray]:
    """The kernel parameters after the weights, in order: BIAS, ALO, AHI, MANT, C1, SH, C2, MD (zeros where
    the kernel does not requantize: its signature is the same either way)."""
    if requant:
        return [arrays[k] for k in ("bias", "alo", "ahi", "mant", "c1", "sh", "c2", "md")]
    n = arrays["bias"].shape[0]
    z32 = np.zeros(n, np.int32)
    return [arrays["bias"], z32, z32, np.zeros(n + VEC, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64),
            z32, arrays["md"]]
