"""The depthwise conv kernels (groups == C == OC), NHWC, int8 or int4 weights.

Channels that fill whole vectors are read in place (border pixels bounds-checked), others through a zero-padded
copy.
- int8 weights with VNNI, >= 32 channels (a multiple of 8): 32 channels at a time; the input bytes of four
  neighbouring columns are interleaved into quads and `vpdpbusd` sums four taps per channel (taps past the
  kernel width have zero weights).
- other int8 weights: 16 channels at a time; taps go in pairs, their input bytes interleaved and widened to
  int16, and `vpmaddwd` (`vpdpwssd` with VNNI) sums both taps' products per channel exactly.
- int4 weights: x*w is computed exactly in int16 (|x*w| <= 255*8 < 2^15) and widened into int32 accumulators.
The builders read only their `DepthwisePlan`.
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from .epilogue import requantize_vec
from .isa import PMADDWD, VPDPBUSD, VPDPWSSD, Isa, nib16, xbyte
from .packing import (
    DW_VEC,
    DWQ_VEC,
    PAIR_CHANNELS,
    VEC,
    depthwise_taps,
    pack_depthwise_int4,
    pack_depthwise_pairs,
    pack_depthwise_quads,
    quad_channels,
)
from .plans import NUM_THREADS, ConvGeometry, DepthwisePlan, Epilogue
from .requant import acc_bound, epilogue_constants, f64_requant_is_exact, fold_input_offset, requant_arrays

# shuffle indices into concat(x_a, x_b): x_a[c], x_b[c] for each channel c of the half (taps in pairs)
PAIR_LO, PAIR_HI = ([i for c in half for i in (c, c + DW_VEC)] for half in PAIR_CHANNELS)


# Tap quads (VNNI): the input bytes of four neighbouring columns of a kernel row are interleaved into quads (two
# in-lane byte unpacks, then two word unpacks; the pairs are shared between neighbouring outputs). Lane l of quad
# vector h holds channel QUAD_CHANNELS[h][l]; the accumulators are put back in channel order once per pixel.
def in_lane_interleave(unit: int, hi: int) -> list[int]:
    """Shuffle indices into concat(a, b) (32 bytes each) interleaving `unit`-byte elements of a and b within
    each 128-bit lane, from the low (hi=0) or high half of the lane, as vpunpck{l,h}{bw,wd} do."""
    per_half = 8 // unit
    return [e * unit + byte + src
            for lane in (0, 16 // unit)
            for e in range(lane + hi * per_half, lane + (hi + 1) * per_half)
            for src in (0, 32)
            for byte in range(unit)]


BYTE_PAIRS = [in_lane_interleave(1, hi) for hi in (0, 1)]
WORD_QUADS = [in_lane_interleave(2, hi) for hi in (0, 1)]
# natural channel order from two quad accumulators: their low (0) or high (1) four channels of each lane
UNQUAD = [[half * 4 + i for i in range(4)] + [VEC + half * 4 + i for i in range(4)] for half in (0, 1)]


@functools.cache  # one parse per distinct plan, as `gemm_func`
def depthwise_func(d: DepthwisePlan) -> tirx.PrimFunc:
    """16 channels at a time: PrimFunc (X, W16, BIAS, ALO, AHI, MANT, C1, SH, C2, MD, OUT) of plan `d`."""
    geo, ep = d.geo, d.epilogue
    lo_idx = list(range(VEC))
    hi_idx = list(range(VEC, 2 * VEC))

    def wvec4(W16, cb, kh, kw):
        """int4 weights of tap (kh, kw) for 16 channels, unpacked to int16."""
        t = cb * d.NTAP + kh * geo.KW + kw
        return nib16(W16[t // 4, T.ramp(0, 1, DW_VEC)], t % 4)

    def xbytes(SRC, n, oh, ow, cb, t, checked, zero=False):
        """Input bytes of tap t for 16 channels (`zero`: the zero tap that pads an odd tap count).

        `checked`: the tap may fall outside the input, where it reads zero."""
        if zero:
            return T.broadcast(T.Cast(d.x_dtype, 0), DW_VEC)
        ih, iw = oh * geo.sh + t // geo.KW * geo.dh - d.OFF_H, ow * geo.sw + t % geo.KW * geo.dw - d.OFF_W
        if not checked:
            return SRC[n, ih, iw, T.ramp(cb * DW_VEC, 1, DW_VEC)]
        inside = tirx.all(ih >= 0, ih < geo.H, iw >= 0, iw < geo.W)
        clamped = SRC[n, T.max(T.min(ih, geo.H - 1), 0), T.max(T.min(iw, geo.W - 1), 0), T.ramp(cb * DW_VEC, 1, DW_VEC)]
        return tirx.Select(inside, clamped, T.broadcast(T.Cast(d.x_dtype, 0), DW_VEC))

    def pair_madd(accv, xs, w):
        if d.isa.vnni:
            return T.call_llvm_pure_intrin("int32x8", VPDPWSSD, accv, xs, w)
        return accv + T.call_llvm_pure_intrin("int32x8", PMADDWD, xs, w)

    @T.macro
    def tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, single, checked):
        for j in T.unroll(owb):
            xa = T.meta_var(xbytes(SRC, n, oh, ow0 + j, cb, 2 * p, checked))
            xb = T.meta_var(xbytes(SRC, n, oh, ow0 + j, cb, 2 * p + 1, checked, single))
            acc[T.ramp((2 * j) * VEC, 1, VEC)] = pair_madd(
                acc[T.ramp((2 * j) * VEC, 1, VEC)],
                T.Cast("int16x16", T.Shuffle([xa, xb], PAIR_LO)),
                W16[p, cb, 0, T.ramp(0, 1, DW_VEC)],
            )
            acc[T.ramp((2 * j + 1) * VEC, 1, VEC)] = pair_madd(
                acc[T.ramp((2 * j + 1) * VEC, 1, VEC)],
                T.Cast("int16x16", T.Shuffle([xa, xb], PAIR_HI)),
                W16[p, cb, 1, T.ramp(0, 1, DW_VEC)],
            )

    @T.macro
    def tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked):
        for j in T.unroll(owb):
            x16 = T.meta_var(T.Cast("int16x16", xbytes(SRC, n, oh, ow0 + j, cb, kh * geo.KW + kw, checked)))
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
        if ep.requant:
            if nl == VEC:
                OUT[n, oh, ow, T.ramp(ch, 1, VEC)] = T.Cast(
                    ep.out_vec,
                    requantize_vec(acc[T.ramp((k) * VEC, 1, VEC)], R, ch, ep.qmin, ep.qmax, ep.f64, d.isa.avx512),
                )
            else:
                acc[T.ramp((k) * VEC, 1, VEC)] = requantize_vec(
                    acc[T.ramp((k) * VEC, 1, VEC)], R, ch, ep.qmin, ep.qmax, ep.f64, d.isa.avx512
                )
                for ln in T.unroll(nl):
                    OUT[n, oh, ow, ch + ln] = T.Cast(ep.out_dtype, accs[k * VEC + ln])
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
        if d.pairs:
            if d.unroll_taps:
                for p in T.unroll(d.NTAP // 2):
                    tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, False, checked)
            else:
                for p in T.serial(d.NTAP // 2):
                    tap_pair(SRC, W16, acc, n, oh, ow0, cb, p, owb, False, checked)
            if d.NTAP % 2 == 1:
                tap_pair(SRC, W16, acc, n, oh, ow0, cb, d.NTAP // 2, owb, True, checked)
        else:
            if d.unroll_taps:
                for kh in T.unroll(geo.KH):
                    for kw in T.unroll(geo.KW):
                        tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked)
            else:
                for kh in T.serial(geo.KH):
                    for kw in T.serial(geo.KW):
                        tap(SRC, W16, acc, n, oh, ow0, cb, kh, kw, owb, checked)
        for j in T.unroll(owb):
            if partial:
                if d.LAST_LANES > VEC:
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, VEC)
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j + 1, cb * DW_VEC + VEC, d.LAST_LANES - VEC)
                else:
                    store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, d.LAST_LANES)
            else:
                store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j, cb * DW_VEC, VEC)
                store8(R, OUT, acc, accs, n, oh, ow0 + j, 2 * j + 1, cb * DW_VEC + VEC, VEC)

    @T.macro
    def pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, owb, checked):
        for cb in T.serial(d.C_FULL):
            micro(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, cb, owb, False, checked)
        if d.LAST_LANES != DW_VEC:
            micro(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow0, d.C_FULL, owb, True, checked)

    @T.macro
    def output_row(SRC, W16, BIAS, R, OUT, acc, accs, n, oh):
        if oh >= d.OH_LO and oh < d.OH_HI:
            for ow in T.serial(d.OW_LO):  # left border
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow, 1, True)
            for ob in T.serial(d.NOWB):
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, d.OW_LO + ob * d.OWB, d.OWB, False)
            if d.OW_TAIL > 0:
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, d.OW_LO + d.NOWB * d.OWB, d.OW_TAIL, False)
            for ow in T.serial(geo.OW - d.OW_HI):  # right border
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, d.OW_HI + ow, 1, True)
        else:  # top / bottom border rows
            for ow in T.serial(geo.OW):
                pixel_block(SRC, W16, BIAS, R, OUT, acc, accs, n, oh, ow, 1, True)

    @T.macro
    def all_rows(SRC, W16, BIAS, R, OUT):
        """Rows of output pixels, chunked per task."""
        for tid in T.parallel(d.num_threads):
            acc = T.alloc_buffer((2 * max(d.OWB, 1) * VEC,), "int32", scope="local")
            accs = T.meta_var(acc)
            for ti in T.serial(d.CH):
                if tid * d.CH + ti < d.TOT:
                    output_row(SRC, W16, BIAS, R, OUT, acc, accs, (tid * d.CH + ti) // geo.OH,
                               (tid * d.CH + ti) % geo.OH)

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((geo.N, geo.H, geo.W, geo.C), d.x_dtype),
        W16: T.Buffer(d.W_SHAPE, "int16"),
        BIAS: T.Buffer((d.CP,), "int32"),
        ALO: T.Buffer((d.CP,), "int32"),
        AHI: T.Buffer((d.CP,), "int32"),
        MANT: T.Buffer((d.CP + VEC,), "int32"),
        C1: T.Buffer((d.CP,), "int64"),
        SH: T.Buffer((d.CP,), "int64"),
        C2: T.Buffer((d.CP,), "int32"),
        MD: T.Buffer((d.CP,), "float64"),
        OUT: T.Buffer((geo.N, geo.OH, geo.OW, geo.C), ep.out_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
        XPAD = T.alloc_buffer(d.XPAD_SHAPE, d.x_dtype)
        if not d.in_place:
            # ---- zero-padded copy of the input (spatial + channel padding) ----
            for nh in T.parallel(geo.N * geo.HP):
                for iw in T.serial(geo.WP):
                    if nh % geo.HP >= geo.pt and nh % geo.HP < geo.H + geo.pt and iw >= geo.pl and iw < geo.W + geo.pl:
                        for cv in T.serial(d.C_FULL):
                            XPAD[nh // geo.HP, nh % geo.HP, iw, T.ramp(cv * DW_VEC, 1, DW_VEC)] = X[
                                nh // geo.HP, nh % geo.HP - geo.pt, iw - geo.pl, T.ramp(cv * DW_VEC, 1, DW_VEC)
                            ]
                        for c in T.serial(d.CP - d.C_FULL * DW_VEC):
                            XPAD[nh // geo.HP, nh % geo.HP, iw, d.C_FULL * DW_VEC + c] = T.if_then_else(
                                d.C_FULL * DW_VEC + c < geo.C,
                                X[nh // geo.HP, nh % geo.HP - geo.pt, iw - geo.pl,
                                  T.min(d.C_FULL * DW_VEC + c, geo.C - 1)],
                                T.Cast(d.x_dtype, 0),
                            )
                    else:
                        for cv in T.serial(d.CB):
                            XPAD[nh // geo.HP, nh % geo.HP, iw, T.ramp(cv * DW_VEC, 1, DW_VEC)] = T.broadcast(
                                T.Cast(d.x_dtype, 0), DW_VEC
                            )
        if d.in_place:
            all_rows(X, W16, BIAS, R, OUT)
        else:
            all_rows(XPAD, W16, BIAS, R, OUT)
    return func


@functools.cache
def depthwise_quad_func(d: DepthwisePlan) -> tirx.PrimFunc:
    """32 channels at a time, tap quads (VNNI): PrimFunc (X, WQ, BIASQ, ALO, AHI, MANT, C1, SH, C2, MD, OUT)."""
    geo, ep = d.geo, d.epilogue
    def first_channel(cb):
        return T.min(cb * DWQ_VEC, geo.C - DWQ_VEC)

    def xcol(X, n, ih, iw, cb, checked):
        """x' bytes (uint8x32; int8 biased by 128) of input pixel (ih, iw), zero (x = 0) outside if `checked`."""
        ramp = T.ramp(first_channel(cb), 1, DWQ_VEC)
        if not checked:
            return xbyte(X[n, ih, iw, ramp], d.x_dtype, DWQ_VEC)
        inside = tirx.all(ih >= 0, ih < geo.H, iw >= 0, iw < geo.W)
        v = X[n, T.max(T.min(ih, geo.H - 1), 0), T.max(T.min(iw, geo.W - 1), 0), ramp]
        return xbyte(tirx.Select(inside, v, T.broadcast(T.Cast(d.x_dtype, 0), DWQ_VEC)), d.x_dtype, DWQ_VEC)

    def quad(X, n, ih, iw, cb, checked, h):
        """Quad vector h of the four input columns iw..iw+3."""
        cols = [xcol(X, n, ih, iw + i, cb, checked) for i in range(4)]
        lo, hi = (T.Shuffle([cols[0], cols[1]], BYTE_PAIRS[h // 2]), T.Shuffle([cols[2], cols[3]],
                                                                                BYTE_PAIRS[h // 2]))
        return T.reinterpret("int8x32", T.Shuffle([lo, hi], WORD_QUADS[h % 2]))

    def dpbusd(accv, x_bytes, w_words):
        return T.call_llvm_pure_intrin("int32x8", VPDPBUSD, accv, x_bytes, T.reinterpret("int8x32", w_words))

    @T.macro
    def tap_quad(X, WQ, acc, n, oh, ow0, cb, kh, k, j, h, checked):
        acc[T.ramp((4 * j + h) * VEC, 1, VEC)] = dpbusd(
            acc[T.ramp((4 * j + h) * VEC, 1, VEC)],
            quad(X, n, oh * geo.sh - geo.pt + kh * geo.dh, (ow0 + j) * geo.sw - geo.pl + 4 * k, cb, checked, h),
            WQ[cb, kh, k, h, T.ramp(0, 1, VEC)],
        )

    @T.macro
    def taps(X, WQ, acc, n, oh, ow0, cb, owb, checked):
        for kh in T.unroll(geo.KH):
            for k in T.unroll(d.NQ):
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
        v = T.meta_var(T.Shuffle([lo, hi], UNQUAD[q // 2]))
        if ep.requant:
            OUT[n, oh, ow, T.ramp(first_channel(cb) + 8 * q, 1, VEC)] = T.Cast(
                ep.out_vec, requantize_vec(v, R, first_channel(cb) + 8 * q, ep.qmin, ep.qmax, ep.f64, d.isa.avx512)
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
        for cb in T.serial(d.CB):
            for j in T.unroll(owb):
                for h in T.unroll(4):
                    acc[T.ramp((4 * j + h) * VEC, 1, VEC)] = BIASQ[T.ramp(cb * DWQ_VEC + h * VEC, 1, VEC)]
            taps(X, WQ, acc, n, oh, ow0, cb, owb, checked)
            for j in T.unroll(owb):
                store(R, OUT, acc, n, oh, ow0 + j, j, cb)

    @T.macro
    def output_row(X, WQ, BIASQ, R, OUT, acc, n, oh):
        if oh >= d.OH_LO and oh < d.OH_HI:
            for ow in T.serial(d.OW_LO):  # left border
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, ow, 1, True)
            for ob in T.serial(d.NOWB):
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, d.OW_LO + ob * d.OWB, d.OWB, False)
            if d.OW_TAIL > 0:
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, d.OW_LO + d.NOWB * d.OWB, d.OW_TAIL, False)
            for ow in T.serial(geo.OW - d.OW_HI):  # right border
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, d.OW_HI + ow, 1, True)
        else:  # top / bottom border rows
            for ow in T.serial(geo.OW):
                pixel_block(X, WQ, BIASQ, R, OUT, acc, n, oh, ow, 1, True)

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((geo.N, geo.H, geo.W, geo.C), d.x_dtype),
        WQ: T.Buffer((d.CB, geo.KH, d.NQ, 4, VEC), "int32"),
        BIASQ: T.Buffer((d.CB * DWQ_VEC,), "int32"),
        ALO: T.Buffer((geo.C,), "int32"),
        AHI: T.Buffer((geo.C,), "int32"),
        MANT: T.Buffer((geo.C + VEC,), "int32"),
        C1: T.Buffer((geo.C,), "int64"),
        SH: T.Buffer((geo.C,), "int64"),
        C2: T.Buffer((geo.C,), "int32"),
        MD: T.Buffer((geo.C,), "float64"),
        OUT: T.Buffer((geo.N, geo.OH, geo.OW, geo.C), ep.out_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
        for tid in T.parallel(d.num_threads):
            acc = T.alloc_buffer((4 * max(d.OWB, 1) * VEC,), "int32", scope="local")
            for ti in T.serial(d.CH):
                if tid * d.CH + ti < d.TOT:
                    output_row(X, WQ, BIASQ, R, OUT, acc, (tid * d.CH + ti) // geo.OH, (tid * d.CH + ti) % geo.OH)
    return func


def depthwise_conv(x_shape: tuple[int, ...], x_dtype: str, weight: np.ndarray, stride: tuple[int, int],
                   padding: tuple[int, int, int, int], dilation: tuple[int, int], bias: np.ndarray,
                   mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
                   wbits: int = 8, num_threads: int = NUM_THREADS,
                   isa: Isa | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    """A depthwise conv's (PrimFunc, constants)."""
    geo = ConvGeometry.of(x_shape, weight.shape, stride, padding, dilation)
    C = geo.C
    requant = mantissa is not None
    if not requant:
        out_dtype = "int32"
    f64 = f64_requant_is_exact(mantissa, shift, qmin, qmax, acc_bound(weight, bias, x_dtype))
    plan = DepthwisePlan(geo=geo, x_dtype=x_dtype, epilogue=Epilogue(requant, int(qmin), int(qmax), out_dtype, f64),
                         isa=isa or Isa(), wbits=wbits, num_threads=num_threads)
    if plan.quads:
        func = depthwise_quad_func(plan)
        # x' = x + 128 for int8 inputs: -128 * sum of the taps' weights goes into the bias
        bias = fold_input_offset(bias, weight, x_dtype, C)
        consts = epilogue_constants(requant_arrays(bias, mantissa, shift, qmin, qmax, C, C), requant)
        consts[0] = np.ascontiguousarray(consts[0][quad_channels(C).reshape(-1)])  # accumulator order
        return func, [pack_depthwise_quads(weight, C, geo.KH, geo.KW), *consts]
    func = depthwise_func(plan)
    taps = depthwise_taps(weight, plan.CP)
    w16 = pack_depthwise_int4(taps) if wbits == 4 else pack_depthwise_pairs(taps)
    return func, [w16, *epilogue_constants(requant_arrays(bias, mantissa, shift, qmin, qmax, C, plan.CP), requant)]
