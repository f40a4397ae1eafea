"""`x86.gemv_int4`: float32 x times group-wise INT4 weights, against a float64 evaluation of the same dequantized
weights; and its packer `pack_int4_gemv`, which needs no TVM.

Tolerance: |y - y64| <= 2e-6 * sum_i |x_i * w_i| per output. The kernel sums q * x per group in float32 (at
most 128 terms) and folds each group with two float32 FMAs, so its error is a few float32 ulps (6e-8) of that
magnitude times a slowly growing factor of the sum's length; measured here: under 1e-7 on every case.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lowbit.codegen.tvm.x86.int4_groups import dequantize_int4, pack_int4_gemv
from lowbit.errors import LowbitError

RTOL = 2e-6


def _weights(out_f: int, in_f: int, group: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = -(-in_f // group)
    q = rng.integers(0, 16, (out_f, in_f)).astype(np.uint8)
    zero = rng.integers(0, 16, (out_f, groups)).astype(np.uint8)
    scale = (rng.random((out_f, groups)) * 0.05 + 1e-3).astype(np.float32)
    q[0, :] = 15  # extremes: the top nibble (bit 31 of its word) and the largest zero point
    zero[0, :] = 0
    q[1, :] = 0
    zero[1, :] = 15
    return q, scale, zero


def test_pack_int4_gemv_layout() -> None:
    q, scale, zero = _weights(16, 24, 8, 0)
    packed = pack_int4_gemv(q, scale, zero, 8)
    assert packed.w.shape == (2, 3, 8) and packed.w.dtype == np.int32
    word = int(packed.w[1, 2, 5]) & 0xFFFFFFFF  # output 8 + 5, input columns 16..23
    assert [(word >> (4 * j)) & 15 for j in range(8)] == list(q[13, 16:24])
    assert packed.scale[1, 2, 5] == scale[13, 2]
    assert packed.neg_zs[1, 2, 5] == np.float32(-(np.float32(zero[13, 2]) * scale[13, 2]))


@pytest.mark.parametrize(("shape", "message"), [
    ((12, 32), "output features"),  # rows not a multiple of 8
    ((16, 30), "input features"),  # columns not a multiple of 8
])
def test_pack_int4_gemv_rejects_bad_shapes(shape: tuple[int, int], message: str) -> None:
    q = np.zeros(shape, np.uint8)
    groups = -(-shape[1] // 32)
    with pytest.raises(LowbitError, match=message):
        pack_int4_gemv(q, np.ones((shape[0], groups), np.float32), np.zeros((shape[0], groups), np.uint8), 32)


def test_pack_int4_gemv_rejects_bad_values() -> None:
    q, scale, zero = _weights(8, 64, 32, 1)
    with pytest.raises(LowbitError, match="outside"):
        pack_int4_gemv(q + 1, scale, zero, 32)
    with pytest.raises(LowbitError, match="expected"):
        pack_int4_gemv(q, scale[:, :1], zero, 32)
    with pytest.raises(LowbitError, match="multiple of 8"):
        pack_int4_gemv(q, scale, zero, 12)


tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_int4 import Int4GemvPlan, gemv_int4_func  # noqa: E402

TARGET = tvm.target.Target(parse_target("llvm -mcpu=native", threads=2))


def _run(x: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, **tiles: object) -> np.ndarray:
    plan = Int4GemvPlan.of(x.shape[0], x.shape[1], q.shape[0], group, num_threads=2)
    plan = dataclasses.replace(plan, **tiles)
    packed = pack_int4_gemv(q, scale, zero, group)
    lib = tvm.compile(tvm.IRModule({"main": gemv_int4_func(plan).with_attr("global_symbol", "main")}), target=TARGET)
    args = [tvm.runtime.tensor(a) for a in (x, *packed.arrays(), np.zeros((x.shape[0], q.shape[0]), np.float32))]
    lib["main"](*args)
    return args[-1].numpy()


def _check(y: np.ndarray, x: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> None:
    w = dequantize_int4(q, scale, zero, group)
    x64 = x.astype(np.float64)
    err = np.abs(y - x64 @ w.T) / (np.abs(x64) @ np.abs(w).T)
    assert err.max() <= RTOL, f"max error {err.max():.2e} of sum |x * w|"


# SmolLM2-135M's linears [in -> out]: 576 -> 576 (q, o), 576 -> 192 (k, v), 576 -> 1536 (gate, up), 1536 -> 576
# (down). in = 576 leaves a short last group at group 128. The full 1536-wide shapes run at M = 1 only; smaller
# ones with the same in-features and tiles keep the test fast (a compile per case).
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("in_f", "out_f"), SHAPES)
def test_gemv_int4_decode(in_f: int, out_f: int, group: int) -> None:
    q, scale, zero = _weights(out_f, in_f, group, in_f + out_f + group)
    x = np.random.default_rng(group).standard_normal((1, in_f)).astype(np.float32)
    _check(_run(x, q, scale, zero, group), x, q, scale, zero, group)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("in_f", "out_f"), [(576, 192), (1536, 64)])
def test_gemv_int4_rows(in_f: int, out_f: int, group: int) -> None:
    """M = 7: one 4-row register tile and a 3-row tail."""
    q, scale, zero = _weights(out_f, in_f, group, in_f + group)
    x = np.random.default_rng(7).standard_normal((7, in_f)).astype(np.float32)
    x[3] *= 1e3  # rows of very different magnitude share the tile
    _check(_run(x, q, scale, zero, group), x, q, scale, zero, group)


@pytest.mark.parametrize("tiles", [dict(unpack="shift"), dict(NV=1, KS=4, MR=2)])
def test_gemv_int4_tile_variants(tiles: dict[str, object]) -> None:
    q, scale, zero = _weights(64, 136, 32, 3)  # K = 4 full groups and a short one of 8
    x = np.random.default_rng(5).standard_normal((5, 136)).astype(np.float32)
    _check(_run(x, q, scale, zero, 32, **tiles), x, q, scale, zero, 32)


def test_gemv_int4_plan_rejects_bad_tiles() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        Int4GemvPlan.of(1, 64, 24, 32, 2, nv=2)
    with pytest.raises(LowbitError, match="group"):
        Int4GemvPlan.of(1, 64, 24, 0, 2)


def test_gemv_int4_accumulates_into_y() -> None:
    """accumulate=True (the decoder's residual adds): Y + x W^T, Y's old value kept."""
    q, scale, zero = _weights(64, 136, 32, 4)
    x = np.random.default_rng(6).standard_normal((3, 136)).astype(np.float32)
    y0 = np.random.default_rng(8).standard_normal((3, 64)).astype(np.float32)
    plan = Int4GemvPlan.of(3, 136, 64, 32, num_threads=2, accumulate=True)
    lib = tvm.compile(tvm.IRModule({"main": gemv_int4_func(plan).with_attr("global_symbol", "main")}), target=TARGET)
    args = [tvm.runtime.tensor(a) for a in (x, *pack_int4_gemv(q, scale, zero, 32).arrays(), y0)]
    lib["main"](*args)
    _check(args[-1].numpy() - y0, x, q, scale, zero, 32)
