"""The x86 kernels' operand layouts and the numpy packers that build them (no TVM here, so they test alone).

GEMM weights (conv weights [OC, ICg, KH, KW] of G groups; K flattened as (kh, kw, ic), see `GemmLayout`) are
int32 words `[G, OC/8, words, 8]`: the word for step q and output-channel lane c holds
- AVX2 int8: the int16 pair (w[k], w[k+1]), k = 2q (low half first), each kh row zero-padded to whole pairs;
- VNNI int8: 4 bytes, byte b the weight of K index 4q+b;
- int4: 8 nibbles stored as w+8, byte b holding K index 8q+b (low nibble) and 8q+4+b (high nibble).
Depthwise weights are int16 tap pairs, int4 nibbles, or (VNNI) int8 tap quads: see each packer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VEC = 8  # int32 lanes in a ymm register
NUM_THREADS = 2  # default parallel tasks per loop nest; callers pass the target's core count
DW_VEC = 16  # depthwise channels per step: int16x16 products, 2 x int32x8 accumulators
DWQ_VEC = 32  # depthwise channels per step with VNNI tap quads (one int8x32 vector)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


@dataclass(frozen=True)
class GemmLayout:
    """How the GEMM's operands are laid out, shared by the weight packers and the kernel.

    K is flattened as (kh, kw, ic) in rows of KROW values per kh (zero-padded to whole words where im2col copies
    words); the weights and activations are int32 words: int16 pairs (AVX2 int8, KP words per row), 4 bytes
    (VNNI int8, KQ words) or 8 nibbles (int4, KQ2 words)."""

    G: int
    OCg: int
    KH: int
    KW: int
    ICg: int
    word_rows: bool  # kh rows zero-padded to whole 4-byte words
    wbits: int
    byte_words: bool  # int8 weights as bytes, 4 K values per word (VNNI's layout), not int16 pairs

    @property
    def KWIC(self) -> int:
        """K values per kh row: KW * ICg."""
        return self.KW * self.ICg

    @property
    def KWICp(self) -> int:
        """A kh row's K values padded to whole int16 pairs."""
        return self.KWIC + (self.KWIC & 1)

    @property
    def KPr(self) -> int:
        """int16 pairs per kh row."""
        return self.KWICp // 2

    @property
    def KP(self) -> int:
        """int16 pairs per GEMM row (AVX2 int8 path)."""
        return self.KH * self.KPr

    @property
    def KROW(self) -> int:
        """K values per kh row."""
        return cdiv(self.KWIC, 4) * 4 if self.word_rows else self.KWIC

    @property
    def K(self) -> int:
        return self.KH * self.KROW

    @property
    def KB(self) -> int:
        """K padded to whole weight words: 8 values (int4) or 4 (int8)."""
        return cdiv(self.K, 8) * 8 if self.wbits == 4 else cdiv(self.K, 4) * 4

    @property
    def KQ2(self) -> int:
        """int4 weight words per output channel: 8 K values each."""
        return self.KB // 8

    @property
    def KQ(self) -> int:
        """VNNI int8 weight words per output channel: 4 K values each."""
        return self.KB // 4

    @property
    def byte_x(self) -> bool:
        """Activations packed as bytes x' (4 per int32 word), not int16 pairs."""
        return self.wbits == 4 or self.byte_words

    @property
    def WK(self) -> int:
        """Weight words per output channel."""
        return self.KQ2 if self.wbits == 4 else self.KQ if self.byte_words else self.KP

    @property
    def XW(self) -> int:
        """int32 activation words per GEMM row."""
        return self.KB // 4 if self.byte_x else self.KP

    @property
    def OCB(self) -> int:
        """Output-channel vectors per group."""
        return cdiv(self.OCg, VEC)

    @property
    def OCBP(self) -> int:
        """Output channels per group padded to whole vectors."""
        return self.OCB * VEC




def check_int4(weight: np.ndarray) -> None:
    w = np.asarray(weight)
    if w.size and (int(w.min()) < -8 or int(w.max()) > 7):
        raise ValueError("weight_bits=4 needs weights in [-8, 7]")


def pack_gemm_weight_pairs(weight: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """AVX2 int8 GEMM weights [G, OCB, KP, 8] int32: the word for pair step q, lane c holds the int16 pair of K
    indices (2q, 2q+1) of channel c (K order (kh, kw, ic), each kh row zero-padded to KWICp values)."""
    G, OCg, KH, KW, ICg = lay.G, lay.OCg, lay.KH, lay.KW, lay.ICg
    w = np.asarray(weight).astype(np.int64)
    wt = w.reshape(G, OCg, ICg, KH, KW).transpose(0, 1, 3, 4, 2).reshape(G, OCg, KH, KW * ICg)
    wp = np.zeros((G, lay.OCB * VEC, KH, lay.KWICp), np.int64)
    wp[:, :OCg, :, : KW * ICg] = wt
    wp = wp.reshape(G, lay.OCB, VEC, lay.KP, 2).transpose(0, 1, 3, 2, 4)  # [G, OCB, KP, VEC, 2]
    return np.ascontiguousarray(wp.astype(np.int16)).view(np.int32).reshape(G, lay.OCB, lay.KP, VEC)


def gemm_k_order(weight: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """Weights [G, OCg, K] in the GEMM's K order: (kh, kw, ic), each kh row zero-padded to KROW values."""
    G, OCg, KH, KW, ICg = lay.G, lay.OCg, lay.KH, lay.KW, lay.ICg
    wt = np.asarray(weight).astype(np.int64).reshape(G, OCg, ICg, KH, KW).transpose(0, 1, 3, 4, 2)
    rows = np.zeros((G, OCg, KH, lay.KROW), np.int64)
    rows[..., : KW * ICg] = wt.reshape(G, OCg, KH, KW * ICg)
    return rows.reshape(G, OCg, KH * lay.KROW)


def pack_gemm_weight_vnni(weight: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """VNNI int8 GEMM weights [G, OCB, KB/4, 8] int32: byte b of the word for step q, lane c holds the
    weight of K index 4q+b of channel c (K order of gemm_k_order, zero-padded to KB)."""
    wt = gemm_k_order(weight, lay)
    return pack_k_major_vnni(wt, lay.OCB, lay.KB)


def pack_k_major_vnni(rows: np.ndarray, ocb: int, kb: int) -> np.ndarray:
    """[G, N, K] int8 values (K already in the GEMM's order) -> [G, ocb, kb/4, 8] int32 words, N zero-padded
    to ocb*8 and K to kb: byte b of the word for step q, lane c holds value [c, 4q+b]."""
    G, n, k = rows.shape
    wp = np.zeros((G, ocb * VEC, kb), np.int8)
    wp[:, :n, :k] = rows
    wp = wp.reshape(G, ocb, VEC, kb // 4, 4).transpose(0, 1, 3, 2, 4)  # [g, ocb, q, lane, byte]
    return np.ascontiguousarray(wp).view(np.int32).reshape(G, ocb, kb // 4, VEC)


def pack_gemm_weight_int4(weight: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """int4 GEMM weights [G, OCB, KB/8, 8] int32: byte b of the word for step q, lane c holds w+8 of
    K index 8q+b (low nibble) and 8q+4+b (high nibble) of channel c (K order of gemm_k_order)."""
    G, KB = lay.G, lay.KB
    wt = gemm_k_order(weight, lay)
    wp = np.full((G, lay.OCB * VEC, KB), 8, np.int64)  # padding: w=0
    wp[:, : lay.OCg, : wt.shape[2]] = wt + 8
    wp = wp.reshape(G, lay.OCB, VEC, KB // 8, 2, 4)  # [g, ocb, lane, q, half, byte]
    word = (wp[:, :, :, :, 0, :] | (wp[:, :, :, :, 1, :] << 4)) << (8 * np.arange(4))
    word = word.sum(axis=-1).transpose(0, 1, 3, 2)  # [g, ocb, q, lane]
    return np.ascontiguousarray(word.astype(np.uint32).view(np.int32))


def pack_gemm_weight(weight: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """The GEMM weights in the words the micro-kernel of `lay` reads."""
    if lay.wbits == 4:
        return pack_gemm_weight_int4(weight, lay)
    if lay.byte_words:
        return pack_gemm_weight_vnni(weight, lay)
    return pack_gemm_weight_pairs(weight, lay)


# -- depthwise --------------------------------------------------------------------------------------------------

# int8 depthwise, taps in pairs: the input bytes of taps a and b are interleaved (channel by channel, the
# first and second 8 channels of a block apart) and widened to int16, so that one vpmaddwd / vpdpwssd sums
# both taps' products per channel; weights are prepacked as the matching (w_a, w_b) pairs.
PAIR_CHANNELS = (list(range(VEC)), list(range(VEC, DW_VEC)))

# int8 depthwise with VNNI, 32 channels at a time: lane l of quad vector h holds channel QUAD_CHANNELS[h][l]
QUAD_CHANNELS = ([0, 1, 2, 3, 16, 17, 18, 19], [4, 5, 6, 7, 20, 21, 22, 23], [8, 9, 10, 11, 24, 25, 26, 27],
                 [12, 13, 14, 15, 28, 29, 30, 31])


def depthwise_taps(weight: np.ndarray, cp: int) -> np.ndarray:
    """Depthwise weights [C, 1, KH, KW] as int16 [KH*KW, cp/16, 16] (tap, channel block, lane), channels
    zero-padded to cp."""
    C, _, KH, KW = np.asarray(weight).shape
    w16 = np.zeros((KH, KW, cp), np.int16)
    w16[:, :, :C] = np.asarray(weight).reshape(C, KH, KW).transpose(1, 2, 0)
    return w16.reshape(KH * KW, cp // DW_VEC, DW_VEC)


def pack_depthwise_pairs(w: np.ndarray) -> np.ndarray:
    """[taps, CB, 16] int16 -> [ceil(taps/2), CB, 2, 16]: per tap pair (a, b) and channel block, the vectors
    (w_a, w_b interleaved) for the channels in PAIR_CHANNELS order (a zero tap pads an odd count)."""
    taps, cb, _ = w.shape
    padded = np.zeros((2 * cdiv(taps, 2), cb, DW_VEC), np.int16)
    padded[:taps] = w
    pairs = padded.reshape(-1, 2, cb, DW_VEC)  # [pair, a/b, CB, 16]
    out = np.stack([pairs[:, :, :, ch].transpose(0, 2, 3, 1).reshape(-1, cb, DW_VEC) for ch in PAIR_CHANNELS],
                   axis=2)  # [pair, CB, half, 8 channels x (a, b)]
    return np.ascontiguousarray(out)


def pack_depthwise_int4(w: np.ndarray) -> np.ndarray:
    """[taps, CB, 16] int16 values in [-8, 7] -> [ceil(CB*taps/4), 16] int16 words: nibble t = cb*taps + tap
    of lane i (channel cb*16+i) lives in word t//4, bits 4*(t%4).., two's complement."""
    taps, cb, _ = w.shape
    nib = w.transpose(1, 0, 2).reshape(cb * taps, DW_VEC).astype(np.int64) & 0xF
    nq = cdiv(cb * taps, 4)
    padded = np.zeros((nq * 4, DW_VEC), np.int64)
    padded[: nib.shape[0]] = nib
    word = (padded.reshape(nq, 4, DW_VEC) << (4 * np.arange(4)).reshape(1, 4, 1)).sum(axis=1)
    return np.ascontiguousarray(word.astype(np.uint16).view(np.int16))


def quad_channels(C: int) -> np.ndarray:
    """[blocks, 4, 8]: the channel in lane l of quad vector h of each 32-channel block (the last block starts at
    C - 32)."""
    starts = np.minimum(np.arange(cdiv(C, DWQ_VEC)) * DWQ_VEC, C - DWQ_VEC)
    return starts.reshape(-1, 1, 1) + np.array(QUAD_CHANNELS).reshape(1, 4, VEC)


def pack_depthwise_quads(weight: np.ndarray, C: int, KH: int, KW: int) -> np.ndarray:
    """[blocks, KH, ceil(KW/4), 4, 8] int32: the word for block b, row kh, tap quad k, vector h, lane l holds the
    weights of taps 4k..4k+3 (zero past KW) of channel quad_channels(C)[b, h, l]."""
    nq = cdiv(KW, 4)
    w = np.zeros((C, KH, 4 * nq), np.int8)
    w[:, :, :KW] = np.asarray(weight).reshape(C, KH, KW)
    quads = w[quad_channels(C)].reshape(-1, 4, VEC, KH, nq, 4)  # [b, h, l, kh, k, tap]
    return np.ascontiguousarray(quads.transpose(0, 3, 4, 1, 2, 5)).view(np.int32)[..., 0]
