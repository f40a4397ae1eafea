"""The TVM decoder's kernels against numpy: the int8 GEMV (LM head, int8 linears) and its row lookup (the
embedding), both GEMVs writing column slices (linears of one fused group in different formats), RMSNorm, RoPE
with the KV-cache write, attention over the cache and SiLU * up. Whole-model logits against the numpy runtime:
tests/test_decoder_pipeline.py (int4) and tests/test_decoder_tvm_mixed.py (a mixed plan).

Tolerances: float32 kernels against float64 numpy, relative to the magnitude of the terms summed (sum |x * w|
for a GEMV, max |v| for attention): a few float32 ulps times a slowly growing factor of the sums' lengths.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import LowbitError

tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.x86.decoder_ops import (  # noqa: E402
    attention_func,
    rmsnorm_func,
    rope_cache_func,
    silu_mul_func,
)
from lowbit.codegen.tvm.x86.gemv_int4 import Int4GemvPlan, gemv_int4_func  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_int8 import (  # noqa: E402
    Int8GemvPlan,
    gemv_int8_func,
    pack_int8_gemv,
    unpack_int8_rows,
)
from lowbit.codegen.tvm.x86.int4_groups import pack_int4_gemv  # noqa: E402
from lowbit.runtime.decoder_tvm import embedding_rows  # noqa: E402

TARGET = tvm.target.Target(parse_target("llvm -mcpu=native", threads=2))
RTOL = 2e-6


def _call(func: object, *args: object) -> list[np.ndarray]:
    """Compile `func`, call it on numpy arrays (in place) and scalars; the arrays afterwards."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    tensors = [tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors if not isinstance(t, int)]


def _int8_weights(out_f: int, in_f: int, group: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, (out_f, in_f)).astype(np.uint8)
    zero = rng.integers(0, 256, (out_f, in_f // group)).astype(np.uint8)
    scale = (rng.random((out_f, in_f // group)) * 0.01 + 1e-4).astype(np.float32)
    q[0], zero[0] = 255, 0  # the top byte of every word (bit 31) and the extremes
    return q, scale, zero


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    return (q.astype(np.float64) - np.repeat(zero, group, 1)) * np.repeat(scale.astype(np.float64), group, 1)


@pytest.mark.parametrize("m", [1, 3, 6])  # 6: a 4-row register tile and a 2-row rest
def test_gemv_int8(m: int) -> None:
    q, scale, zero = _int8_weights(96, 576, 32, m)
    x = np.random.default_rng(m).standard_normal((m, 576)).astype(np.float32)
    packed = pack_int8_gemv(q, scale, zero, 32)
    y = _call(gemv_int8_func(Int8GemvPlan.of(m, 576, 96, 32, 2)), x, *packed.arrays(), np.zeros((m, 96), np.float32))
    w = _dequantize(q, scale, zero, 32)
    err = np.abs(y[-1] - x.astype(np.float64) @ w.T) / (np.abs(x.astype(np.float64)) @ np.abs(w).T)
    assert err.max() <= RTOL, f"max error {err.max():.2e} of sum |x * w|"


@pytest.mark.parametrize(("kernel", "accumulate"), [("int8", True), ("int8", False), ("int4", True)])
def test_gemv_writes_a_column_slice(kernel: str, accumulate: bool) -> None:
    """32 rows (a prefill chunk) into columns 40..63 of a 96-column buffer: those columns are x W^T (added to what
    they held with `accumulate`), the others untouched. A short last group (K = 80, group 32)."""
    m, k, n, width, col, group = 32, 80, 24, 96, 40, 32
    rng = np.random.default_rng(5)
    qmax, groups = (255 if kernel == "int8" else 15), -(-k // group)
    q = rng.integers(0, qmax + 1, (n, k)).astype(np.uint8)
    zero = rng.integers(0, qmax + 1, (n, groups)).astype(np.uint8)
    scale = (rng.random((n, groups)) * 0.01 + 1e-4).astype(np.float32)
    q[0], zero[0] = qmax, 0  # the top bits of every word and the extremes
    if kernel == "int8":
        func = gemv_int8_func(Int8GemvPlan.of(m, k, n, group, 2, accumulate=accumulate, out_width=width))
        packed = pack_int8_gemv(q, scale, zero, group).arrays()
    else:
        func = gemv_int4_func(Int4GemvPlan.of(m, k, n, group, 2, accumulate=accumulate, out_width=width))
        packed = pack_int4_gemv(q, scale, zero, group).arrays()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y0 = rng.standard_normal((m, width)).astype(np.float32)
    y = _call(func, x, *packed, y0.copy(), col)[-1]
    cols = np.arange(k) // group
    w = (q.astype(np.float64) - zero[:, cols]) * scale.astype(np.float64)[:, cols]
    expected = x.astype(np.float64) @ w.T + (y0[:, col:col + n] if accumulate else 0)
    err = np.abs(y[:, col:col + n] - expected) / (np.abs(x.astype(np.float64)) @ np.abs(w).T
                                                   + (np.abs(y0[:, col:col + n]) if accumulate else 0))
    assert err.max() <= RTOL, f"max error {err.max():.2e}"
    np.testing.assert_array_equal(np.delete(y, np.s_[col:col + n], 1), np.delete(y0, np.s_[col:col + n], 1))


def test_embedding_rows_read_the_gemv_layout() -> None:
    q, scale, zero = _int8_weights(24, 64, 32, 7)
    packed = pack_int8_gemv(q, scale, zero, 32)
    rows = np.array([0, 5, 8, 23])
    got = embedding_rows(*packed.arrays(), rows, 32)
    np.testing.assert_allclose(got, _dequantize(q, scale, zero, 32)[rows], rtol=1e-6, atol=1e-6)


def test_pack_int8_gemv_takes_float_offsets() -> None:
    """A grid with float minimums (w = q * s + m): the packed rows dequantize to it; zero points and offsets are
    exclusive."""
    q, scale, _ = _int8_weights(16, 64, 32, 3)
    offset = np.random.default_rng(3).standard_normal(scale.shape).astype(np.float32)
    packed = pack_int8_gemv(q, scale, None, 32, offset=offset)
    rows = np.arange(16)
    expected = q * np.repeat(scale, 32, 1) + np.repeat(offset, 32, 1)
    np.testing.assert_allclose(unpack_int8_rows(packed, rows, 32), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(LowbitError, match="either"):
        pack_int8_gemv(q, scale, None, 32)


def test_pack_int8_gemv_rejects_bad_shapes() -> None:
    with pytest.raises(LowbitError, match="multiple"):
        pack_int8_gemv(np.zeros((12, 64), np.uint8), np.ones((12, 2), np.float32), np.zeros((12, 2), np.uint8), 32)


def test_rmsnorm_reads_the_given_row() -> None:
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32) * 3
    gain = np.random.default_rng(1).random(32).astype(np.float32)
    y = _call(rmsnorm_func(4, 1, 32, 1e-5), x, gain, np.zeros((1, 32), np.float32), 2)[-1]
    x64 = x[2].astype(np.float64)
    np.testing.assert_allclose(y[0], x64 / np.sqrt((x64 * x64).mean() + 1e-5) * gain, rtol=1e-5, atol=1e-6)


def test_silu_mul() -> None:
    gu = np.random.default_rng(2).standard_normal((2, 2 * 24)).astype(np.float32) * 4
    a = _call(silu_mul_func(2, 24), gu, np.zeros((2, 24), np.float32))[-1]
    g, u = gu[:, :24].astype(np.float64), gu[:, 24:].astype(np.float64)
    np.testing.assert_allclose(a, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def _rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Adjacent pairs of x [rows, heads, d] rotated by each row's position (float64)."""
    d = x.shape[-1]
    angles = positions[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * np.cos(angles) - x1 * np.sin(angles), x0 * np.sin(angles) + x1 * np.cos(
        angles)
    return out


@pytest.mark.parametrize(("m", "pos"), [(1, 0), (1, 40), (4, 29)])
def test_rope_cache_and_attention(m: int, pos: int) -> None:
    """m rows at positions pos .. pos + m - 1 after `pos` cached ones: causal grouped-query attention (6 query
    heads on 2 KV heads of 16) against float64 numpy."""
    heads, kv_heads, d, context = 6, 2, 16, 64  # 41 and 33 keys: a full block of 32 and a masked one
    rng = np.random.default_rng(m + pos)
    qkv = rng.standard_normal((m, (heads + 2 * kv_heads) * d)).astype(np.float32)
    angles = np.arange(context)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    keys = rng.standard_normal((kv_heads, d, context)).astype(np.float32)  # positions < pos: the cache so far
    values = rng.standard_normal((kv_heads, context, d)).astype(np.float32)
    _, _, _, keys_t, values_out, q = _call(rope_cache_func(m, heads, kv_heads, d, context), qkv, cos, sin,
                                           keys.copy(), values.copy(), np.zeros((m, heads * d), np.float32), pos)
    keys_out = keys_t.transpose(0, 2, 1)  # [kv, position, d]
    positions = np.arange(pos, pos + m).astype(np.float64)
    q64 = _rope(qkv[:, :heads * d].reshape(m, heads, d).astype(np.float64), positions, 10000.0)
    k64 = _rope(qkv[:, heads * d:(heads + kv_heads) * d].reshape(m, kv_heads, d).astype(np.float64), positions,
                10000.0)
    v64 = qkv[:, (heads + kv_heads) * d:].reshape(m, kv_heads, d)
    np.testing.assert_allclose(q, q64.reshape(m, -1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(keys_out[:, pos:pos + m], k64.transpose(1, 0, 2), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(values_out[:, pos:pos + m], v64.transpose(1, 0, 2))
    np.testing.assert_array_equal(keys_t[:, :, :pos], keys[:, :, :pos])  # the cache before pos is kept

    out = _call(attention_func(m, heads, kv_heads, d, context, 2), q, keys_t, values_out,
                np.zeros((m * heads, context), np.float32), np.zeros((m, heads * d), np.float32), pos)[-1]
    k_all, v_all = keys_out.astype(np.float64), values_out.astype(np.float64)
    for r in range(m):
        for h in range(heads):
            length = pos + r + 1
            s = q[r, h * d:(h + 1) * d].astype(np.float64) @ k_all[h // 3, :length].T / np.sqrt(d)
            p = np.exp(s - s.max())
            expected = p / p.sum() @ v_all[h // 3, :length]
            np.testing.assert_allclose(out[r, h * d:(h + 1) * d], expected, rtol=0,
                                       atol=1e-5 * np.abs(v_all).max())
