"""The GEMM's activation packing (im2col) as TIR macros: from the NHWC input to the int32 words of `GemmLayout`.

Activations become, per GEMM row (output pixel) and group, XW int32 words: bytes x' (uint8: x, int8: x + 128)
4 per word for the VNNI and int4 kernels, int16 pairs (x[k] & 0xffff) | (x[k+1] << 16) for AVX2 int8. Where a
kh row's (kw, ic) run is contiguous or channels come in fours, im2col copies whole 4-byte words (each kh row of
K zero-padded to a word); pointwise convs pack rows as they are; a zero-padded copy of the input serves convs
with padding.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from .isa import Expr, word4, xbyte
from .plans import GemmPlan


class View4:
    """A flat buffer read as [N, H, W, C] (no second buffer declared: it may go unused)."""

    def __init__(self, flat: Any, h: int, w: int, c: int) -> None:
        self.flat, self.h, self.w, self.c = flat, h, w, c

    def __getitem__(self, index: tuple[Expr, Expr, Expr, Expr]) -> Expr:
        n, y, x, ch = index
        return self.flat[((n * self.h + y) * self.w + x) * self.c + ch]


def activation_macros(p: GemmPlan) -> tuple[Any, Any, Any]:
    """(pad_copy, pack_rows, pack_activations): the TIR macros that pack the GEMM's activations for plan `p`."""
    geo, lay = p.geo, p.layout

    @T.macro
    def im2col_pair(SRC, XP32, nh, ow, g, kh, jp):
        XP32[g, nh * geo.OW + ow, kh * lay.KPr + jp] = T.bitwise_or(
            T.bitwise_and(
                T.Cast(
                    "int32",
                    SRC[nh // geo.OH, nh % geo.OH * geo.sh + kh * geo.dh, ow * geo.sw + (2 * jp) // geo.ICg * geo.dw,
                        g * geo.ICg + (2 * jp) % geo.ICg],
                ),
                0xFFFF,
            ),
            T.shift_left(
                T.if_then_else(
                    2 * jp + 1 < lay.KWIC,
                    T.Cast(
                        "int32",
                        SRC[
                            nh // geo.OH,
                            nh % geo.OH * geo.sh + kh * geo.dh,
                            ow * geo.sw + T.min(2 * jp + 1, lay.KWIC - 1) // geo.ICg * geo.dw,
                            g * geo.ICg + T.min(2 * jp + 1, lay.KWIC - 1) % geo.ICg,
                        ],
                    ),
                    0,
                ),
                16,
            ),
        )

    def pw_byte(XF, m, k):
        return xbyte(XF[m * geo.C + T.min(k, geo.C - 1)], p.x_dtype, 1)

    def src_byte(SRC, nh, ow, g, k):
        kk = T.min(k, lay.K - 1)
        return xbyte(
            SRC[nh // geo.OH, nh % geo.OH * geo.sh + kk // lay.KWIC * geo.dh,
                ow * geo.sw + kk % lay.KWIC // geo.ICg * geo.dw, g * geo.ICg + kk % geo.ICg],
            p.x_dtype,
            1,
        )

    @T.macro
    def im2col_word(SRC, XP, nh, ow, g, k):
        XP[g, nh * geo.OW + ow, k] = word4(src_byte, 4 * k, lay.K, SRC, nh, ow, g)

    def src_words(SRCF, HS, WS, nh, ow, g, kh, k, words):
        """`words` int32 words of x' from the flat input (HS x WS pixels): K values k.. of row kh."""
        off = (((nh // geo.OH * HS + nh % geo.OH * geo.sh + kh * geo.dh) * WS + ow * geo.sw + k // geo.ICg * geo.dw)
               * geo.C + g * geo.ICg + k % geo.ICg)
        xb = xbyte(SRCF[T.ramp(off, 1, 4 * words)], p.x_dtype, 4 * words)
        return T.reinterpret("int32" if words == 1 else f"int32x{words}", xb)

    @T.macro
    def im2col_row(SRCF, HS, WS, XP, nh, ow):
        for g in T.serial(p.G):
            for kh in T.serial(geo.KH):
                for q in T.serial(p.ROW_CHUNKS):
                    XP[g, nh * geo.OW + ow, T.ramp(kh * p.ROW_WORDS + 4 * q, 1, 4)] = src_words(
                        SRCF, HS, WS, nh, ow, g, kh, 16 * q, 4
                    )
                for j in T.unroll(p.ROW_SINGLES):
                    XP[g, nh * geo.OW + ow, kh * p.ROW_WORDS + 4 * p.ROW_CHUNKS + j] = src_words(
                        SRCF, HS, WS, nh, ow, g, kh, 16 * p.ROW_CHUNKS + 4 * j, 1
                    )
            for j in T.serial(lay.XW - geo.KH * p.ROW_WORDS):
                XP[g, nh * geo.OW + ow, geo.KH * p.ROW_WORDS + j] = 0

    @T.macro
    def pack_row(XF, XP, m):
        """Row m of a pointwise conv's input as words of bytes x', K zero-padded to KB."""
        for q in T.serial(geo.C // 32):
            XP[0, m, T.ramp(q * 8, 1, 8)] = T.reinterpret(
                "int32x8", xbyte(XF[T.ramp(m * geo.C + q * 32, 1, 32)], p.x_dtype, 32)
            )
        if geo.C % 32 >= 16:
            XP[0, m, T.ramp(geo.C // 32 * 8, 1, 4)] = T.reinterpret(
                "int32x4", xbyte(XF[T.ramp(m * geo.C + geo.C // 32 * 32, 1, 16)], p.x_dtype, 16)
            )
        for k in T.serial(geo.C // 4 - geo.C // 16 * 4):
            XP[0, m, geo.C // 16 * 4 + k] = T.reinterpret(
                "int32", xbyte(XF[T.ramp(m * geo.C + geo.C // 16 * 16 + 4 * k, 1, 4)], p.x_dtype, 4)
            )
        for k in T.serial(lay.XW - geo.C // 4):
            XP[0, m, geo.C // 4 + k] = word4(pw_byte, geo.C // 4 * 4 + 4 * k, geo.C, XF, m)

    @T.macro
    def pack_rows(XF, XPADF, XP, lo, hi):
        """Rows lo..hi-1 of the packed input: a pointwise conv's bytes, or im2col by words."""
        for m in T.serial(lo, hi):
            if p.is_pointwise:
                pack_row(XF, XP, m)
            elif p.use_xpad:
                im2col_row(XPADF, geo.HP, geo.WP, XP, m // geo.OW, m % geo.OW)
            else:
                im2col_row(XF, geo.H, geo.W, XP, m // geo.OW, m % geo.OW)

    @T.macro
    def fill_zero(DST, start, count):
        for q in T.serial(count // 32):
            DST[T.ramp(start + 32 * q, 1, 32)] = T.broadcast(T.Cast(p.x_dtype, 0), 32)
        for i in T.serial(count % 32):
            DST[start + count // 32 * 32 + i] = T.Cast(p.x_dtype, 0)

    @T.macro
    def copy(DST, dst, SRCF, src, count):
        for q in T.serial(count // 32):
            DST[T.ramp(dst + 32 * q, 1, 32)] = SRCF[T.ramp(src + 32 * q, 1, 32)]
        for i in T.serial(count % 32):
            DST[dst + count // 32 * 32 + i] = SRCF[src + count // 32 * 32 + i]

    @T.macro
    def pad_copy(XF, XPADF):
        """The zero-padded input, row by row: zeros, the input row, zeros (whole rows of zeros above and below)."""
        for nh in T.parallel(geo.N * geo.HP):
            if nh % geo.HP >= geo.pt and nh % geo.HP < geo.H + geo.pt:
                fill_zero(XPADF, nh * geo.WP * geo.C, p.LZ * geo.C)
                copy(XPADF, (nh * geo.WP + p.LZ) * geo.C, XF,
                     (nh // geo.HP * geo.H + nh % geo.HP - geo.pt) * geo.W * geo.C, p.CW * geo.C)
                fill_zero(XPADF, (nh * geo.WP + p.LZ + p.CW) * geo.C, p.RZ * geo.C)
            else:
                fill_zero(XPADF, nh * geo.WP * geo.C, geo.WP * geo.C)


    @T.macro
    def pack_activations(X, XF, XPADF, SRC, XP32, XP32A):
        """The whole packing pass, before the GEMM (none where the input is read in place or tasks pack their own
        rows): bytes x' (VNNI, int4) or int16 pairs (AVX2 int8), im2col where the conv is not pointwise."""
        if lay.byte_x:
            # bytes x' (uint8: x, int8: x + 128), K zero-padded to KB
            if p.x_direct or p.pack_in_tasks:
                T.evaluate(0)
            elif p.is_pointwise or lay.word_rows:
                for m in T.parallel(p.M):
                    pack_rows(XF, XPADF, XP32A, m, m + 1)
            else:
                for nh in T.parallel(geo.N * geo.OH):
                    for ow in T.serial(geo.OW):
                        for g in T.serial(p.G):
                            if lay.KB <= 64:
                                for k in T.unroll(lay.XW):
                                    im2col_word(SRC, XP32A, nh, ow, g, k)
                            else:
                                for k in T.serial(lay.XW):
                                    im2col_word(SRC, XP32A, nh, ow, g, k)
        elif p.is_pointwise:
            X2 = T.decl_buffer((p.M, geo.C), p.x_dtype, data=X.data)
            for m in T.parallel(p.M):
                for q in T.serial(p.PK_FULL):
                    XP32[0, m, T.ramp(q * 8, 1, 8)] = T.reinterpret(
                        "int32x8", T.Cast("int16x16", X2[m, T.ramp(q * 16, 1, 16)])
                    )
                for q in T.serial(p.PK_REM):
                    XP32[0, m, p.PK_FULL * 8 + q] = T.bitwise_or(
                        T.bitwise_and(T.Cast("int32", X2[m, p.PK_FULL * 16 + q * 2]), 0xFFFF),
                        T.shift_left(
                            T.if_then_else(
                                p.PK_FULL * 16 + q * 2 + 1 < geo.C,
                                T.Cast("int32", X2[m, T.min(p.PK_FULL * 16 + q * 2 + 1, geo.C - 1)]),
                                0,
                            ),
                            16,
                        ),
                    )
        else:
            for nh in T.parallel(geo.N * geo.OH):
                for ow in T.serial(geo.OW):
                    for g in T.serial(p.G):
                        for kh in T.serial(geo.KH):
                            if p.unroll_im2col:
                                for jp in T.unroll(lay.KPr):
                                    im2col_pair(SRC, XP32, nh, ow, g, kh, jp)
                            else:
                                for jp in T.serial(lay.KPr):
                                    im2col_pair(SRC, XP32, nh, ow, g, kh, jp)

    return pad_copy, pack_rows, pack_activations
