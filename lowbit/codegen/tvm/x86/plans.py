"""What each x86 kernel computes and how it tiles the work: frozen plans that the TIR builders read.

A plan is decided once per layer, in plain Python (no TVM), from the conv's geometry, the data types and the
instruction set. The kernel builders in `gemm` and `depthwise` only read its fields, so every size, tile and
choice a kernel makes is written down here, with its reason, and can be checked without compiling anything.

Names follow the math in the package docstring: M output rows (pixels), K reduction length, OC output channels,
G groups; an `...B` suffix counts vectors (blocks) and `...P` a padded size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .isa import Isa
from .packing import DW_VEC, DWQ_VEC, VEC, GemmLayout, cdiv

NUM_THREADS = 2  # default parallel tasks per loop nest; callers pass the target's core count
L1_TILE_BYTES = 16384  # the weights of one register tile that stay in a 32 KB L1 beside the activation rows


@dataclass(frozen=True)
class ConvGeometry:
    """An NHWC conv's shapes: input [N, H, W, C], weights [OC, ICg, KH, KW], output [N, OH, OW, OC];
    strides (sh, sw), top/left padding (pt, pl), dilations (dh, dw)."""

    N: int
    H: int
    W: int
    C: int
    OC: int
    ICg: int
    KH: int
    KW: int
    sh: int
    sw: int
    pt: int
    pl: int
    dh: int
    dw: int
    OH: int
    OW: int

    @classmethod
    def of(cls, x_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple[int, int],
           padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> ConvGeometry:
        """The geometry of a conv; `padding` is (top, left, bottom, right)."""
        N, H, W, C = (int(v) for v in x_shape)
        OC, ICg, KH, KW = (int(v) for v in weight_shape)
        sh, sw = (int(v) for v in stride)
        pt, pl, pb, pr = (int(v) for v in padding)
        dh, dw = (int(v) for v in dilation)
        OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
        OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
        if OH <= 0 or OW <= 0:
            raise ValueError("empty conv output")
        return cls(N, H, W, C, OC, ICg, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW)

    @property
    def HP(self) -> int:
        """Input rows the output reads, padding included."""
        return (self.OH - 1) * self.sh + (self.KH - 1) * self.dh + 1

    @property
    def WP(self) -> int:
        """Input columns the output reads, padding included."""
        return (self.OW - 1) * self.sw + (self.KW - 1) * self.dw + 1


@dataclass(frozen=True)
class Epilogue:
    """The fused requantization: y = clip((acc * m + 2^(s-1)) >> s, qmin, qmax) as `out_dtype`, or acc itself
    (int32) where not `requant`; `f64` where `f64_requant_is_exact` (the float64 form is then used);
    `residual` a fused add, `lut` a fused table lookup (GEMM only; `kernel_api.Residual`, `kernel_api.Lut`)."""

    requant: bool
    qmin: int
    qmax: int
    out_dtype: str
    f64: bool
    residual: Any = None
    lut: Any = None

    @property
    def out_vec(self) -> str:
        return f"{self.out_dtype}x{VEC}"


def choose_tile(M: int, OCB: int, wbits: int = 8, registers: int = 16, byte_pairs: bool = False) -> tuple[int, int]:
    """(MR rows, NV int32x8 column vectors) of the register tile; AVX-512 has 32 vector registers, not 16."""
    if registers == 32 and wbits == 8 and M > 2 and OCB > 1:
        if OCB % 4 == 0:
            return 6, 4  # 24 accumulators + 4 weight vectors + a broadcast
        if OCB % 3 == 0:
            return 8, 3
        return 12, 2
    if byte_pairs and M > 2 and OCB % 3 == 0:
        return 3, 3  # 9 accumulators + 3 weight vectors + broadcast, product, ones: 2-3% over 4x2 on MiniLM
    if (wbits == 4 or byte_pairs) and M > 2 and OCB > 1:
        return 4, 2  # 8 accumulators + 4 unpacked weight vectors + broadcasts fit the 16 ymm registers
    if M <= 2:
        return max(M, 1), max(1, min(OCB, 4))
    if OCB == 1:
        return 8, 1
    if OCB % 2 != 0 and OCB % 3 == 0:
        return 4, 3
    return 6, 2


@dataclass(frozen=True)
class GemmPlan:
    """A GEMM-shaped conv (pointwise, general, grouped) or dense layer: M = N*OH*OW rows, G groups of OCg
    output channels, K = KH*KW*ICg, computed over MR x (NV*8) register tiles, `num_threads` parallel tasks."""

    geo: ConvGeometry
    G: int
    x_dtype: str
    x_buf_shape: tuple[int, ...]  # the input buffer's shape ([N, IN] for dense)
    out_shape: tuple[int, ...]  # the output buffer's shape ([N, OUT] for dense)
    epilogue: Epilogue
    isa: Isa
    wbits: int = 8
    num_threads: int = NUM_THREADS
    # AVX2, int8 weights within `ir.weights.U8S8_EXACT_WEIGHT_MAX`: bytes x' * w by PMADDUBSW (exact for them) and
    # PMADDWD with ones, 32 products per pair of instructions, on the VNNI layout; else int16 pairs, 16 each
    byte_pairs: bool = False

    @property
    def byte_words(self) -> bool:
        """int8 weights as bytes, 4 K values per word (VNNI, or `byte_pairs`)."""
        return self.wbits == 8 and (self.isa.vnni or self.byte_pairs)

    @property
    def OCg(self) -> int:
        return self.geo.OC // self.G

    @property
    def M(self) -> int:
        return self.geo.N * self.geo.OH * self.geo.OW

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 conv without stride or padding: the input is the GEMM's activation matrix itself."""
        g = self.geo
        return (g.KH == 1 and g.KW == 1 and g.sh == 1 and g.sw == 1 and g.pt == 0 and g.pl == 0 and g.OH == g.H
                and g.OW == g.W and self.G == 1)

    @property
    def layout(self) -> GemmLayout:
        g = self.geo
        byte_x = self.wbits == 4 or self.byte_words
        # im2col by whole words where a kh row's K values come 4 bytes at a time from the input: its (kw, ic) run
        # is contiguous (one group, no dilation) or channels come in fours. Rows are then zero-padded (zero
        # weights) to whole words; a word may read up to 3 bytes past its row, which the zero weights cancel.
        word_rows = byte_x and not self.is_pointwise and ((self.G == 1 and g.dw == 1) or g.ICg % 4 == 0)
        return GemmLayout(self.G, self.OCg, g.KH, g.KW, g.ICg, word_rows, self.wbits, self.byte_words)

    # -- im2col by words -------------------------------------------------------------------------------------

    @property
    def ROW_WORDS(self) -> int:
        return self.layout.KROW // 4

    @property
    def ROW_CHUNKS(self) -> int:
        """16-byte (4-word) loads per kh row: where the row's bytes are contiguous, else none."""
        g = self.geo
        return self.ROW_WORDS // 4 if (self.G == 1 and g.dw == 1) or g.ICg % 16 == 0 else 0

    @property
    def ROW_SINGLES(self) -> int:
        """Single-word loads per kh row (after the 16-byte ones)."""
        return self.ROW_WORDS - 4 * self.ROW_CHUNKS

    # -- register tiles and their order ----------------------------------------------------------------------

    @property
    def NP(self) -> int:
        """Output channels padded per group, all groups."""
        return self.G * self.layout.OCBP

    @property
    def tile(self) -> tuple[int, int]:
        return choose_tile(self.M, self.layout.OCB, self.wbits, self.isa.registers, self.byte_pairs)

    @property
    def MR(self) -> int:
        return self.tile[0]

    @property
    def NV(self) -> int:
        return self.tile[1]

    @property
    def NCT_FULL(self) -> int:
        """Column tiles of NV whole vectors."""
        return self.layout.OCB // self.NV

    @property
    def NV_TAIL(self) -> int:
        """Vectors of the last, narrower column tile (0: none)."""
        return self.layout.OCB - self.NCT_FULL * self.NV

    @property
    def NCT(self) -> int:
        return self.NCT_FULL + (1 if self.NV_TAIL else 0)

    @property
    def LAST_LANES(self) -> int:
        """Channels in a group's last vector."""
        return self.OCg - (self.layout.OCB - 1) * VEC

    @property
    def NRB(self) -> int:
        """Full blocks of MR rows."""
        return self.M // self.MR

    @property
    def MR_TAIL(self) -> int:
        return self.M - self.NRB * self.MR

    @property
    def TOT(self) -> int:
        """Tiles of full row blocks."""
        return self.G * self.NRB * self.NCT

    @property
    def TOT_T(self) -> int:
        """Tiles of the last MR_TAIL rows."""
        return self.G * self.NCT if self.MR_TAIL else 0

    @property
    def rows_outer(self) -> bool:
        """Tile order: keep the larger operand streaming once."""
        KP = self.layout.KP
        return self.G * self.layout.OCBP * KP <= self.G * self.M * KP or self.NRB <= 2

    @property
    def KCW(self) -> int:
        """Weight words per K chunk. A register tile's weights (NV vectors of WK words) are read once per row
        block; where they pass L1_TILE_BYTES (MiniLM's FFN-down: 48 KB at K = 1536), every row block reads them
        from L2 again and the AVX2 kernel runs at half speed (measured). Each task then sweeps its tiles once per
        chunk of K, keeping the partial sums in a scratch buffer between chunks."""
        wk, tile_bytes = self.layout.WK, self.NV * VEC * 4 * self.layout.WK
        if tile_bytes <= L1_TILE_BYTES:
            return wk
        return max(1, L1_TILE_BYTES // (self.NV * VEC * 4))

    @property
    def NKC(self) -> int:
        """K chunks (1: no chunking)."""
        return cdiv(self.layout.WK, self.KCW)

    @property
    def RB(self) -> int:
        """Row blocks per task where tasks pack their own rows, the MR_TAIL rows' block last."""
        return cdiv(self.NRB + (1 if self.MR_TAIL else 0), self.num_threads)

    @property
    def CH(self) -> int:
        """Tiles per task."""
        if self.pack_in_tasks:
            return self.RB * self.NCT
        return cdiv(self.TOT + self.TOT_T, self.num_threads)

    # -- input padding and packing ---------------------------------------------------------------------------

    @property
    def use_xpad(self) -> bool:
        """Read a zero-padded copy of the input; also where words may read past a row, so reads stay in bounds."""
        g = self.geo
        need_pad = not (g.pt == 0 and g.pl == 0 and (g.OH - 1) * g.sh + (g.KH - 1) * g.dh < g.H
                        and (g.OW - 1) * g.sw + (g.KW - 1) * g.dw < g.W)
        return not self.is_pointwise and (need_pad or (self.layout.word_rows and self.layout.KWIC % 4 != 0))

    @property
    def XPAD_SIZE(self) -> int:
        g = self.geo
        return g.N * g.HP * g.WP * g.C + 4 if self.use_xpad else 1

    @property
    def LZ(self) -> int:
        """Columns of a padded row: LZ left zeros, CW copied input columns, RZ right zeros."""
        return min(self.geo.pl, self.geo.WP)

    @property
    def CW(self) -> int:
        return max(0, min(self.geo.W, self.geo.WP - self.geo.pl))

    @property
    def RZ(self) -> int:
        return self.geo.WP - self.LZ - self.CW

    @property
    def unroll_im2col(self) -> bool:
        return self.layout.KPr <= 24

    @property
    def x_direct(self) -> bool:
        """Pointwise convs read the input's words in place (no packing pass); int8 ones flip each word to x + 128,
        two more instructions per word and row: below 64 channels the packing pass costs less (measured). Not
        for `byte_pairs`: with two multiplies per product word, the flip in the loop cost MiniLM's FFN-up 20%
        against packing (AVX2, measured)."""
        C = self.geo.C
        return self.layout.byte_x and self.is_pointwise and C == self.layout.KB and (
            self.x_dtype == "uint8" or (C >= 64 and not self.byte_pairs))

    @property
    def x_flip(self) -> bool:
        return self.x_direct and self.x_dtype == "int8"

    @property
    def pack_in_tasks(self) -> bool:
        """Where each task's tiles cover whole row blocks (rows outer), it packs its own rows first: no separate
        parallel pass (each costs a launch and a barrier) and the rows are still in cache for the GEMM."""
        lay = self.layout
        return (lay.byte_x and not self.x_direct and (self.is_pointwise or lay.word_rows) and self.rows_outer
                and self.G == 1)

    @property
    def XP_SHAPE(self) -> tuple[int, ...]:
        """The packed activations' buffer (unused where the input is read in place)."""
        return (1,) if self.x_direct else (self.G, self.M, self.layout.XW)

    @property
    def PK_FULL(self) -> int:
        """AVX2 pointwise packing: 16-channel vectors per row."""
        return (self.geo.C // 16) if self.is_pointwise else 0

    @property
    def PK_REM(self) -> int:
        """AVX2 pointwise packing: the remaining int16 pairs per row."""
        return self.layout.KP - self.PK_FULL * 8


def inside(size: int, out: int, pad: int, stride: int, reach: int) -> tuple[int, int]:
    """[lo, hi): the outputs whose taps (input offsets 0..reach from out * stride - pad) all fall inside the input."""
    lo = cdiv(pad, stride)
    return lo, max(lo, min(out, (size - 1 + pad - reach) // stride + 1))


def column_blocks(lo: int, hi: int, width: int = 4) -> tuple[int, int, int]:
    """(block width, full blocks, tail columns) of the output columns [lo, hi)."""
    width = min(width, hi - lo)
    blocks = (hi - lo) // width if width else 0
    return width, blocks, hi - lo - blocks * width


@dataclass(frozen=True)
class DepthwisePlan:
    """A depthwise conv (groups == C == OC), NHWC, one task per chunk of output rows.

    Without `quads`, 16 channels at a time (int8 weights: taps in pairs, int4: one tap at a time); with `quads`
    (VNNI, int8 weights, channels a multiple of 8 and at least 32, no column dilation) 32 channels at a time,
    four taps of a kernel row per vpdpbusd."""

    geo: ConvGeometry
    x_dtype: str
    epilogue: Epilogue
    isa: Isa
    wbits: int = 8
    num_threads: int = NUM_THREADS

    @property
    def quads(self) -> bool:
        g = self.geo
        return self.isa.vnni and self.wbits == 8 and g.C % VEC == 0 and g.C >= DWQ_VEC and g.dw == 1

    @property
    def TOT(self) -> int:
        """Output rows, all images."""
        return self.geo.N * self.geo.OH

    @property
    def CH(self) -> int:
        """Output rows per task."""
        return cdiv(self.TOT, self.num_threads)

    # -- 16 channels at a time ------------------------------------------------------------------------------

    @property
    def CB(self) -> int:
        """Channel blocks (of 16 channels, 32 with quads; the last quad block overlaps the one before)."""
        return cdiv(self.geo.C, DWQ_VEC if self.quads else DW_VEC)

    @property
    def NTAP(self) -> int:
        return self.geo.KH * self.geo.KW

    @property
    def pairs(self) -> bool:
        """int8 weights: two taps per multiply-add (vpmaddwd / vpdpwssd)."""
        return self.wbits == 8

    @property
    def NPAIR(self) -> int:
        return cdiv(self.NTAP, 2)

    @property
    def NQ4(self) -> int:
        """int4: int16 words per channel lane (4 nibbles each)."""
        return cdiv(self.CB * self.NTAP, 4)

    @property
    def CP(self) -> int:
        """Channels padded to whole blocks of 16."""
        return self.CB * DW_VEC

    @property
    def C_FULL(self) -> int:
        return self.geo.C // DW_VEC

    @property
    def LAST_LANES(self) -> int:
        return self.geo.C - (self.CB - 1) * DW_VEC

    @property
    def in_place(self) -> bool:
        """Read X itself, border pixels with bounds checks; otherwise (channels that do not fill whole vectors)
        from a zero-padded copy, where every read is in bounds."""
        return self.geo.C % DW_VEC == 0

    @property
    def OFF_H(self) -> int:
        """Input row of output row 0's first tap, as the source buffer (X, or the padded copy) is indexed."""
        return self.geo.pt if self.in_place else 0

    @property
    def OFF_W(self) -> int:
        return self.geo.pl if self.in_place else 0

    @property
    def OH_RANGE(self) -> tuple[int, int]:
        """The output rows whose taps all fall inside the input (all of them for the padded copy)."""
        g = self.geo
        if self.quads or self.in_place:
            return inside(g.H, g.OH, g.pt, g.sh, (g.KH - 1) * g.dh)
        return 0, g.OH

    @property
    def OW_RANGE(self) -> tuple[int, int]:
        """The output columns whose taps all fall inside the input (all of them for the padded copy)."""
        g = self.geo
        if self.quads:
            return inside(g.W, g.OW, g.pl, g.sw, self.SPAN - 1)
        if self.in_place:
            return inside(g.W, g.OW, g.pl, g.sw, (g.KW - 1) * g.dw)
        return 0, g.OW

    @property
    def OH_LO(self) -> int:
        return self.OH_RANGE[0]

    @property
    def OH_HI(self) -> int:
        return self.OH_RANGE[1]

    @property
    def OW_LO(self) -> int:
        return self.OW_RANGE[0]

    @property
    def OW_HI(self) -> int:
        return self.OW_RANGE[1]

    @property
    def OWB(self) -> int:
        """Inside columns per block of outputs computed together."""
        return column_blocks(*self.OW_RANGE)[0]

    @property
    def NOWB(self) -> int:
        return column_blocks(*self.OW_RANGE)[1]

    @property
    def OW_TAIL(self) -> int:
        return column_blocks(*self.OW_RANGE)[2]

    @property
    def XPAD_SHAPE(self) -> tuple[int, ...]:
        g = self.geo
        return (1,) if self.in_place else (g.N, g.HP, g.WP, self.CP)

    @property
    def unroll_taps(self) -> bool:
        return self.NTAP <= 16

    @property
    def W_SHAPE(self) -> tuple[int, ...]:
        """The packed weights (see `packing.pack_depthwise_int4` / `pack_depthwise_pairs`)."""
        return (self.NQ4, DW_VEC) if self.wbits == 4 else (self.NPAIR, self.CB, 2, DW_VEC)

    # -- 32 channels at a time, tap quads (VNNI) ----------------------------------------------------------------

    @property
    def NQ(self) -> int:
        """Tap quads per kernel row."""
        return cdiv(self.geo.KW, 4)

    @property
    def SPAN(self) -> int:
        """Input columns a kernel row reads."""
        return 4 * self.NQ
