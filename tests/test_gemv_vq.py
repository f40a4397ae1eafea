"""`x86.gemv_vq`: float32 x times vector-quantized weights (vq2: one 256-entry codebook of 4 columns; vq3: plus a
16-entry residual), against float64 x @ W.dequantize().T; and its packer `pack_vq_gemv`, which needs no TVM.

Tolerance: |y - y64| <= 2e-6 * sum_i |x_i * w_i| per output (y64: float64 products of x and the float32 weights
`VQWeights.dequantize` returns). The kernel forms each codeword in float32 exactly as `dequantize` does (the same
products and, for vq3, the same sum), sums up to K products in float32 and applies the row scale once at the end
(dequantize applies it per weight: one more float32 rounding), so its error is a few float32 ulps (6e-8) of that
magnitude times a slowly growing factor of the sum's length; measured here: under 1e-7 on every case.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.codegen.tvm.x86.vq_layout import pack_indices_words, pack_vq_gemv
from lowbit.errors import LowbitError
from lowbit.ir.vq_weights import VQStage, VQWeights

RTOL = 2e-6
PRESETS = {"vq2": (8,), "vq3": (8, 4)}


def _weights(out_f: int, in_f: int, bits: tuple[int, ...], seed: int, v: int = 4) -> VQWeights:
    rng = np.random.default_rng(seed)
    stages = []
    for s, b in enumerate(bits):
        codebook = rng.integers(-128, 128, (1 << b, v)).astype(np.int8)
        codebook[0] = -128  # extremes: the most negative codeword and the last index
        codebook[-1] = 127
        indices = rng.integers(0, 1 << b, (out_f, in_f // v)).astype(np.uint16)
        indices[0] = (1 << b) - 1  # every bit of every index word set
        stages.append(VQStage(codebook, np.float32(0.02 / (1 + 7 * s)), indices))
    return VQWeights((rng.random(out_f) * 2 + 0.1).astype(np.float32), tuple(stages), in_f)


def test_pack_vq_gemv_layout() -> None:
    w = _weights(8, 64, (8, 4), 0)
    packed = pack_vq_gemv(w)
    assert [a.dtype for a in packed.arrays()] == [np.float32] * 3 + [np.int32] * 2
    assert packed.indices[0].shape == (8, 4) and packed.indices[1].shape == (8, 2) and packed.segments == (8,)
    word = int(packed.indices[0][5, 2]) & 0xFFFFFFFF  # row 5, vectors 8..11, one byte each
    assert [(word >> (8 * b)) & 255 for b in range(4)] == list(w.stages[0].indices[5, 8:12])
    word = int(packed.indices[1][5, 1]) & 0xFFFFFFFF  # row 5, vectors 8..15, one nibble each
    assert [(word >> (4 * b)) & 15 for b in range(8)] == list(w.stages[1].indices[5, 8:16])
    np.testing.assert_array_equal(packed.codebooks[1], w.stages[1].codewords()[None])
    np.testing.assert_array_equal(pack_indices_words(np.array([[1, 0, 3, 2] * 4], np.uint16), 2),
                                  np.array([[0xB1B1B1B1]], np.uint32).view(np.int32))  # 0b10_11_00_01 per byte


def test_pack_vq_gemv_rejects_what_the_kernel_cannot_run() -> None:
    with pytest.raises(LowbitError, match="multiple of 32"):
        pack_vq_gemv(_weights(8, 48, (8, 4), 1))  # one word of 4-bit indices spans 8 vectors of 4 columns
    with pytest.raises(LowbitError, match="3-bit"):
        pack_vq_gemv(_weights(8, 64, (3,), 1))
    with pytest.raises(LowbitError, match="vectors of 2"):
        pack_vq_gemv(_weights(8, 64, (8,), 1, v=2))


def test_pack_vq_gemv_stacks_segments() -> None:
    """q, k and v stacked: rows in order, one codebook per part."""
    parts = [_weights(16, 64, (8, 4), s) for s in range(3)]
    packed = pack_vq_gemv(parts)
    assert packed.segments == (16, 16, 16) and packed.codebooks[0].shape == (3, 256, 4)
    np.testing.assert_array_equal(packed.codebooks[0][2], parts[2].stages[0].codewords())
    np.testing.assert_array_equal(packed.indices[1][16:32], pack_vq_gemv(parts[1]).indices[1])
    with pytest.raises(LowbitError, match="differ"):
        pack_vq_gemv([parts[0], _weights(16, 64, (8,), 0)])


tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_vq import VQGemvPlan, gemv_vq_func  # noqa: E402


def test_plan_for_packed_reads_the_operands() -> None:
    packed = pack_vq_gemv([_weights(16, 64, (8, 4), 0), _weights(32, 64, (8, 4), 1)])
    p = VQGemvPlan.for_packed(packed, 3, 2, accumulate=True)
    assert (p.M, p.K, p.N, p.v, p.bits, p.segments, p.accumulate) == (3, 64, 48, 4, (8, 4), (16, 32), True)


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(LowbitError, match="2 stages"):
        VQGemvPlan.of(1, 64, 8, 2, 4, (8,), 1)
    with pytest.raises(LowbitError, match="does not divide"):
        VQGemvPlan.of(1, 64, 12, 1, 4, 8, 1, nr=8)
    with pytest.raises(LowbitError, match="summing"):
        VQGemvPlan.of(1, 64, 12, 1, 4, 8, 1, segments=(8, 8))
    with pytest.raises(LowbitError, match="KS"):
        VQGemvPlan.of(1, 64, 8, 1, 4, 8, 1, ks=16)

TARGET = tvm.target.Target(parse_target("llvm -mcpu=native", threads=2))


def _run(x: np.ndarray, w: VQWeights | list[VQWeights], y0: np.ndarray | None = None, **tiles: object) -> np.ndarray:
    """Y = x W^T, or with `y0` Y = y0 + x W^T (accumulate); a list of weights is stacked (one segment each)."""
    packed = pack_vq_gemv(w)
    p = VQGemvPlan.for_packed(packed, x.shape[0], num_threads=2, accumulate=y0 is not None)
    if tiles:  # the same shapes with other tiles
        p = VQGemvPlan.of(p.M, p.K, p.N, p.stages, p.v, p.bits, p.num_threads, p.accumulate, segments=p.segments,
                          **tiles)
    lib = tvm.compile(tvm.IRModule({"main": gemv_vq_func(p).with_attr("global_symbol", "main")}), target=TARGET)
    y = np.zeros((x.shape[0], p.N), np.float32) if y0 is None else y0.copy()
    args = [tvm.runtime.tensor(a) for a in (x, *packed.arrays(), y)]
    lib["main"](*args)
    return args[-1].numpy()


def _check(y: np.ndarray, x: np.ndarray, w: VQWeights | list[VQWeights], y0: np.ndarray | None = None) -> None:
    """With `y0`: y = y0 + x W^T, allowing also the final add's rounding (half an ulp of the result)."""
    parts = [w] if isinstance(w, VQWeights) else w
    w64, x64 = np.concatenate([p.dequantize() for p in parts]).astype(np.float64), x.astype(np.float64)
    want = x64 @ w64.T + (0 if y0 is None else y0)
    err = (np.abs(y - want) - (0 if y0 is None else 2.0 ** -24 * np.abs(want))) / (np.abs(x64) @ np.abs(w64).T)
    assert err.max() <= RTOL, f"max error {err.max():.2e} of sum |x * w|"


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gemv_vq(preset: str, rows: int, accumulate: bool) -> None:
    """576 -> 192 (SmolLM2's k and v projections), decode and a prefill chunk, Y = or Y += x W^T."""
    w = _weights(192, 576, PRESETS[preset], rows)
    rng = np.random.default_rng(rows + accumulate)
    x = rng.standard_normal((rows, 576)).astype(np.float32)
    x[rows // 2] *= 1e3  # rows of very different magnitude share the register tile
    y0 = rng.standard_normal((rows, 192)).astype(np.float32) if accumulate else None
    _check(_run(x, w, y0), x, w, y0)


@pytest.mark.parametrize(("in_f", "out_f"), [(576, 576), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gemv_vq_decode_smollm2_shapes(preset: str, in_f: int, out_f: int) -> None:
    w = _weights(out_f, in_f, PRESETS[preset], in_f + out_f)
    x = np.random.default_rng(in_f).standard_normal((1, in_f)).astype(np.float32)
    _check(_run(x, w), x, w)


@pytest.mark.parametrize("plan", [dict(mr=2), dict(nr=4, mr=3, ks=3), dict(mr=1, nr=2, ks=8)])
def test_gemv_vq_tails(plan: dict[str, object]) -> None:
    """Row tails (M = 5 in tiles of 2 or 3), outputs not a multiple of 8 (36), partial sums that do not divide a
    step's vectors, other index widths and v = 8."""
    for bits, v in (((8, 4), 4), ((2,), 8), ((4, 1), 4)):
        w = _weights(36, 256, bits, 9, v=v)
        x = np.random.default_rng(5).standard_normal((5, 256)).astype(np.float32)
        _check(_run(x, w, **plan), x, w)


@pytest.mark.parametrize("rows", [1, 32])
def test_gemv_vq_segments(rows: int) -> None:
    """q, k and v of different codebooks in one call (SmolLM2's 576 -> 576 + 192 + 192, scaled down by 4)."""
    parts = [_weights(n, 576, (8, 4), n + i) for i, n in enumerate((144, 48, 48))]
    x = np.random.default_rng(rows).standard_normal((rows, 576)).astype(np.float32)
    _check(_run(x, parts), x, parts)
