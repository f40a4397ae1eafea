"""The x86 kernels' numpy weight packers and requantize constants, checked without TVM.

Each packed layout is read back with a plain loop over its documented layout (`lowbit.codegen.tvm.x86.packing`)
and compared with the weights it came from.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lowbit.codegen.tvm.x86.packing import (
    DW_VEC,
    DWQ_VEC,
    PAIR_CHANNELS,
    VEC,
    GemmLayout,
    depthwise_taps,
    pack_depthwise_int4,
    pack_depthwise_pairs,
    pack_depthwise_quads,
    pack_gemm_weight,
    quad_channels,
)
from lowbit.codegen.tvm.x86.requant import epilogue_constants, requant_arrays

# (G, OCg, ICg, KH, KW): pointwise, odd channels, 3x3 with a partial channel vector, grouped, a 1-channel stem
GEMM_SHAPES = [(1, 16, 32, 1, 1), (1, 13, 7, 1, 1), (1, 24, 3, 3, 3), (4, 4, 4, 3, 3), (2, 9, 5, 2, 3),
               (1, 8, 1, 5, 5)]


def _weights(rng: np.random.Generator, shape: tuple[int, ...], wbits: int) -> np.ndarray:
    lo, hi = (-8, 7) if wbits == 4 else (-128, 127)
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


def _k_value(weight: np.ndarray, lay: GemmLayout, g: int, oc: int, k: int, row: int) -> int:
    """The weight the GEMM multiplies at K index k of channel oc of group g: K in (kh, kw, ic) order, each kh row
    `row` values long (the tail of a row, and everything past the last row, is zero), channels past OCg zero."""
    kh, j = divmod(k, row)
    if oc >= lay.OCg or kh >= lay.KH or j >= lay.KWIC:
        return 0
    kw, ic = divmod(j, lay.ICg)
    return int(weight[g * lay.OCg + oc, ic, kh, kw])


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("kind", ["avx2", "vnni", "vnni-word-rows", "int4", "int4-word-rows"])
def test_gemm_weights_read_back(shape: tuple[int, ...], kind: str) -> None:
    G, OCg, ICg, KH, KW = shape
    wbits = 4 if kind.startswith("int4") else 8
    lay = GemmLayout(G, OCg, KH, KW, ICg, word_rows=kind.endswith("word-rows"), wbits=wbits,
                     byte_words=kind.startswith("vnni"))
    weight = _weights(np.random.default_rng(sum(shape)), (G * OCg, ICg, KH, KW), wbits)
    words = pack_gemm_weight(weight, lay)
    assert words.dtype == np.int32 and words.shape == (G, lay.OCB, lay.WK, VEC)
    for g in range(G):
        for cb in range(lay.OCB):
            for q in range(lay.WK):
                for lane in range(VEC):
                    word = int(words[g, cb, q, lane]) & 0xFFFFFFFF
                    oc = cb * VEC + lane
                    if kind == "avx2":  # int16 pairs, kh rows padded to whole pairs
                        got = [word & 0xFFFF, word >> 16]
                        want = [_k_value(weight, lay, g, oc, 2 * q + h, lay.KWICp) & 0xFFFF for h in (0, 1)]
                    elif wbits == 8:  # 4 bytes, byte b = K index 4q + b
                        got = [(word >> (8 * b)) & 0xFF for b in range(4)]
                        want = [_k_value(weight, lay, g, oc, 4 * q + b, lay.KROW) & 0xFF for b in range(4)]
                    else:  # byte b: w + 8 of K index 8q + b (low nibble), 8q + 4 + b (high nibble)
                        got = [(word >> (4 * n)) & 0xF for n in range(8)]
                        want = [_k_value(weight, lay, g, oc, 8 * q + b + 4 * half, lay.KROW) + 8
                                for b in range(4) for half in (0, 1)]
                    assert got == want, (g, oc, q)


def test_gemm_layout_sizes() -> None:
    lay = GemmLayout(G=1, OCg=13, KH=3, KW=3, ICg=3, word_rows=True, wbits=8, byte_words=True)
    assert (lay.KWIC, lay.KROW, lay.K, lay.KB, lay.OCB, lay.OCBP) == (9, 12, 36, 36, 2, 16)
    lay4 = GemmLayout(G=1, OCg=13, KH=3, KW=3, ICg=3, word_rows=False, wbits=4, byte_words=False)
    assert (lay4.KROW, lay4.K, lay4.KB, lay4.WK) == (9, 27, 32, 4)
    avx2 = GemmLayout(G=1, OCg=13, KH=3, KW=3, ICg=3, word_rows=False, wbits=8, byte_words=False)
    assert (avx2.KWICp, avx2.KPr, avx2.KP, avx2.WK, avx2.byte_x) == (10, 5, 15, 15, False)


@pytest.mark.parametrize("channels, kh, kw", [(32, 3, 3), (20, 3, 3), (40, 5, 5), (16, 1, 2)])
def test_depthwise_pairs_read_back(channels: int, kh: int, kw: int) -> None:
    weight = _weights(np.random.default_rng(channels), (channels, 1, kh, kw), 8)
    cp = -(-channels // DW_VEC) * DW_VEC
    packed = pack_depthwise_pairs(depthwise_taps(weight, cp))
    taps = kh * kw
    assert packed.shape == (-(-taps // 2), cp // DW_VEC, 2, DW_VEC)
    for pair in range(packed.shape[0]):
        for cb in range(packed.shape[1]):
            for half, lanes in enumerate(PAIR_CHANNELS):
                for i, lane in enumerate(lanes):  # (w_a, w_b) of the channel, interleaved
                    c = cb * DW_VEC + lane
                    for s in (0, 1):
                        tap = 2 * pair + s
                        want = int(weight[c, 0, tap // kw, tap % kw]) if c < channels and tap < taps else 0
                        assert packed[pair, cb, half, 2 * i + s] == want


@pytest.mark.parametrize("channels, kh, kw", [(32, 3, 3), (20, 3, 3), (16, 5, 5)])
def test_depthwise_int4_read_back(channels: int, kh: int, kw: int) -> None:
    weight = _weights(np.random.default_rng(channels), (channels, 1, kh, kw), 4)
    cp = -(-channels // DW_VEC) * DW_VEC
    words = pack_depthwise_int4(depthwise_taps(weight, cp))
    taps = kh * kw
    assert words.dtype == np.int16 and words.shape == (-(-(cp // DW_VEC) * taps // 4), DW_VEC)
    for cb in range(cp // DW_VEC):
        for tap in range(taps):
            t = cb * taps + tap
            for lane in range(DW_VEC):
                nibble = (int(words[t // 4, lane]) >> (4 * (t % 4))) & 0xF
                c = cb * DW_VEC + lane
                want = int(weight[c, 0, tap // kw, tap % kw]) if c < channels else 0
                assert nibble - 16 * (nibble >= 8) == want


@pytest.mark.parametrize("channels", [32, 40, 64, 96])
def test_quad_channels_cover_every_channel(channels: int) -> None:
    order = quad_channels(channels)
    for b, block in enumerate(order):
        start = min(b * DWQ_VEC, channels - DWQ_VEC)  # the last block overlaps the one before
        assert sorted(block.reshape(-1).tolist()) == list(range(start, start + DWQ_VEC))
    assert set(order.reshape(-1).tolist()) == set(range(channels))


@pytest.mark.parametrize("channels, kh, kw", [(32, 3, 3), (40, 3, 3), (64, 5, 5), (32, 3, 6)])
def test_depthwise_quads_read_back(channels: int, kh: int, kw: int) -> None:
    weight = _weights(np.random.default_rng(channels + kw), (channels, 1, kh, kw), 8)
    words = pack_depthwise_quads(weight, channels, kh, kw)
    order = quad_channels(channels)
    nq = -(-kw // 4)
    assert words.shape == (order.shape[0], kh, nq, 4, VEC)
    taps = words[..., np.newaxis].view(np.int8)  # [block, kh, quad, h, lane, tap of the quad]
    for b, row, k, h, lane in np.ndindex(*words.shape):
        c = order[b, h, lane]
        for t in range(4):
            want = int(weight[c, 0, row, 4 * k + t]) if 4 * k + t < kw else 0
            assert taps[b, row, k, h, lane, t] == want


def test_requant_constants_give_the_integer_rule() -> None:
    """The int64-lane epilogue: clamp acc to [alo, ahi], t = (acc * m + c1) >>> s (c1 = r + 2^62), and the low
    32 bits of t minus c2 (the low word of 2^(62-s)) equal clip((acc * m + r) >> s) on every tested acc."""
    rng = np.random.default_rng(3)
    n = 16
    mantissa = rng.integers(1, 1 << 30, n)
    shift = rng.integers(20, 45, n)
    qmin, qmax = -128, 127
    arrays = requant_arrays(np.zeros(n, np.int32), mantissa, shift, qmin, qmax, n, n)
    perm = np.concatenate([np.arange(0, VEC, 2), np.arange(1, VEC, 2)])  # c1 / sh are even-odd interleaved
    lane_of = {int(c): i for i, c in enumerate((np.arange(n) // VEC) * VEC + np.tile(perm, n // VEC))}
    accs = np.concatenate([rng.integers(-(1 << 31), 1 << 31, 200), [-(1 << 31), (1 << 31) - 1, 0, 1, -1]])
    for c in range(n):
        m, s = int(mantissa[c]), int(shift[c])
        c1, sh = int(arrays["c1"][lane_of[c]]), int(arrays["sh"][lane_of[c]])
        for acc in accs.tolist():
            a = min(max(acc, int(arrays["alo"][c])), int(arrays["ahi"][c]))
            t = ((a * m + c1) % (1 << 64)) >> sh
            y = (t & 0xFFFFFFFF) - (int(arrays["c2"][c]) & 0xFFFFFFFF)
            y = (y + (1 << 31)) % (1 << 32) - (1 << 31)
            want = min(max((acc * m + ((1 << s) >> 1)) >> s, qmin), qmax)
            assert min(max(y, qmin), qmax) == want, (c, acc)
    consts = epilogue_constants(arrays, requant=True)
    assert [str(a.dtype) for a in consts] == ["int32", "int32", "int32", "int32", "int64", "int64", "int32",
                                              "float64"]


def test_packing_imports_without_tvm() -> None:
    """The packers and the exactness checks load in a Python where `import tvm` fails."""
    code = ("import sys; sys.modules['tvm'] = None\n"
            "import lowbit.codegen.tvm.x86.packing, lowbit.codegen.tvm.x86.requant\n"
            "from lowbit.codegen.tvm.x86 import f64_requant_is_exact\n"
            "assert 'tvm' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n    import lowbit.codegen.tvm.x86.gemm\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('tvm was not blocked')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
