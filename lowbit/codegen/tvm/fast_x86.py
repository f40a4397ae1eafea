"""Fast, bit-exact int8 / int4-weight CPU kernels (TVM TIR) for x86: AVX2, plus VNNI where the CPU has it.

Public entry points
-------------------
``conv2d_nhwc(...)`` and ``dense(...)`` return ``(prim_func, constants)``.  The
PrimFunc parameters are ``(x, *constants, out)``; ``constants`` are numpy arrays
(prepacked weights, bias, requantization parameters) the caller passes as-is.

Semantics (the contract)::

    acc[n,oh,ow,oc] = bias[oc] + sum_{kh,kw,ic in group}
                      int32(x[n, oh*sh-pt+kh*dh, ow*sw-pl+kw*dw, g*ICg+ic]) * int32(w[oc,ic,kh,kw])
    y = clip((int64(acc) * mantissa[oc] + ((1 << shift[oc]) >> 1)) >> shift[oc], qmin, qmax)

with out-of-range input positions reading 0.  If ``mantissa`` is None the
output is ``acc`` (int32).

Implementation
--------------
* GEMM path (pointwise, general/grouped conv, dense): activations are packed
  (im2col when needed) into int32 words holding two int16 values
  ``(x[k] & 0xffff) | (x[k+1] << 16)``; weights are prepacked as int16 pairs in
  ``[G, OC/8, K/2, 8]`` int32 words.  The register-blocked micro-kernel
  broadcasts one activation word and issues ``vpmaddwd`` (exact: int16*int16
  products summed pairwise into int32) against 8 output channels.
  With VNNI (``vnni=True``) activations are packed as bytes x' (uint8: x,
  int8: x+128 with ``-128*sum_k w`` folded into the bias), 4 per int32 word,
  weights as ``[G, OC/8, KB/4, 8]`` int32 words of 4 int8 values (K padded to
  KB, a multiple of 4), and the
  micro-kernel issues ``vpdpbusd`` (u8*s8 quads summed exactly into int32).
  Where a kh row's (kw, ic) run is contiguous or channels come in fours, im2col
  copies whole 4-byte words (each kh row of K zero-padded to a word).  With
  AVX-512 (32 vector registers) the register tiles are larger.
* Depthwise path, NHWC; channels that fill whole vectors are read in place
  (border pixels bounds-checked), others through a zero-padded copy.
  - int8 weights with VNNI, >= 32 channels (a multiple of 8): 32 channels at a
    time; the input bytes of four neighbouring columns are interleaved into
    quads and ``vpdpbusd`` sums four taps per channel (taps past the kernel
    width have zero weights).
  - other int8 weights: 16 channels at a time; taps go in pairs, their input
    bytes interleaved and widened to int16, and ``vpmaddwd`` (``vpdpwssd`` with
    VNNI) sums both taps' products per channel exactly.
  - int4 weights: x*w is computed exactly in int16 (|x*w| <= 255*8 < 2^15) and
    widened into int32 accumulators.
* int4 weights (``weight_bits=4``, values in [-8, 7]) are stored packed, two per
  byte, and unpacked in the kernel (bit-exact):
  - GEMM: weights ``[G, OC/8, KB/8, 8]`` int32 (K flattened as (kh, kw, ic),
    zero-padded to KB, a multiple of 8): byte b of the word for step q and
    channel lane c holds ``w+8`` of K index 8q+b in its low nibble and 8q+4+b
    in its high nibble.  Activations are packed as bytes ``x'`` (uint8: x
    itself; int8: x+128, the ``-128*sum_k w`` correction is folded into the
    bias), 4 per int32 word.  Pointwise convs whose channels fill whole words
    read them in place (int8 ones with >= 64 channels flip each word's sign
    bits as they read it; fewer channels are packed first).
    Per 8 K values: unpack ``(v & 0x0F0F0F0F) - 8`` and ``((v >> 4) & ...) - 8``
    (int8 bytes), ``vpmaddubsw`` x' (u8) * w (s8) for both halves (pair sums in
    [-4080, 3570], no saturation), ``vpaddw`` (|.| <= 8160), then ``vpmaddwd``
    with ones into the int32 accumulators.
  - Depthwise: int16 words ``[ceil(CB*KH*KW/4), 16]``; nibble t = cb*KH*KW +
    kh*KW + kw of lane i (channel 16*cb+i) is at bits 4*(t%4) of word t//4,
    stored two's complement, unpacked with a left and an arithmetic right shift.
* Requantization is fused on the accumulator tile and stays exact:
  1. acc is clamped (int32) to a per-channel window [A_lo, A_hi] outside of
     which the clipped result cannot change (y is monotone in acc, m >= 0);
     inside the window |y| < 2^31.
  2. p = acc*m via vpmuldq (even / odd lanes), |p| < 2^61.
  3. the arithmetic shift is a logical shift of a biased value:
     ``t = (p + r + 2^62) >>> s = y + 2^(62-s)`` (vpsrlvq), and the low 32 bits
     of t minus the low 32 bits of 2^(62-s) give y exactly (|y| < 2^31).
  4. int32 clip to [qmin, qmax] and narrow.
  Where ``f64_requant_is_exact`` (every |acc| in the window that the weights,
  bias and input dtype can reach, times m, plus r, is below 2^53, and
  m / 2^s < 1/2, as for all but the odd layer), it is instead
  ``floor(fma(float64(acc), m / 2^s, 0.5))`` converted to int32 (one
  round-down conversion with AVX-512), then clipped: exact inside the window,
  monotone outside it, and never outside the int32 range.
* A residual add (``residual``) can be fused into a GEMM conv's epilogue:
  ``floor(fma(y, m_y / 2^s, fma(skip, m_skip / 2^s, 0.5)))`` in float64 on the
  requantized conv output y and the skip tensor's values, then clipped; exact
  where ``residual_is_exact`` (every integer sum below 2^53).
* Parallel loops are chunked per thread (``NUM_THREADS`` tasks) so the
  per-task accumulator scratch is allocated once per task: this TVM lowers all
  ``local`` allocations to TVMBackendAllocWorkspace calls.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from ...ir.dtypes import qrange

__all__ = ["conv2d_nhwc", "dense", "target", "NUM_THREADS"]

VEC = 8  # int32 lanes in a ymm register
NUM_THREADS = 2  # default parallel tasks per loop nest; callers pass the target's core count
_PMADDWD = "llvm.x86.avx2.pmadd.wd"
_PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"  # AVX512-VNNI + VL (LLVM also emits it for AVX-VNNI)
_CVTPD2DQ_512 = "llvm.x86.avx512.mask.cvtpd2dq.512"  # float64x8 -> int32x8 with an explicit rounding mode
_ROUND_DOWN = 9  # _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC


def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------
# requantization
# ---------------------------------------------------------------------------


def _acc_window(mc, sc, qmin, qmax):
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


def f64_requant_is_exact(mantissa, shift, qmin, qmax, acc_bound=None):
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


def acc_bound(weight, bias, x_dtype):
    """Per output channel, the largest |acc| = |bias + sum_k x w| any input of `x_dtype` can give (int64)."""
    w = np.abs(np.asarray(weight).astype(np.int64)).reshape(np.asarray(weight).shape[0], -1).sum(axis=1)
    x_max = max(abs(v) for v in qrange(x_dtype))
    return np.abs(np.asarray(bias, np.int64).reshape(-1)[: w.shape[0]]) + x_max * w


def _requant_arrays(bias, mantissa, shift, qmin, qmax, n, n_pad):
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


def _sx32(v):
    """Sign-extend the low dword of each int64 lane (lets LLVM pick vpmuldq)."""
    c = T.broadcast(T.int64(32), 4)
    return T.shift_right(T.shift_left(v, c), c)


def _rq_vec(accv, R, ch, qmin, qmax, f64=False, avx512=False):
    """Exact requantization of 8 int32 lanes (channels ch..ch+7); returns int32x8.

    `f64` (only where `f64_requant_is_exact`): floor(acc * m/2^s + 1/2) in float64, a few instructions
    instead of the int64 sequence (`avx512`: the conversion to int32 rounds down itself)."""
    ALO, AHI, MANT, C1, SH, C2, MD = R[:7]
    if f64:
        return _floor_clip(_fma(T.Cast("float64x8", accv), MD[T.ramp(ch, 1, VEC)], T.broadcast(T.float64(0.5), VEC)),
                           qmin, qmax, avx512)
    a = T.max(T.min(accv, AHI[T.ramp(ch, 1, VEC)]), ALO[T.ramp(ch, 1, VEC)])
    a64 = T.reinterpret("int64x4", a)
    m64 = T.reinterpret("int64x4", MANT[T.ramp(ch, 1, VEC)])
    c32 = T.broadcast(T.int64(32), 4)
    pe = _sx32(a64) * _sx32(m64)
    po = T.shift_right(a64, c32) * T.shift_right(m64, c32)
    te = T.shift_right(T.Cast("uint64x4", pe + C1[T.ramp(ch, 1, 4)]), T.Cast("uint64x4", SH[T.ramp(ch, 1, 4)]))
    to = T.shift_right(T.Cast("uint64x4", po + C1[T.ramp(ch + 4, 1, 4)]), T.Cast("uint64x4", SH[T.ramp(ch + 4, 1, 4)]))
    comb = T.bitwise_or(
        T.bitwise_and(te, T.broadcast(T.uint64(0xFFFFFFFF), 4)), T.shift_left(to, T.broadcast(T.uint64(32), 4))
    )
    y = T.reinterpret("int32x8", comb) - C2[T.ramp(ch, 1, VEC)]
    return T.max(T.min(y, T.broadcast(T.int32(qmax), VEC)), T.broadcast(T.int32(qmin), VEC))


def _fma(a, b, c):
    return T.call_llvm_pure_intrin("float64x8", "llvm.fma.v8f64", a, b, c)


def _floor_clip(d, qmin, qmax, avx512):
    """clip(floor(d), qmin, qmax) of float64x8 `d` as int32x8 (`avx512`: the conversion rounds down itself)."""
    if avx512:
        y = T.call_llvm_pure_intrin("int32x8", _CVTPD2DQ_512, d, T.broadcast(T.int32(0), VEC), T.int8(-1),
                                    T.int32(_ROUND_DOWN))
    else:
        y = T.Cast("int32x8", T.floor(d))
    return T.max(T.min(y, T.broadcast(T.int32(qmax), VEC)), T.broadcast(T.int32(qmin), VEC))


def residual_is_exact(residual, y_range):
    """Whether the fused add (`_residual_vec`) is exact in float64 for conv outputs y in `y_range` and every skip
    value of its dtype: each sum y*m_y + skip*m_skip + 2^(s-1) is an integer below 2^53 (so every fma step is
    exact and floor is exact), and the result converts to int32."""
    if min(residual.y_multiplier, residual.skip_multiplier) < 0 or not 0 <= residual.shift <= 62:
        return False
    skip_lo, skip_hi = qrange(residual.skip_dtype)
    bound = (max(abs(v) for v in y_range) * residual.y_multiplier
             + max(-skip_lo, skip_hi) * residual.skip_multiplier + ((1 << residual.shift) >> 1))
    return bound < 1 << 53 and bound >> residual.shift < 1 << 30


def _residual_vec(y, skip, residual, avx512):
    """The add fused into a conv's epilogue, on int32x8 conv outputs `y` and the 8 skip values `skip`:
    clip(floor((y * m_y + skip * m_skip) / 2^s + 1/2), qmin, qmax), exact where `residual_is_exact`."""
    scale = 2.0 ** -residual.shift
    inner = _fma(T.Cast("float64x8", skip), T.broadcast(T.float64(residual.skip_multiplier * scale), VEC),
                 T.broadcast(T.float64(0.5), VEC))
    d = _fma(T.Cast("float64x8", y), T.broadcast(T.float64(residual.y_multiplier * scale), VEC), inner)
    return _floor_clip(d, residual.qmin, residual.qmax, avx512)


def _nib16(word, j):
    """Signed nibble j (bits 4j..4j+3) of every int16 lane of ``word`` as int16x16 (shift up, arithmetic down)."""
    v = T.reinterpret("int16x16", word)
    return T.shift_right(T.shift_left(v, T.broadcast(T.Cast("int16", 12 - 4 * j), 16)), T.broadcast(T.int16(12), 16))


def _nib8(word, hi):
    """Signed nibbles (low: hi=0, high: hi=1) of every byte of ``word`` as int8x32 (stored as w+8)."""
    v = T.reinterpret("int32x8", word)
    if hi:
        v = T.shift_right(v, T.broadcast(T.int32(4), VEC))
    return T.reinterpret("int8x32", T.bitwise_and(v, T.broadcast(T.int32(0x0F0F0F0F), VEC))) - T.broadcast(
        T.int8(8), 32
    )


def _xbyte(x, x_dtype, lanes):
    """Activation as the unsigned vpmaddubsw operand: uint8 as is, int8 biased by +128."""
    t = "uint8" if lanes == 1 else f"uint8x{lanes}"
    if x_dtype == "uint8":
        return x
    return T.bitwise_xor(T.reinterpret(t, x), T.broadcast(T.uint8(0x80), lanes) if lanes > 1 else T.uint8(0x80))


def _word4(byte_at, k0, K, *args):
    """int32 word of the 4 bytes byte_at(*args, k) for k = k0..k0+3 (uint8), zero for k >= K."""
    w = T.int32(0)
    for b in range(4):
        byte = T.if_then_else(k0 + b < K, T.Cast("int32", byte_at(*args, k0 + b)), T.int32(0))
        w = T.bitwise_or(w, T.shift_left(byte, 8 * b))
    return w


def _check_int4(weight):
    w = np.asarray(weight)
    if w.size and (int(w.min()) < -8 or int(w.max()) > 7):
        raise ValueError("weight_bits=4 needs weights in [-8, 7]")


def _consts_list(ra, requant):
    if requant:
        return [ra["bias"], ra["alo"], ra["ahi"], ra["mant"], ra["c1"], ra["sh"], ra["c2"], ra["md"]]
    n = ra["bias"].shape[0]
    z32 = np.zeros(n, np.int32)
    return [ra["bias"], z32, z32, np.zeros(n + VEC, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64), z32,
            ra["md"]]


# ---------------------------------------------------------------------------
# GEMM path (pointwise / general / grouped conv, dense)
# ---------------------------------------------------------------------------


def _choose_tile(M, OCB, wbits=8, registers=16):
    """(MR rows, NV int32x8 column vectors) of the register tile; AVX-512 has 32 vector registers, not 16."""
    if registers == 32 and wbits == 8 and M > 2 and OCB > 1:
        if OCB % 4 == 0:
            return 6, 4  # 24 accumulators + 4 weight vectors + a broadcast
        if OCB % 3 == 0:
            return 8, 3
        return 12, 2
    if wbits == 4 and M > 2 and OCB > 1:
        return 4, 2  # 8 accumulators + 4 unpacked weight vectors + broadcasts fit the 16 ymm registers
    if M <= 2:
        return max(M, 1), max(1, min(OCB, 4))
    if OCB == 1:
        return 8, 1
    if OCB % 2 != 0 and OCB % 3 == 0:
        return 4, 3
    return 6, 2


def _gemm_func(
    *,
    N,
    H,
    W,
    C,
    x_dtype,
    G,
    ICg,
    OCg,
    KH,
    KW,
    sh,
    sw,
    pt,
    pl,
    dh,
    dw,
    OH,
    OW,
    requant,
    qmin,
    qmax,
    out_dtype,
    out_shape,
    x_buf_shape,
    wbits=8,
    num_threads=NUM_THREADS,
    vnni=False,
    f64=False,
    avx512=False,
    residual=None,
):
    M = N * OH * OW
    OC = G * OCg
    KWIC = KW * ICg
    KWICp = KWIC + (KWIC & 1)
    KPr = KWICp // 2  # int16 pairs per kh row
    KP = KH * KPr
    is_pointwise = (
        KH == 1 and KW == 1 and sh == 1 and sw == 1 and pt == 0 and pl == 0 and OH == H and OW == W and G == 1
    )
    byte_x = wbits == 4 or vnni  # activations packed as bytes x' (4 per int32 word), not int16 pairs
    # im2col by whole words where a kh row's K values come 4 bytes at a time from the input: its (kw, ic) run
    # is contiguous (one group, no dilation) or channels come in fours. Rows are then zero-padded (zero
    # weights) to whole words; a word may read up to 3 bytes past its row, which the zero weights cancel.
    word_rows = byte_x and not is_pointwise and ((G == 1 and dw == 1) or ICg % 4 == 0)
    KROW = _cdiv(KWIC, 4) * 4 if word_rows else KWIC  # K values per kh row
    ROW_WORDS = KROW // 4
    # im2col_row loads 16 bytes (4 words) at a time where they are contiguous, the rest a word at a time
    ROW_CHUNKS = ROW_WORDS // 4 if (G == 1 and dw == 1) or ICg % 16 == 0 else 0
    ROW_SINGLES = ROW_WORDS - 4 * ROW_CHUNKS
    # K flattened (kh, kw, ic), rows of KROW, padded to KB: whole int32 words of 4 K values (VNNI int8), or
    # whole int4 weight words of 8 K values (KQ2 steps)
    K = KH * KROW
    KB = _cdiv(K, 8) * 8 if wbits == 4 else _cdiv(K, 4) * 4
    KQ2 = KB // 8
    KQ = KB // 4  # VNNI int8: one int32 weight word per 4 K values
    WK = KQ2 if wbits == 4 else KQ if vnni else KP
    XW = KB // 4 if byte_x else KP  # int32 activation words per row
    OCB = _cdiv(OCg, VEC)
    OCBP = OCB * VEC  # padded channels per group
    NP = G * OCBP
    MR, NV = _choose_tile(M, OCB, wbits, 32 if avx512 else 16)
    NCT_FULL = OCB // NV
    NV_TAIL = OCB - NCT_FULL * NV
    NCT = NCT_FULL + (1 if NV_TAIL else 0)
    LAST_LANES = OCg - (OCB - 1) * VEC
    NRB = M // MR
    MR_TAIL = M - NRB * MR
    NT = num_threads
    TOT = G * NRB * NCT
    TOT_T = G * NCT if MR_TAIL else 0  # tiles of the last MR_TAIL rows
    CH = _cdiv(TOT + TOT_T, NT)  # tiles per task
    out_vec = f"{out_dtype}x{VEC}"
    need_pad = not (pt == 0 and pl == 0 and (OH - 1) * sh + (KH - 1) * dh < H and (OW - 1) * sw + (KW - 1) * dw < W)
    HP = (OH - 1) * sh + (KH - 1) * dh + 1
    WP = (OW - 1) * sw + (KW - 1) * dw + 1
    # a zero-padded copy of the input; also where words may read past a row, so reads stay in bounds
    use_xpad = not is_pointwise and (need_pad or (word_rows and KWIC % 4 != 0))
    XPAD_SIZE = N * HP * WP * C + 4 if use_xpad else 1
    LZ = min(pl, WP)  # columns of a padded row: left zeros, copied input, right zeros
    CW = max(0, min(W, WP - pl))
    RZ = WP - LZ - CW
    # tile order: keep the larger operand streaming once
    rows_outer = G * OCBP * KP <= G * M * KP or NRB <= 2
    unroll_im2col = KPr <= 24
    # pointwise convs read the input's words in place (no packing pass); int8 ones flip each word to x + 128,
    # two more instructions per word and row: below 64 channels the packing pass costs less (measured)
    x_direct = byte_x and is_pointwise and C == KB and (x_dtype == "uint8" or C >= 64)
    x_flip = x_direct and x_dtype == "int8"
    # Where each task's tiles cover whole row blocks (rows outer), it packs its own rows first: no separate
    # parallel pass (each costs a launch and a barrier) and the rows are still in cache for the GEMM.
    pack_in_tasks = byte_x and not x_direct and (is_pointwise or word_rows) and rows_outer and G == 1
    if pack_in_tasks:
        RB = _cdiv(NRB + (1 if MR_TAIL else 0), NT)  # row blocks per task, the MR_TAIL rows' block last
        CH = RB * NCT
    XP_SHAPE = (1,) if x_direct else (G, M, XW)
    PK_FULL = (C // 16) if is_pointwise else 0
    PK_REM = KP - PK_FULL * 8

    def tile_coords(t):
        nrb = max(NRB, 1)  # (no full row blocks: never called)
        g = t // (nrb * NCT)
        r = t % (nrb * NCT)
        if rows_outer:
            return g, r // NCT * MR, r % NCT
        return g, r % nrb * MR, r // nrb

    def requantized(accv, R, ch, m, col):
        """Output row m, columns col.. (8 channels, constants at ch..): requantized, plus the fused add if any."""
        y = _rq_vec(accv, R, ch, qmin, qmax, f64, avx512)
        if residual is None:
            return y
        return _residual_vec(y, T.Cast("int32x8", R[7][m, T.ramp(col, 1, VEC)]), residual, avx512)

    def x_word(XP32, g, m, q):
        """Activation word q of row m as the u8 operand: bytes x' (see x_flip)."""
        word = XP32[g, m, q]
        return T.bitwise_xor(word, T.int32(-0x7F7F7F80)) if x_flip else word  # 0x80808080: +128 per byte

    def dpbusd(accv, x_word, w_bytes):
        """accv + the sums of 4 u8*s8 products per int32 lane, exact (vpdpbusd)."""
        return T.call_llvm_pure_intrin(
            "int32x8", _VPDPBUSD, accv, T.reinterpret("int8x32", T.broadcast(x_word, VEC)), w_bytes
        )

    @T.macro
    def kstep4_vnni(XP32, W32, acc, g, m0, cv0, mr, nv, q):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = dpbusd(
                    dpbusd(
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)],
                        x_word(XP32, g, m0 + r, 2 * q),
                        _nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 0),
                    ),
                    x_word(XP32, g, m0 + r, 2 * q + 1),
                    _nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 1),
                )

    @T.macro
    def kstep4(XP32, W32, acc, g, m0, cv0, mr, nv, q):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[
                    T.ramp((r * nv + v) * VEC, 1, VEC)
                ] + T.call_llvm_pure_intrin(
                    "int32x8",
                    _PMADDWD,
                    T.call_llvm_pure_intrin(
                        "int16x16",
                        _PMADDUBSW,
                        T.reinterpret("int8x32", T.broadcast(x_word(XP32, g, m0 + r, 2 * q), VEC)),
                        _nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 0),
                    )
                    + T.call_llvm_pure_intrin(
                        "int16x16",
                        _PMADDUBSW,
                        T.reinterpret("int8x32", T.broadcast(x_word(XP32, g, m0 + r, 2 * q + 1), VEC)),
                        _nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 1),
                    ),
                    T.broadcast(T.int16(1), 16),
                )

    @T.macro
    def micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, cv0, mr, nv, partial):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = BIAS[T.ramp(g * OCBP + (cv0 + v) * VEC, 1, VEC)]
        if wbits == 4:
            for q in T.serial(KQ2):
                if vnni:
                    kstep4_vnni(XP32, W32, acc, g, m0, cv0, mr, nv, q)
                else:
                    kstep4(XP32, W32, acc, g, m0, cv0, mr, nv, q)
        elif vnni:
            for q in T.serial(KQ):
                for r in T.unroll(mr):
                    for v in T.unroll(nv):
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = dpbusd(
                            acc[T.ramp((r * nv + v) * VEC, 1, VEC)],
                            x_word(XP32, g, m0 + r, q),
                            T.reinterpret("int8x32", W32[g, cv0 + v, q, T.ramp(0, 1, VEC)]),
                        )
        else:
            for kp in T.serial(KP):
                for r in T.unroll(mr):
                    for v in T.unroll(nv):
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[
                            T.ramp((r * nv + v) * VEC, 1, VEC)
                        ] + T.call_llvm_pure_intrin(
                            "int32x8",
                            _PMADDWD,
                            T.reinterpret("int16x16", T.broadcast(XP32[g, m0 + r, kp], VEC)),
                            T.reinterpret("int16x16", W32[g, cv0 + v, kp, T.ramp(0, 1, VEC)]),
                        )
        for r in T.unroll(mr):
            for v in T.unroll(nv - 1 if partial else nv):
                if requant:
                    OUT[m0 + r, T.ramp(g * OCg + (cv0 + v) * VEC, 1, VEC)] = T.Cast(
                        out_vec,
                        requantized(
                            acc[T.ramp((r * nv + v) * VEC, 1, VEC)], R, g * OCBP + (cv0 + v) * VEC, m0 + r,
                            g * OCg + (cv0 + v) * VEC,
                        ),
                    )
                else:
                    OUT[m0 + r, T.ramp(g * OCg + (cv0 + v) * VEC, 1, VEC)] = acc[T.ramp((r * nv + v) * VEC, 1, VEC)]
            if partial:
                if requant:
                    acc[T.ramp((r * nv + nv - 1) * VEC, 1, VEC)] = _rq_vec(
                        acc[T.ramp((r * nv + nv - 1) * VEC, 1, VEC)],
                        R,
                        g * OCBP + (cv0 + nv - 1) * VEC,
                        qmin,
                        qmax,
                        f64,
                        avx512,
                    )
                for ln in T.unroll(LAST_LANES):
                    OUT[m0 + r, g * OCg + (cv0 + nv - 1) * VEC + ln] = T.Cast(
                        out_dtype, accs[(r * nv + nv - 1) * VEC + ln]
                    )

    @T.macro
    def row_block(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct, mr):
        if NV_TAIL == 0:
            if LAST_LANES == VEC:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * NV, mr, NV, False)
            else:
                if ct < NCT_FULL - 1:
                    micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * NV, mr, NV, False)
                else:
                    micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * NV, mr, NV, True)
        else:
            if ct < NCT_FULL:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * NV, mr, NV, False)
            else:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, NCT_FULL * NV, mr, NV_TAIL, LAST_LANES != VEC)

    @T.macro
    def im2col_pair(SRC, XP32, nh, ow, g, kh, jp):
        XP32[g, nh * OW + ow, kh * KPr + jp] = T.bitwise_or(
            T.bitwise_and(
                T.Cast(
                    "int32",
                    SRC[nh // OH, nh % OH * sh + kh * dh, ow * sw + (2 * jp) // ICg * dw, g * ICg + (2 * jp) % ICg],
                ),
                0xFFFF,
            ),
            T.shift_left(
                T.if_then_else(
                    2 * jp + 1 < KWIC,
                    T.Cast(
                        "int32",
                        SRC[
                            nh // OH,
                            nh % OH * sh + kh * dh,
                            ow * sw + T.min(2 * jp + 1, KWIC - 1) // ICg * dw,
                            g * ICg + T.min(2 * jp + 1, KWIC - 1) % ICg,
                        ],
                    ),
                    0,
                ),
                16,
            ),
        )

    def pw_byte(XF, m, k):
        return _xbyte(XF[m * C + T.min(k, C - 1)], x_dtype, 1)

    def src_byte(SRC, nh, ow, g, k):
        kk = T.min(k, K - 1)
        return _xbyte(
            SRC[nh // OH, nh % OH * sh + kk // KWIC * dh, ow * sw + kk % KWIC // ICg * dw, g * ICg + kk % ICg],
            x_dtype,
            1,
        )

    @T.macro
    def im2col_word(SRC, XP, nh, ow, g, k):
        XP[g, nh * OW + ow, k] = _word4(src_byte, 4 * k, K, SRC, nh, ow, g)

    def src_words(SRCF, HS, WS, nh, ow, g, kh, k, words):
        """`words` int32 words of x' from the flat input (HS x WS pixels): K values k.. of row kh."""
        off = ((nh // OH * HS + nh % OH * sh + kh * dh) * WS + ow * sw + k // ICg * dw) * C + g * ICg + k % ICg
        xb = _xbyte(SRCF[T.ramp(off, 1, 4 * words)], x_dtype, 4 * words)
        return T.reinterpret("int32" if words == 1 else f"int32x{words}", xb)

    @T.macro
    def im2col_row(SRCF, HS, WS, XP, nh, ow):
        for g in T.serial(G):
            for kh in T.serial(KH):
                for q in T.serial(ROW_CHUNKS):
                    XP[g, nh * OW + ow, T.ramp(kh * ROW_WORDS + 4 * q, 1, 4)] = src_words(
                        SRCF, HS, WS, nh, ow, g, kh, 16 * q, 4
                    )
                for j in T.unroll(ROW_SINGLES):
                    XP[g, nh * OW + ow, kh * ROW_WORDS + 4 * ROW_CHUNKS + j] = src_words(
                        SRCF, HS, WS, nh, ow, g, kh, 16 * ROW_CHUNKS + 4 * j, 1
                    )
            for j in T.serial(XW - KH * ROW_WORDS):
                XP[g, nh * OW + ow, KH * ROW_WORDS + j] = 0

    @T.macro
    def pack_row(XF, XP, m):
        """Row m of a pointwise conv's input as words of bytes x', K zero-padded to KB."""
        for q in T.serial(C // 32):
            XP[0, m, T.ramp(q * 8, 1, 8)] = T.reinterpret(
                "int32x8", _xbyte(XF[T.ramp(m * C + q * 32, 1, 32)], x_dtype, 32)
            )
        if C % 32 >= 16:
            XP[0, m, T.ramp(C // 32 * 8, 1, 4)] = T.reinterpret(
                "int32x4", _xbyte(XF[T.ramp(m * C + C // 32 * 32, 1, 16)], x_dtype, 16)
            )
        for k in T.serial(C // 4 - C // 16 * 4):
            XP[0, m, C // 16 * 4 + k] = T.reinterpret(
                "int32", _xbyte(XF[T.ramp(m * C + C // 16 * 16 + 4 * k, 1, 4)], x_dtype, 4)
            )
        for k in T.serial(XW - C // 4):
            XP[0, m, C // 4 + k] = _word4(pw_byte, C // 4 * 4 + 4 * k, C, XF, m)

    @T.macro
    def pack_rows(XF, XPADF, XP, lo, hi):
        """Rows lo..hi-1 of the packed input: a pointwise conv's bytes, or im2col by words."""
        for m in T.serial(lo, hi):
            if is_pointwise:
                pack_row(XF, XP, m)
            elif use_xpad:
                im2col_row(XPADF, HP, WP, XP, m // OW, m % OW)
            else:
                im2col_row(XF, H, W, XP, m // OW, m % OW)

    @T.macro
    def fill_zero(DST, start, count):
        for q in T.serial(count // 32):
            DST[T.ramp(start + 32 * q, 1, 32)] = T.broadcast(T.Cast(x_dtype, 0), 32)
        for i in T.serial(count % 32):
            DST[start + count // 32 * 32 + i] = T.Cast(x_dtype, 0)

    @T.macro
    def copy(DST, dst, SRCF, src, count):
        for q in T.serial(count // 32):
            DST[T.ramp(dst + 32 * q, 1, 32)] = SRCF[T.ramp(src + 32 * q, 1, 32)]
        for i in T.serial(count % 32):
            DST[dst + count // 32 * 32 + i] = SRCF[src + count // 32 * 32 + i]

    @T.macro
    def pad_copy(XF, XPADF):
        """The zero-padded input, row by row: zeros, the input row, zeros (whole rows of zeros above and below)."""
        for nh in T.parallel(N * HP):
            if nh % HP >= pt and nh % HP < H + pt:
                fill_zero(XPADF, nh * WP * C, LZ * C)
                copy(XPADF, (nh * WP + LZ) * C, XF, (nh // HP * H + nh % HP - pt) * W * C, CW * C)
                fill_zero(XPADF, (nh * WP + LZ + CW) * C, RZ * C)
            else:
                fill_zero(XPADF, nh * WP * C, WP * C)

    @T.macro
    def body(X, W32, BIAS, R, OUT):
        XP32A = T.alloc_buffer(XP_SHAPE, "int32")
        XD32 = T.decl_buffer((G, M, XW), "int32", data=X.data)
        XP32 = T.meta_var(XD32 if x_direct else XP32A)
        Ov = T.decl_buffer((M, OC), out_dtype, data=OUT.data)
        XS = T.decl_buffer((N, H, W, C), x_dtype, data=X.data)
        XF = T.decl_buffer((N * H * W * C,), x_dtype, data=X.data)
        XPADF = T.alloc_buffer((XPAD_SIZE,), x_dtype)
        SRC = T.meta_var(_View4(XPADF, HP, WP, C) if use_xpad else XS)  # the [N, H, W, C] input im2col reads
        if use_xpad:
            pad_copy(XF, XPADF)
        # ---- pack activations (im2col) ----
        if byte_x:
            # bytes x' (uint8: x, int8: x + 128), K zero-padded to KB
            if x_direct or pack_in_tasks:
                T.evaluate(0)
            elif is_pointwise or word_rows:
                for m in T.parallel(M):
                    pack_rows(XF, XPADF, XP32A, m, m + 1)
            else:
                for nh in T.parallel(N * OH):
                    for ow in T.serial(OW):
                        for g in T.serial(G):
                            if KB <= 64:
                                for k in T.unroll(XW):
                                    im2col_word(SRC, XP32A, nh, ow, g, k)
                            else:
                                for k in T.serial(XW):
                                    im2col_word(SRC, XP32A, nh, ow, g, k)
        elif is_pointwise:
            X2 = T.decl_buffer((M, C), x_dtype, data=X.data)
            for m in T.parallel(M):
                for q in T.serial(PK_FULL):
                    XP32[0, m, T.ramp(q * 8, 1, 8)] = T.reinterpret(
                        "int32x8", T.Cast("int16x16", X2[m, T.ramp(q * 16, 1, 16)])
                    )
                for q in T.serial(PK_REM):
                    XP32[0, m, PK_FULL * 8 + q] = T.bitwise_or(
                        T.bitwise_and(T.Cast("int32", X2[m, PK_FULL * 16 + q * 2]), 0xFFFF),
                        T.shift_left(
                            T.if_then_else(
                                PK_FULL * 16 + q * 2 + 1 < C,
                                T.Cast("int32", X2[m, T.min(PK_FULL * 16 + q * 2 + 1, C - 1)]),
                                0,
                            ),
                            16,
                        ),
                    )
        else:
            for nh in T.parallel(N * OH):
                for ow in T.serial(OW):
                    for g in T.serial(G):
                        for kh in T.serial(KH):
                            if unroll_im2col:
                                for jp in T.unroll(KPr):
                                    im2col_pair(SRC, XP32, nh, ow, g, kh, jp)
                            else:
                                for jp in T.serial(KPr):
                                    im2col_pair(SRC, XP32, nh, ow, g, kh, jp)
        # ---- GEMM over register tiles, the MR_TAIL rows' tiles last; one accumulator scratch per task ----
        for tid in T.parallel(NT):
            acc = T.alloc_buffer((MR * NV * VEC,), "int32", scope="local")
            accs = T.meta_var(acc)
            if pack_in_tasks:
                pack_rows(XF, XPADF, XP32A, T.min(tid * RB * MR, M), T.min((tid + 1) * RB * MR, M))
            for ti in T.serial(CH):
                if tid * CH + ti < TOT:
                    gi, m0, ct = T.meta_var(tile_coords(tid * CH + ti))
                    row_block(XP32, W32, BIAS, R, Ov, acc, accs, gi, m0, ct, MR)
                elif tid * CH + ti < TOT + TOT_T:
                    row_block(XP32, W32, BIAS, R, Ov, acc, accs, (tid * CH + ti - TOT) // NCT, NRB * MR,
                              (tid * CH + ti - TOT) % NCT, MR_TAIL)

    # TVMScript signatures are fixed: the fused-add variant differs only in its SKIP parameter
    if residual is None:

        @T.prim_func(private=True)
        def func(
            X: T.Buffer(x_buf_shape, x_dtype),
            W32: T.Buffer((G, OCB, WK, VEC), "int32"),
            BIAS: T.Buffer((NP,), "int32"),
            ALO: T.Buffer((NP,), "int32"),
            AHI: T.Buffer((NP,), "int32"),
            MANT: T.Buffer((NP + VEC,), "int32"),
            C1: T.Buffer((NP,), "int64"),
            SH: T.Buffer((NP,), "int64"),
            C2: T.Buffer((NP,), "int32"),
            MD: T.Buffer((NP,), "float64"),
            OUT: T.Buffer(out_shape, out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
            body(X, W32, BIAS, R, OUT)

    else:

        @T.prim_func(private=True)
        def func(
            X: T.Buffer(x_buf_shape, x_dtype),
            SKIP: T.Buffer(out_shape, residual.skip_dtype),
            W32: T.Buffer((G, OCB, WK, VEC), "int32"),
            BIAS: T.Buffer((NP,), "int32"),
            ALO: T.Buffer((NP,), "int32"),
            AHI: T.Buffer((NP,), "int32"),
            MANT: T.Buffer((NP + VEC,), "int32"),
            C1: T.Buffer((NP,), "int64"),
            SH: T.Buffer((NP,), "int64"),
            C2: T.Buffer((NP,), "int32"),
            MD: T.Buffer((NP,), "float64"),
            OUT: T.Buffer(out_shape, out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            SKIPv = T.decl_buffer((M, OC), residual.skip_dtype, data=SKIP.data)
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD, SKIPv))
            body(X, W32, BIAS, R, OUT)

    return func, dict(KP=KP, KWICp=KWICp, OCB=OCB, OCBP=OCBP, KB=KB, KROW=KROW)


def _pack_gemm_weight(weight, G, KH, KW, ICg, OCg, KWICp, KP, OCB):
    w = np.asarray(weight).astype(np.int64)
    wt = w.reshape(G, OCg, ICg, KH, KW).transpose(0, 1, 3, 4, 2).reshape(G, OCg, KH, KW * ICg)
    wp = np.zeros((G, OCB * VEC, KH, KWICp), np.int64)
    wp[:, :OCg, :, : KW * ICg] = wt
    wp = wp.reshape(G, OCB, VEC, KP, 2).transpose(0, 1, 3, 2, 4)  # [G, OCB, KP, VEC, 2]
    return np.ascontiguousarray(wp.astype(np.int16)).view(np.int32).reshape(G, OCB, KP, VEC)


def _gemm_k_order(weight, G, KH, KW, ICg, OCg, KROW):
    """Weights [G, OCg, K] in the GEMM's K order: (kh, kw, ic), each kh row zero-padded to KROW values."""
    wt = np.asarray(weight).astype(np.int64).reshape(G, OCg, ICg, KH, KW).transpose(0, 1, 3, 4, 2)
    rows = np.zeros((G, OCg, KH, KROW), np.int64)
    rows[..., : KW * ICg] = wt.reshape(G, OCg, KH, KW * ICg)
    return rows.reshape(G, OCg, KH * KROW)


def _pack_gemm_weight_vnni(weight, G, KH, KW, ICg, OCg, KB, OCB, KROW):
    """VNNI int8 GEMM weights [G, OCB, KB/4, 8] int32: byte b of the word for step q, lane c holds the
    weight of K index 4q+b of channel c (K order of _gemm_k_order, zero-padded to KB)."""
    wt = _gemm_k_order(weight, G, KH, KW, ICg, OCg, KROW)
    wp = np.zeros((G, OCB * VEC, KB), np.int8)
    wp[:, :OCg, : wt.shape[2]] = wt
    wp = wp.reshape(G, OCB, VEC, KB // 4, 4).transpose(0, 1, 3, 2, 4)  # [g, ocb, q, lane, byte]
    return np.ascontiguousarray(wp).view(np.int32).reshape(G, OCB, KB // 4, VEC)


def _pack_gemm_weight4(weight, G, KH, KW, ICg, OCg, KB, OCB, KROW):
    """int4 GEMM weights [G, OCB, KB/8, 8] int32: byte b of the word for step q, lane c holds w+8 of
    K index 8q+b (low nibble) and 8q+4+b (high nibble) of channel c (K order of _gemm_k_order)."""
    wt = _gemm_k_order(weight, G, KH, KW, ICg, OCg, KROW)
    wp = np.full((G, OCB * VEC, KB), 8, np.int64)  # padding: w=0
    wp[:, :OCg, : wt.shape[2]] = wt + 8
    wp = wp.reshape(G, OCB, VEC, KB // 8, 2, 4)  # [g, ocb, lane, q, half, byte]
    word = (wp[:, :, :, :, 0, :] | (wp[:, :, :, :, 1, :] << 4)) << (8 * np.arange(4))
    word = word.sum(axis=-1).transpose(0, 1, 3, 2)  # [g, ocb, q, lane]
    return np.ascontiguousarray(word.astype(np.uint32).view(np.int32))


class _View4:
    """A flat buffer read as [N, H, W, C] (no second buffer declared: it may go unused)."""

    def __init__(self, flat, h, w, c):
        self.flat, self.h, self.w, self.c = flat, h, w, c

    def __getitem__(self, index):
        n, y, x, ch = index
        return self.flat[((n * self.h + y) * self.w + x) * self.c + ch]


def _conv_geometry(x_shape, weight, stride, padding, dilation):
    N, H, W, C = [int(v) for v in x_shape]
    OC, ICg, KH, KW = [int(v) for v in weight.shape]
    sh, sw = [int(v) for v in stride]
    pt, pl, pb, pr = [int(v) for v in padding]
    dh, dw = [int(v) for v in dilation]
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("empty conv output")
    return N, H, W, C, OC, ICg, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW


def _gemm_conv(
    x_shape,
    x_dtype,
    weight,
    stride,
    padding,
    dilation,
    groups,
    bias,
    mantissa,
    shift,
    qmin,
    qmax,
    out_dtype,
    out_shape=None,
    x_buf_shape=None,
    wbits=8,
    num_threads=NUM_THREADS,
    vnni=False,
    avx512=False,
    residual=None,
):
    N, H, W, C, OC, ICg, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW = _conv_geometry(
        x_shape, weight, stride, padding, dilation
    )
    G = int(groups)
    if C != ICg * G or OC % G:
        raise ValueError("inconsistent groups / channels")
    OCg = OC // G
    requant = mantissa is not None
    if not requant:
        out_dtype = "int32"
    if out_shape is None:
        out_shape = (N, OH, OW, OC)
    f64 = f64_requant_is_exact(mantissa, shift, qmin, qmax, acc_bound(weight, bias, x_dtype))
    if residual is not None and not (G == 1 and OCg % VEC == 0 and f64
                                     and residual_is_exact(residual, (int(qmin), int(qmax)))):
        return None
    func, info = _gemm_func(
        N=N,
        H=H,
        W=W,
        C=C,
        x_dtype=x_dtype,
        G=G,
        ICg=ICg,
        OCg=OCg,
        KH=KH,
        KW=KW,
        sh=sh,
        sw=sw,
        pt=pt,
        pl=pl,
        dh=dh,
        dw=dw,
        OH=OH,
        OW=OW,
        requant=requant,
        qmin=int(qmin),
        qmax=int(qmax),
        out_dtype=out_dtype,
        out_shape=tuple(out_shape),
        x_buf_shape=tuple(x_buf_shape or (N, H, W, C)),
        wbits=wbits,
        num_threads=num_threads,
        vnni=vnni,
        f64=f64,
        avx512=avx512,
        residual=residual,
    )
    OCBP = info["OCBP"]
    if wbits == 4 or vnni:
        if wbits == 4:
            w32 = _pack_gemm_weight4(weight, G, KH, KW, ICg, OCg, info["KB"], info["OCB"], info["KROW"])
        else:
            w32 = _pack_gemm_weight_vnni(weight, G, KH, KW, ICg, OCg, info["KB"], info["OCB"], info["KROW"])
        if x_dtype == "int8":  # x' = x + 128: fold -128 * sum_k w into the bias
            wsum = np.asarray(weight).astype(np.int64).reshape(OC, -1).sum(axis=1)
            bias = np.asarray(bias, dtype=np.int64).reshape(-1)[:OC] - 128 * wsum
            bias = ((bias + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)
    else:
        w32 = _pack_gemm_weight(weight, G, KH, KW, ICg, OCg, info["KWICp"], info["KP"], info["OCB"])

    # per-group channel padding: group g's channels live at [g*OCBP, g*OCBP+OCg)
    def regroup(a):
        return np.asarray(a).reshape(G, OCg)

    ras = [
        _requant_arrays(
            regroup(bias)[g],
            None if mantissa is None else regroup(mantissa)[g],
            None if shift is None else regroup(shift)[g],
            qmin,
            qmax,
            OCg,
            OCBP,
        )
        for g in range(G)
    ]
    lists = [_consts_list(ra, requant) for ra in ras]
    consts = [w32]
    for i in range(len(lists[0])):
        parts = [lst[i] for lst in lists]
        if i == 3:  # mant has VEC trailing pad per group: drop it between groups
            parts = [p_[:OCBP] for p_ in parts] + [np.zeros(VEC, np.int32)]
        consts.append(np.ascontiguousarray(np.concatenate(parts)))
    return func, consts


# ---------------------------------------------------------------------------
# depthwise path (groups == IC == OC)
# ---------------------------------------------------------------------------

DW_VEC = 16  # channels per step: int16x16 products, 2 x int32x8 accumulators
_VPDPWSSD = "llvm.x86.avx512.vpdpwssd.256"  # AVX512-VNNI + VL: acc + pair sums of int16 products
# int8 depthwise, taps in pairs: the input bytes of taps a and b are interleaved (channel by channel, the
# first and second 8 channels of a block apart) and widened to int16, so that one vpmaddwd / vpdpwssd sums
# both taps' products per channel; weights are prepacked as the matching (w_a, w_b) pairs.
_PAIR_CHANNELS = (list(range(VEC)), list(range(VEC, DW_VEC)))
# shuffle indices into concat(x_a, x_b): x_a[c], x_b[c] for each channel c of the half
_PAIR_LO, _PAIR_HI = ([i for c in half for i in (c, c + DW_VEC)] for half in _PAIR_CHANNELS)


def _inside(size, out, pad, stride, reach):
    """[lo, hi): the outputs whose taps (input offsets 0..reach from out * stride - pad) all fall inside the input."""
    lo = _cdiv(pad, stride)
    return lo, max(lo, min(out, (size - 1 + pad - reach) // stride + 1))


def _column_blocks(lo, hi, width=4):
    """(block width, full blocks, tail columns) of the output columns [lo, hi)."""
    width = min(width, hi - lo)
    blocks = (hi - lo) // width if width else 0
    return width, blocks, hi - lo - blocks * width


def _dw_func(
    *, N, H, W, C, x_dtype, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW, requant, qmin, qmax, out_dtype, wbits=8,
    num_threads=NUM_THREADS, f64=False, vnni=False, avx512=False,
):
    CB = _cdiv(C, DW_VEC)
    NTAP = KH * KW
    pairs = wbits == 8  # int8 weights: two taps per multiply-add (vpmaddwd / vpdpwssd)
    NPAIR = _cdiv(NTAP, 2)
    NQ = _cdiv(CB * NTAP, 4)  # int4: int16 words per channel lane (4 nibbles each)
    CP = CB * DW_VEC
    C_FULL = C // DW_VEC
    LAST_LANES = C - (CB - 1) * DW_VEC
    HP = (OH - 1) * sh + (KH - 1) * dh + 1
    WP = (OW - 1) * sw + (KW - 1) * dw + 1
    # in place: read X itself, border pixels with bounds checks; otherwise (channels that do not fill whole
    # vectors) from a zero-padded copy, where every read is in bounds
    in_place = C % DW_VEC == 0
    OFF_H, OFF_W = (pt, pl) if in_place else (0, 0)
    # the output rows / columns whose taps all fall inside the input (all of them for the padded copy)
    OH_LO, OH_HI = _inside(H, OH, pt, sh, (KH - 1) * dh) if in_place else (0, OH)
    OW_LO, OW_HI = _inside(W, OW, pl, sw, (KW - 1) * dw) if in_place else (0, OW)
    OWB, NOWB, OW_TAIL = _column_blocks(OW_LO, OW_HI)
    XPAD_SHAPE = (1,) if in_place else (N, HP, WP, CP)
    out_vec = f"{out_dtype}x{VEC}"
    unroll_taps = KH * KW <= 16
    NT = num_threads
    TOT = N * OH
    CH = _cdiv(TOT, NT)
    W_SHAPE = (NQ, DW_VEC) if wbits == 4 else (NPAIR, CB, 2, DW_VEC)
    lo_idx = list(range(VEC))
    hi_idx = list(range(VEC, 2 * VEC))

    def wvec4(W16, cb, kh, kw):
        """int4 weights of tap (kh, kw) for 16 channels, unpacked to int16."""
        t = cb * NTAP + kh * KW + kw
        return _nib16(W16[t // 4, T.ramp(0, 1, DW_VEC)], t % 4)

    def xbytes(SRC, n, oh, ow, cb, t, checked, zero=False):
        """Input bytes of tap t for 16 channels (`zero`: the zero tap that pads an odd tap count).

        `checked`: the tap may fall outside the input, where it reads zero."""
        if zero:
            return T.broadcast(T.Cast(x_dtype, 0), DW_VEC)
        ih, iw = oh * sh + t // KW * dh - OFF_H, ow * sw + t % KW * dw - OFF_W
        if not checked:
            return SRC[n, ih, iw, T.ramp(cb * DW_VEC, 1, DW_VEC)]
        inside = tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)
        clamped = SRC[n, T.max(T.min(ih, H - 1), 0), T.max(T.min(iw, W - 1), 0), T.ramp(cb * DW_VEC, 1, DW_VEC)]
        return tirx.Select(inside, clamped, T.broadcast(T.Cast(x_dtype, 0), DW_VEC))

    def pair_madd(accv, xs, w):
        if vnni:
            return T.call_llvm_pure_intrin("int32x8", _VPDPWSSD, accv, xs, w)
        return accv + T.call_llvm_pure_intrin("int32x8", _PMADDWD, xs, w)

    @T.macro
    def tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, single, checked):
        for j in T.unroll(owb):
            xa = T.meta_var(xbytes(SRC, n, oh, ow0 + j, cb, 2 * p, checked))
            xb = T.meta_var(xbytes(SRC, n, oh, ow0 + j, cb, 2 * p + 1, checked, single))
            acc[T.ramp((2 * j) * VEC, 1, VEC)] = pair_madd(
                acc[T.ramp((2 * j) * VEC, 1, VEC)],
                T.Cast("int16x16", T.Shuffle([xa, xb], _PAIR_LO)),
                W16[p, cb, 0, T.ramp(0, 1, DW_VEC)],
            )
            acc[T.ramp((2 * j + 1) * VEC, 1, VEC)] = pair_madd(
                acc[T.ramp((2 * j + 1) * VEC, 1, VEC)],
                T.Cast("int16x16", T.Shuffle([xa, xb], _PAIR_HI)),
                W16[p, cb, 1, T.ramp(0, 1, DW_VEC)],
            )

    @T.macro
    def tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked):
        for j in T.unroll(owb):
            x16 = T.meta_var(T.Cast("int16x16", xbytes(SRC, n, oh, ow0 + j, cb, kh * KW + kw, checked)))
            prod = T.meta_var(x16 * wvec4(W16, cb, kh, kw))
            acc[T.ramp((2 * j) * VEC, 1, VEC)] = acc[T.ramp((2 * j) * VEC, 1, VEC)] + T.Cast(
                "int32x8", T.Shuffle([prod], lo_idx)
            )
            acc[T.ramp((2 * j + 1) * VEC, 1, VEC)] = acc[T.ramp((2 * j + 1) * VEC, 1, VEC)] + T.Cast(
                "int32x8", T.Shuffle([prod], hi_idx)
            )

    @T.macro
    def store8(R, OUT, acc, accs, n, oh, ow, k, ch, nl):
        # k: acc vector index, ch: first channel, nl: valid lanes (static)
        if requant:
            if nl == VEC:
                OUT[n, oh, ow, T.ramp(ch, 1, VEC)] = T.Cast(
                    out_vec, _rq_vec(acc[T.ramp((k) * VEC, 1, VEC)], R, ch, qmin, qmax, f64, avx512)
                )
            else:
                acc[T.ramp((k) * VEC, 1, VEC)] = _rq_vec(
                    acc[T.ramp((k) * VEC, 1, VEC)], R, ch, qmin, qmax, f64, avx512
                )
                for ln in T.unroll(nl):
                    OUT[n, oh, ow, ch + ln] = T.Cast(out_dtype, accs[k * VEC + ln])
        else:
            if nl == VEC:
                OUT[n, oh, ow, T.ramp(ch, 1, VEC)] = acc[T.ramp((k) * VEC, 1, VEC)]
            else:
                for ln in T.unroll(nl):
                    OUT[n, oh, ow, ch + ln] = accs[k * VEC + ln]

    @T.macro
    def micro(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, cb, owb, partial, checked):
        for j in T.unroll(owb):
            acc[T.ramp((2 * j) * VEC, 1, VEC)] = BIAS[T.ramp(cb * DW_VEC, 1, VEC)]
            acc[T.ramp((2 * j + 1) * VEC, 1, VEC)] = BIAS[T.ramp(cb * DW_VEC + VEC, 1, VEC)]
        if pairs:
            if unroll_taps:
                for p in T.unroll(NTAP // 2):
                    tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, False, checked)
            else:
                for p in T.serial(NTAP // 2):
                    tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, False, checked)
            if NTAP % 2 == 1:
                tap_pair(SRC, W16, acc, n, oh, ow0, cb, NTAP // 2, owb, True, checked)
        else:
            if unroll_taps:
                for kh in T.unroll(KH):
                    for kw in T.unroll(KW):
                        tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked)
            else:
                for kh in T.serial(KH):
                    for kw in T.serial(KW):
                        tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked)
        for j in T.unroll(owb):
            if partial:
                if LAST_LANES > VEC:
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, VEC)
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j + 1, cb * DW_VEC + VEC, LAST_LANES - VEC)
                else:
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, LAST_LANES)
            else:
                store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, VEC)
                store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j + 1, cb * DW_VEC + VEC, VEC)

    @T.macro
    def pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, owb, checked):
        for cb in T.serial(C_FULL):
            micro(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, cb, owb, False, checked)
        if LAST_LANES != DW_VEC:
            micro(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, C_FULL, owb, True, checked)

    @T.macro
    def output_row(SRC, W16, BIAS, R, OUT, acc, accs, n, oh):
        if oh >= OH_LO and oh < OH_HI:
            for ow in T.serial(OW_LO):  # left border
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow, 1, True)
            for ob in T.serial(NOWB):
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, OW_LO + ob * OWB, OWB, False)
            if OW_TAIL > 0:
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, OW_LO + NOWB * OWB, OW_TAIL, False)
            for ow in T.serial(OW - OW_HI):  # right border
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, OW_HI + ow, 1, True)
        else:  # top / bottom border rows
            for ow in T.serial(OW):
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow, 1, True)

    @T.macro
    def all_rows(SRC, W16, BIAS, R, OUT):
        """Rows of output pixels, chunked per task."""
        for tid in T.parallel(NT):
            acc = T.alloc_buffer((2 * max(OWB, 1) * VEC,), "int32", scope="local")
            accs = T.meta_var(acc)
            for ti in T.serial(CH):
                if tid * CH + ti < TOT:
                    output_row(SRC, W16, BIAS, R, OUT, acc, accs, (tid * CH + ti) // OH, (tid * CH + ti) % OH)

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((N, H, W, C), x_dtype),
        W16: T.Buffer(W_SHAPE, "int16"),
        BIAS: T.Buffer((CP,), "int32"),
        ALO: T.Buffer((CP,), "int32"),
        AHI: T.Buffer((CP,), "int32"),
        MANT: T.Buffer((CP + VEC,), "int32"),
        C1: T.Buffer((CP,), "int64"),
        SH: T.Buffer((CP,), "int64"),
        C2: T.Buffer((CP,), "int32"),
        MD: T.Buffer((CP,), "float64"),
        OUT: T.Buffer((N, OH, OW, C), out_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
        XPAD = T.alloc_buffer(XPAD_SHAPE, x_dtype)
        if not in_place:
            # ---- zero-padded copy of the input (spatial + channel padding) ----
            for nh in T.parallel(N * HP):
                for iw in T.serial(WP):
                    if nh % HP >= pt and nh % HP < H + pt and iw >= pl and iw < W + pl:
                        for cv in T.serial(C_FULL):
                            XPAD[nh // HP, nh % HP, iw, T.ramp(cv * DW_VEC, 1, DW_VEC)] = X[
                                nh // HP, nh % HP - pt, iw - pl, T.ramp(cv * DW_VEC, 1, DW_VEC)
                            ]
                        for c in T.serial(CP - C_FULL * DW_VEC):
                            XPAD[nh // HP, nh % HP, iw, C_FULL * DW_VEC + c] = T.if_then_else(
                                C_FULL * DW_VEC + c < C,
                                X[nh // HP, nh % HP - pt, iw - pl, T.min(C_FULL * DW_VEC + c, C - 1)],
                                T.Cast(x_dtype, 0),
                            )
                    else:
                        for cv in T.serial(CB):
                            XPAD[nh // HP, nh % HP, iw, T.ramp(cv * DW_VEC, 1, DW_VEC)] = T.broadcast(
                                T.Cast(x_dtype, 0), DW_VEC
                            )
        if in_place:
            all_rows(X, W16, BIAS, R, OUT)
        else:
            all_rows(XPAD, W16, BIAS, R, OUT)

    return func, CP


def _pack_depthwise_pairs(w):
    """[taps, CB, 16] int16 -> [ceil(taps/2), CB, 2, 16]: per tap pair (a, b) and channel block, the vectors
    (w_a, w_b interleaved) for the channels in _PAIR_CHANNELS order (a zero tap pads an odd count)."""
    taps, cb, _ = w.shape
    padded = np.zeros((2 * _cdiv(taps, 2), cb, DW_VEC), np.int16)
    padded[:taps] = w
    pairs = padded.reshape(-1, 2, cb, DW_VEC)  # [pair, a/b, CB, 16]
    out = np.stack([pairs[:, :, :, ch].transpose(0, 2, 3, 1).reshape(-1, cb, DW_VEC) for ch in _PAIR_CHANNELS],
                   axis=2)  # [pair, CB, half, 8 channels x (a, b)]
    return np.ascontiguousarray(out)


# int8 depthwise with VNNI, 32 channels at a time: the input bytes of four neighbouring columns of a kernel row
# are interleaved into quads (two in-lane byte unpacks, then two word unpacks; the pairs are shared between
# neighbouring outputs) and one vpdpbusd sums four taps per channel (taps past the kernel width have zero
# weights). Lane l of quad vector h holds channel _QUAD_CHANNELS[h][l]; the accumulators are put back in
# channel order once per output pixel.
DWQ_VEC = 32
_QUAD_CHANNELS = ([0, 1, 2, 3, 16, 17, 18, 19], [4, 5, 6, 7, 20, 21, 22, 23], [8, 9, 10, 11, 24, 25, 26, 27],
                  [12, 13, 14, 15, 28, 29, 30, 31])


def _in_lane_interleave(unit, hi):
    """Shuffle indices into concat(a, b) (32 bytes each) interleaving `unit`-byte elements of a and b within
    each 128-bit lane, from the low (hi=0) or high half of the lane, as vpunpck{l,h}{bw,wd} do."""
    per_half = 8 // unit
    return [e * unit + byte + src
            for lane in (0, 16 // unit)
            for e in range(lane + hi * per_half, lane + (hi + 1) * per_half)
            for src in (0, 32)
            for byte in range(unit)]


_BYTE_PAIRS = [_in_lane_interleave(1, hi) for hi in (0, 1)]
_WORD_QUADS = [_in_lane_interleave(2, hi) for hi in (0, 1)]
# natural channel order from two quad accumulators: their low (0) or high (1) four channels of each lane
_UNQUAD = [[half * 4 + i for i in range(4)] + [VEC + half * 4 + i for i in range(4)] for half in (0, 1)]


def _dw_quad_func(*, N, H, W, C, x_dtype, KH, KW, sh, sw, pt, pl, dh, OH, OW, requant, qmin, qmax, out_dtype,
                  num_threads, f64, avx512):
    CB = _cdiv(C, DWQ_VEC)  # channel blocks; the last one starts at C - 32 (it overlaps the one before)
    NQ = _cdiv(KW, 4)  # tap quads per kernel row
    SPAN = 4 * NQ  # input columns a kernel row reads
    OH_LO, OH_HI = _inside(H, OH, pt, sh, (KH - 1) * dh)
    OW_LO, OW_HI = _inside(W, OW, pl, sw, SPAN - 1)
    OWB, NOWB, OW_TAIL = _column_blocks(OW_LO, OW_HI)
    NT = num_threads
    TOT = N * OH
    CH = _cdiv(TOT, NT)
    out_vec = f"{out_dtype}x{VEC}"

    def first_channel(cb):
        return T.min(cb * DWQ_VEC, C - DWQ_VEC)

    def xcol(X, n, ih, iw, cb, checked):
        """x' bytes (uint8x32; int8 biased by 128) of input pixel (ih, iw), zero (x = 0) outside if `checked`."""
        ramp = T.ramp(first_channel(cb), 1, DWQ_VEC)
        if not checked:
            return _xbyte(X[n, ih, iw, ramp], x_dtype, DWQ_VEC)
        inside = tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)
        v = X[n, T.max(T.min(ih, H - 1), 0), T.max(T.min(iw, W - 1), 0), ramp]
        return _xbyte(tirx.Select(inside, v, T.broadcast(T.Cast(x_dtype, 0), DWQ_VEC)), x_dtype, DWQ_VEC)

    def quad(X, n, ih, iw, cb, checked, h):
        """Quad vector h of the four input columns iw..iw+3."""
        cols = [xcol(X, n, ih, iw + i, cb, checked) for i in range(4)]
        lo, hi = (T.Shuffle([cols[0], cols[1]], _BYTE_PAIRS[h // 2]), T.Shuffle([cols[2], cols[3]],
                                                                                _BYTE_PAIRS[h // 2]))
        return T.reinterpret("int8x32", T.Shuffle([lo, hi], _WORD_QUADS[h % 2]))

    def dpbusd(accv, x_bytes, w_words):
        return T.call_llvm_pure_intrin("int32x8", _VPDPBUSD, accv, x_bytes, T.reinterpret("int8x32", w_words))

    @T.macro
    def tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, h, checked):
        acc[T.ramp((4 * j + h) * VEC, 1, VEC)] = dpbusd(
            acc[T.ramp((4 * j + h) * VEC, 1, VEC)],
            quad(X, n, oh * sh - pt + kh * dh, (ow0 + j) * sw - pl + 4 * k, cb, checked, h),
            WQ[cb, kh, k, h, T.ramp(0, 1, VEC)],
        )

    @T.macro
    def taps(X, WQ, acc, n, oh, ow0, cb, owb, checked):
        for kh in T.unroll(KH):
            for k in T.unroll(NQ):
                for j in T.unroll(owb):
                    tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, 0, checked)  # h: a Python int (it picks shuffles)
                    tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, 1, checked)
                    tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, 2, checked)
                    tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, 3, checked)

    @T.macro
    def store_vector(R, OUT, acc, n, oh, ow, j, cb, q):
        """Channels 8q..8q+7 of the block of output pixel j, back in channel order, requantized and stored
        (the overlapping last block stores some channels again, with the same values)."""
        # channels 0-7: the low halves of quads 0, 1; 8-15: of quads 2, 3; 16-23 and 24-31: their high halves
        lo = T.meta_var(acc[T.ramp((4 * j + q % 2 * 2) * VEC, 1, VEC)])
        hi = T.meta_var(acc[T.ramp((4 * j + q % 2 * 2 + 1) * VEC, 1, VEC)])
        v = T.meta_var(T.Shuffle([lo, hi], _UNQUAD[q // 2]))
        if requant:
            OUT[n, oh, ow, T.ramp(first_channel(cb) + 8 * q, 1, VEC)] = T.Cast(
                out_vec, _rq_vec(v, R, first_channel(cb) + 8 * q, qmin, qmax, f64, avx512)
            )
        else:
            OUT[n, oh, ow, T.ramp(first_channel(cb) + 8 * q, 1, VEC)] = v

    @T.macro
    def store(R, OUT, acc, n, oh, ow, j, cb):
        store_vector(R, OUT, acc, n, oh, ow, j, cb, 0)
        store_vector(R, OUT, acc, n, oh, ow, j, cb, 1)
        store_vector(R, OUT, acc, n, oh, ow, j, cb, 2)
        store_vector(R, OUT, acc, n, oh, ow, j, cb, 3)

    @T.macro
    def pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, ow0, owb, checked):
        for cb in T.serial(CB):
            for j in T.unroll(owb):
                for h in T.unroll(4):
                    acc[T.ramp((4 * j + h) * VEC, 1, VEC)] = BIASQ[T.ramp(cb * DWQ_VEC + h * VEC, 1, VEC)]
            taps(X, WQ, acc, n, oh, ow0, cb, owb, checked)
            for j in T.unroll(owb):
                store(R, OUT, acc, n, oh, ow0 + j, j, cb)

    @T.macro
    def output_row(X, WQ, BIASQ, R, OUT, acc, n, oh):
        if oh >= OH_LO and oh < OH_HI:
            for ow in T.serial(OW_LO):  # left border
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, ow, 1, True)
            for ob in T.serial(NOWB):
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, OW_LO + ob * OWB, OWB, False)
            if OW_TAIL > 0:
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, OW_LO + NOWB * OWB, OW_TAIL, False)
            for ow in T.serial(OW - OW_HI):  # right border
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, OW_HI + ow, 1, True)
        else:  # top / bottom border rows
            for ow in T.serial(OW):
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, ow, 1, True)

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((N, H, W, C), x_dtype),
        WQ: T.Buffer((CB, KH, NQ, 4, VEC), "int32"),
        BIASQ: T.Buffer((CB * DWQ_VEC,), "int32"),
        ALO: T.Buffer((C,), "int32"),
        AHI: T.Buffer((C,), "int32"),
        MANT: T.Buffer((C + VEC,), "int32"),
        C1: T.Buffer((C,), "int64"),
        SH: T.Buffer((C,), "int64"),
        C2: T.Buffer((C,), "int32"),
        MD: T.Buffer((C,), "float64"),
        OUT: T.Buffer((N, OH, OW, C), out_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
        for tid in T.parallel(NT):
            acc = T.alloc_buffer((4 * max(OWB, 1) * VEC,), "int32", scope="local")
            for ti in T.serial(CH):
                if tid * CH + ti < TOT:
                    output_row(X, WQ, BIASQ, R, OUT, acc, (tid * CH + ti) // OH, (tid * CH + ti) % OH)

    return func


def _quad_channels(C):
    """[blocks, 4, 8]: the channel in lane l of quad vector h of each 32-channel block (the last block starts at
    C - 32)."""
    starts = np.minimum(np.arange(_cdiv(C, DWQ_VEC)) * DWQ_VEC, C - DWQ_VEC)
    return starts.reshape(-1, 1, 1) + np.array(_QUAD_CHANNELS).reshape(1, 4, VEC)


def _pack_depthwise_quads(weight, C, KH, KW):
    """[blocks, KH, ceil(KW/4), 4, 8] int32: the word for block b, row kh, tap quad k, vector h, lane l holds the
    weights of taps 4k..4k+3 (zero past KW) of channel _quad_channels(C)[b, h, l]."""
    nq = _cdiv(KW, 4)
    w = np.zeros((C, KH, 4 * nq), np.int8)
    w[:, :, :KW] = np.asarray(weight).reshape(C, KH, KW)
    quads = w[_quad_channels(C)].reshape(-1, 4, VEC, KH, nq, 4)  # [b, h, l, kh, k, tap]
    return np.ascontiguousarray(quads.transpose(0, 3, 4, 1, 2, 5)).view(np.int32)[..., 0]


def _dw_conv(
    x_shape, x_dtype, weight, stride, padding, dilation, bias, mantissa, shift, qmin, qmax, out_dtype, wbits=8,
    num_threads=NUM_THREADS, vnni=False, avx512=False,
):
    N, H, W, C, OC, ICg, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW = _conv_geometry(
        x_shape, weight, stride, padding, dilation
    )
    requant = mantissa is not None
    if not requant:
        out_dtype = "int32"
    f64 = f64_requant_is_exact(mantissa, shift, qmin, qmax, acc_bound(weight, bias, x_dtype))
    if vnni and wbits == 8 and C % VEC == 0 and C >= DWQ_VEC and dw == 1:
        func = _dw_quad_func(N=N, H=H, W=W, C=C, x_dtype=x_dtype, KH=KH, KW=KW, sh=sh, sw=sw, pt=pt, pl=pl, dh=dh,
                             OH=OH, OW=OW, requant=requant, qmin=int(qmin), qmax=int(qmax), out_dtype=out_dtype,
                             num_threads=num_threads, f64=f64, avx512=avx512)
        bias = np.asarray(bias, dtype=np.int64).reshape(-1)[:C]
        if x_dtype == "int8":  # x' = x + 128: fold -128 * sum of the taps' weights into the bias
            bias = bias - 128 * np.asarray(weight).astype(np.int64).reshape(C, -1).sum(axis=1)
        ra = _requant_arrays(bias, mantissa, shift, qmin, qmax, C, C)
        consts = _consts_list(ra, requant)
        consts[0] = np.ascontiguousarray(consts[0][_quad_channels(C).reshape(-1)])  # accumulator order
        return func, [_pack_depthwise_quads(weight, C, KH, KW)] + consts
    func, CP = _dw_func(
        N=N,
        H=H,
        W=W,
        C=C,
        x_dtype=x_dtype,
        KH=KH,
        KW=KW,
        sh=sh,
        sw=sw,
        pt=pt,
        pl=pl,
        dh=dh,
        dw=dw,
        OH=OH,
        OW=OW,
        requant=requant,
        qmin=int(qmin),
        qmax=int(qmax),
        out_dtype=out_dtype,
        wbits=wbits,
        num_threads=num_threads,
        f64=f64,
        vnni=vnni,
        avx512=avx512,
    )
    w16 = np.zeros((KH, KW, CP), np.int16)
    w16[:, :, :C] = np.asarray(weight).reshape(C, KH, KW).transpose(1, 2, 0)
    if wbits == 4:
        # nibble t = cb*KH*KW + kh*KW + kw of lane i (channel cb*16+i) lives in word t//4, bits 4*(t%4)..
        CB = CP // DW_VEC
        nib = w16.reshape(KH * KW, CB, DW_VEC).transpose(1, 0, 2).reshape(CB * KH * KW, DW_VEC).astype(np.int64) & 0xF
        NQ = _cdiv(CB * KH * KW, 4)
        nq = np.zeros((NQ * 4, DW_VEC), np.int64)
        nq[: nib.shape[0]] = nib
        word = (nq.reshape(NQ, 4, DW_VEC) << (4 * np.arange(4)).reshape(1, 4, 1)).sum(axis=1)
        w16 = np.ascontiguousarray(word.astype(np.uint16).view(np.int16))
    else:
        w16 = _pack_depthwise_pairs(w16.reshape(KH * KW, CP // DW_VEC, DW_VEC))
    ra = _requant_arrays(bias, mantissa, shift, qmin, qmax, C, CP)
    return func, [w16] + _consts_list(ra, requant)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def conv2d_nhwc(
    x_shape,
    x_dtype,
    weight,
    stride,
    padding,
    dilation,
    groups,
    bias,
    mantissa,
    shift,
    qmin,
    qmax,
    out_dtype,
    weight_bits=8,
    num_threads=NUM_THREADS,
    vnni=False,
    avx512=False,
    residual=None,
):
    """Quantized NHWC conv2d.  Returns (PrimFunc(x, *consts, out), consts).

    `vnni` (AVX-512 VNNI with VL, or AVX-VNNI): GEMM-shaped convs use vpdpbusd on u8 x s8 bytes,
    int8 depthwise convs vpdpwssd on tap pairs.

    `residual` (fields skip_dtype, y_multiplier, skip_multiplier, shift, qmin, qmax) fuses a rescaled add
    into the epilogue: the PrimFunc is then (x, skip, *consts, out), skip and out of the conv output's
    shape, out = clip((y * y_multiplier + skip * skip_multiplier + 2^(shift-1)) >> shift, qmin, qmax) with
    y the conv's output and `out_dtype` the add's. Returns None where this kernel cannot fuse it exactly
    (depthwise or grouped convs, channels not in whole vectors, no float64 epilogue)."""
    weight = np.asarray(weight)
    wbits = 4 if int(weight_bits) == 4 else 8
    if wbits == 4:
        _check_int4(weight)
    C = int(x_shape[3])
    depthwise = int(groups) == C and int(weight.shape[0]) == C and int(weight.shape[1]) == 1 and C > 1
    if depthwise:
        if residual is not None:
            return None
        return _dw_conv(
            tuple(x_shape),
            x_dtype,
            weight,
            stride,
            padding,
            dilation,
            bias,
            mantissa,
            shift,
            qmin,
            qmax,
            out_dtype,
            wbits,
            num_threads,
            vnni,
            avx512,
        )
    return _gemm_conv(
        tuple(x_shape),
        x_dtype,
        weight,
        stride,
        padding,
        dilation,
        groups,
        bias,
        mantissa,
        shift,
        qmin,
        qmax,
        out_dtype,
        wbits=wbits,
        num_threads=num_threads,
        vnni=vnni,
        avx512=avx512,
        residual=residual,
    )


def dense(x_shape, x_dtype, weight, bias, mantissa, shift, qmin, qmax, out_dtype, weight_bits=8,
          num_threads=NUM_THREADS, vnni=False, avx512=False):
    """Quantized dense: x [N, IN] . weight[OUT, IN]^T.  Returns (PrimFunc(x, *consts, out), consts)."""
    Nb, IN = [int(v) for v in x_shape]
    OUT = int(weight.shape[0])
    wbits = 4 if int(weight_bits) == 4 else 8
    if wbits == 4:
        _check_int4(weight)
    w4 = np.asarray(weight).reshape(OUT, IN, 1, 1)
    return _gemm_conv(
        (Nb, 1, 1, IN),
        x_dtype,
        w4,
        (1, 1),
        (0, 0, 0, 0),
        (1, 1),
        1,
        bias,
        mantissa,
        shift,
        qmin,
        qmax,
        out_dtype,
        out_shape=(Nb, OUT),
        x_buf_shape=(Nb, IN),
        wbits=wbits,
        num_threads=num_threads,
        vnni=vnni,
        avx512=avx512,
    )
