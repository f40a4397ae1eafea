"""The I-BERT integer kernels (pure numpy): exact isqrt, integer softmax and integer LayerNorm against the float ops,
with their stated error bounds and the int64 bounds of every intermediate at the dtype extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.ir.intmath import ISQRT_LIMIT, bit_length, isqrt
from lowbit.ir.ops.layer_norm import LN_MAX_WIDTH, integer_layer_norm, integer_layer_norm_int, layer_norm_constants
from lowbit.ir.ops.softmax import (
    SOFTMAX_EXP_BITS,
    SOFTMAX_MAX_KEYS,
    exp2_polynomial,
    integer_softmax,
    integer_softmax_int,
    softmax_constants,
    softmax_error_bound,
)


def test_isqrt_is_exact_floor_sqrt() -> None:
    rng = np.random.default_rng(0)
    squares = np.arange(0, 1 << 31, 9973, dtype=np.int64) ** 2
    n = np.concatenate([rng.integers(0, ISQRT_LIMIT, 100_000), rng.integers(0, 1 << 24, 50_000),
                        squares[squares < ISQRT_LIMIT], np.maximum(squares - 1, 0), squares[squares < ISQRT_LIMIT] + 1,
                        [0, 1, 2, 3, 4, 5, ISQRT_LIMIT - 1, (1 << 60) - 1, 1 << 60]]).astype(np.int64)
    n = n[n < ISQRT_LIMIT]
    got = isqrt(n)
    assert [int(v) for v in got] == [math.isqrt(int(v)) for v in n]
    assert [int(v) for v in bit_length(n[:1000])] == [int(v).bit_length() for v in n[:1000]]
    with pytest.raises(ValueError):
        isqrt(np.array([ISQRT_LIMIT], dtype=np.int64))


def _float_softmax(q: np.ndarray, scale: float, mask: np.ndarray | None) -> np.ndarray:
    x = torch.tensor(q.astype(np.float64) * scale)
    if mask is not None:
        x = x + torch.tensor((1.0 - mask) * -10000.0).reshape(mask.shape[0], *[1] * (q.ndim - 2), mask.shape[1])
    return torch.softmax(x, -1).numpy()


@pytest.mark.parametrize("out_bits", [8, 16])
def test_masked_softmax_skipping_padded_keys_is_exact(out_bits: int) -> None:
    """The kernel computes only the keys up to each sample's last unmasked one; `record` makes it compute every key."""
    rng = np.random.default_rng(3)
    q = rng.integers(-(2 ** 31), 2 ** 31, (6, 3, 16, 16), dtype=np.int64).astype(np.int32)
    q[:3] = (q[:3] >> 16).astype(np.int32)  # and scores close together, where many keys survive
    mask = (np.arange(16)[None, :] < np.array([[16], [1], [5], [9], [16], [3]])).astype(np.int64)
    mask[1] = 0  # every key masked
    mask[3, 2] = 0  # a hole before the last kept key
    consts = softmax_constants(0.01)
    fast = integer_softmax_int(q, consts, mask, out_bits=out_bits)
    full = integer_softmax_int(q, consts, mask, record={}, out_bits=out_bits)
    assert fast.dtype == full.dtype and np.array_equal(fast, full)
    assert np.all(fast[5, ..., 3:] == 0) and fast[1].any(axis=-1).all()


@pytest.mark.parametrize("scale", [0.2, 0.03, 1e-4])
def test_integer_softmax_against_float(scale: float) -> None:
    rng = np.random.default_rng(1)
    q = np.clip(np.round(rng.normal(0, 4, (3, 4, 9, 128)) / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    mask = (rng.random((3, 128)) < 0.6).astype(np.int64)
    mask[:, 0] = 1
    mask[2] = 0  # every key masked: the float op leaves the row unmasked, and so does the kernel
    p, p_scale = integer_softmax(q, scale, mask)
    assert p.dtype == np.uint8 and p_scale == 1 / 255
    keep = np.broadcast_to(mask[:, None, None, :] != 0, q.shape).copy()
    keep[2] = True
    assert np.all(p[~keep] == 0)  # masked keys get exactly zero
    want = _float_softmax(q, scale, mask)
    bound = softmax_error_bound(softmax_constants(scale), 128)
    assert bound < 2.3e-3 and np.abs(p * p_scale - want).max() <= bound
    row_error = np.abs(p.sum(-1).astype(np.int64) - 255)
    assert np.all(row_error <= keep.sum(-1) / 2)  # each of the n keys rounds by at most half a step
    assert row_error.mean() < 4
    p16, s16 = integer_softmax(q, scale, mask, out_bits=16)
    assert p16.dtype == np.uint16 and s16 == 1 / 65535 and np.all(p16[~keep] == 0)
    assert np.abs(p16 * s16 - want).max() <= softmax_error_bound(softmax_constants(scale), 128, 16) < 2e-4
    assert np.abs(p16.sum(-1) * s16 - 1).max() < 1e-3


def test_integer_softmax_certain_key_and_the_published_polynomial_error() -> None:
    q = np.array([[0, -10 ** 6, 5 * 10 ** 6, 3]], dtype=np.int32)  # one key far above: probability exactly 1
    assert integer_softmax(q, 0.01)[0].tolist() == [[0, 0, 255, 0]]
    # The fitted polynomials: degree 2 (I-BERT's order) is near 1.8e-3 relative, degree 3 under 1e-4.
    assert 1e-3 < exp2_polynomial(2)[1] < 2e-3 and exp2_polynomial(3)[1] < 1e-4


def test_integer_softmax_int64_bounds_at_the_extremes() -> None:
    consts = softmax_constants(1e-9)  # the smallest scale: x * m uses every mantissa bit
    q = np.full((1, SOFTMAX_MAX_KEYS), 2 ** 31 - 1, dtype=np.int32)
    q[0, 0] = -(2 ** 31)
    rec: dict[str, int] = {}
    p = integer_softmax_int(q, consts, record=rec)
    assert rec["x"] == 2 ** 32 - 1 and rec["x*m"] < 2 ** 61
    g = 2 ** SOFTMAX_EXP_BITS
    assert rec["y"] <= g + g // 256 and rec["e"] <= rec["y"]
    assert rec["sum"] < 2 ** 51 and rec["num"] < 2 ** 51 + 2 ** 39 and rec["min_sum"] > 2 ** 29
    assert p[0, 0] == 0 and p.sum() <= 255 + SOFTMAX_MAX_KEYS // 2
    rec = {}
    integer_softmax_int(q, consts, record=rec, out_bits=16)
    assert rec["num"] < 2 ** 51 + 2 ** 47
    consts = softmax_constants(1e3)  # the largest useful scale: x saturates z at once
    rec = {}
    integer_softmax_int(np.array([[-(2 ** 31), 2 ** 31 - 1]], dtype=np.int32), consts, record=rec)
    assert rec["x*m"] < 2 ** 61
    with pytest.raises(ValueError):
        integer_softmax_int(np.zeros((1, SOFTMAX_MAX_KEYS + 1), dtype=np.int32), consts)


def _float_ln(q: np.ndarray, scale: float, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    return torch.nn.functional.layer_norm(torch.tensor(q.astype(np.float64) * scale), (q.shape[-1],),
                                          torch.tensor(gamma), torch.tensor(beta), eps).numpy()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_integer_layer_norm_against_float(dtype: type) -> None:
    rng = np.random.default_rng(2)
    width = 384
    gamma, beta = rng.normal(0.8, 0.5, width), rng.normal(0, 0.3, width)  # some gamma negative
    x = rng.normal(0, 1.5, (64, width))
    x[:, 7] *= 30  # an outlier channel, as in BERT's residual stream
    info = np.iinfo(dtype)
    scale = np.abs(x).max() / info.max
    q = np.round(x / scale).astype(dtype)
    want = _float_ln(q, scale, gamma, beta, 1e-12)
    out_scale = np.abs(want).max() / 127
    got = integer_layer_norm(q, gamma, beta, 1e-12, scale, out_scale)
    assert got.dtype == np.int8
    # Within half an output step plus 1e-3 of one: only the output rounding is visible.
    assert np.abs(got * out_scale - want).max() <= out_scale * (0.5 + 1e-3)


def test_integer_layer_norm_constant_rows_and_eps() -> None:
    width, gamma, beta = 16, np.linspace(-2, 2, 16), np.linspace(-1, 1, 16)
    q = np.stack([np.full(width, 7), np.zeros(width), np.r_[np.zeros(15), 1]]).astype(np.int8)
    for eps in (0.0, 1e-5, 1.0):  # variance 0: the output is beta; eps = 1 is large against the row's variance
        got = integer_layer_norm(q, gamma, beta, eps, 0.01, 0.02)
        want = _float_ln(q, 0.01, gamma, beta, eps) if eps > 0 else np.vstack([np.tile(beta, (2, 1)),
                                                                               _float_ln(q[2:], 0.01, gamma, beta, 0)])
        assert np.abs(got * 0.02 - np.clip(want, -128 * 0.02, 127 * 0.02)).max() <= 0.02 * (0.5 + 1e-3)
    assert np.array_equal(got[0], np.round(beta / 0.02))


def test_integer_layer_norm_int64_bounds_at_the_extremes() -> None:
    rng = np.random.default_rng(3)
    for width, bits, dtype in ((LN_MAX_WIDTH, 32, np.int32), (384, 8, np.int8), (4096, 16, np.int16)):
        info = np.iinfo(dtype)
        q = np.where(np.arange(width) % 2 == 0, info.min, info.max).astype(dtype)[None]  # the largest variance
        one = np.zeros((1, width), dtype=dtype)
        one[0, 0] = info.min  # the largest |d| against sqrt(W)
        gamma = np.full(width, 1.0)
        consts = layer_norm_constants(width, bits, gamma * rng.choice([-1, 1], width), np.full(width, 2.0 ** 40),
                                      1e-12, 1e-6, 2.0 ** -14)
        for rows in (q, one):
            rec: dict[str, int] = {}
            integer_layer_norm_int(rows, consts, record=rec)
            assert rec["w"] < 2 ** 62 and 2 ** 30 <= rec["r_min"] <= rec["r_max"] < 2 ** 31
            assert rec["num"] < 2 ** 61 and rec["n"] <= 2 ** 30 + 2 and rec["n*b"] < 2 ** 61 and rec["u"] < 2 ** 61
    with pytest.raises(ValueError, match="too large"):
        layer_norm_constants(8, 8, np.full(8, 1e12), np.zeros(8), 1e-12, 0.1, 1e-3)
