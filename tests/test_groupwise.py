"""Group-wise weights: the format (packing, size, serialization) and its RTN/GPTQ rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.ir.groupwise_weights import GroupWiseWeights, n_groups, pack_bits, unpack_bits
from lowbit.quantizer.groupwise import CLIP_RATIOS, gptq_groupwise, hessian_loss, rtn_groupwise
from lowbit.quantizer.rounding import HessianAccumulator, gptq_round


def _correlated(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5) \
        + 0.2 * torch.randn(tokens, k, generator=g)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator()
    acc.add(x.T.unsqueeze(0))
    return acc.result()[0]


def _grid_exact(out: int, k: int, bits: int, group: int, seed: int = 0) -> GroupWiseWeights:
    """Random values whose every (row, group) spans the whole grid [0, 2^bits - 1] and contains its zero point,
    so that min-max finds exactly this grid again."""
    rng = np.random.default_rng(seed)
    qmax = (1 << bits) - 1
    g = n_groups(k, group)
    values = rng.integers(0, qmax + 1, (out, k)).astype(np.uint8)
    zero = rng.integers(0, qmax + 1, (out, g)).astype(np.uint8)
    for j in range(g):
        start = j * group
        values[:, start], values[:, start + 1] = 0, qmax
        values[:, start + 2] = zero[:, j]
    scale = (2.0 ** rng.integers(-8, -2, (out, g))).astype(np.float32)  # powers of two: exact float64 division
    return GroupWiseWeights(values, scale, zero, bits, group)


# -- the format ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 13, 37, 576])
def test_pack_bits_round_trips(bits: int, n: int) -> None:
    values = np.random.default_rng(n).integers(0, 1 << bits, (5, n)).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, -(-n * bits // 8))
    assert np.array_equal(unpack_bits(packed, n, bits), values)


def test_pack_bits_layout_is_a_little_endian_bit_stream() -> None:
    # 4 bits: the first value in the low nibble, as pack_int4 and ORT's MatMulNBits.
    assert pack_bits(np.array([[1, 2, 15]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    # 3 bits: eight values in three bytes; value j at stream bits [3j, 3j + 3).
    values = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], np.uint8)
    stream = sum(int(v) << (3 * j) for j, v in enumerate(values[0]))
    assert pack_bits(values, 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]
    assert pack_bits(np.array([[3, 0, 1, 2, 3]], np.uint8), 2).tolist() == [[0b10010011, 0b11]]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(np.array([[8]], np.uint8), 3)


@pytest.mark.parametrize("bits,group,k", [(4, 128, 576), (3, 64, 100), (2, 32, 40), (8, 128, 128), (4, 7, 7)])
def test_grid_exact_weights_survive_rtn_and_serialization(bits: int, group: int, k: int) -> None:
    exact = _grid_exact(6, k, bits, group, seed=bits)
    w = exact.dequantize()
    again = rtn_groupwise(w, bits, group)
    assert np.array_equal(again.values, exact.values) and np.array_equal(again.zero, exact.zero)
    assert np.array_equal(again.scale, exact.scale)
    assert np.array_equal(again.dequantize(), w)
    tensors = exact.to_tensors("layers.0.q_proj.")
    assert sum(a.nbytes for n, a in tensors.items() if not n.endswith("layout")) == exact.nbytes
    loaded = GroupWiseWeights.from_tensors(tensors, "layers.0.q_proj.")
    assert np.array_equal(loaded.dequantize(), w) and (loaded.bits, loaded.group) == (bits, group)


def test_tail_group_and_size_accounting() -> None:
    w = _grid_exact(4, 576, 4, 128)  # 576 = 4 groups of 128 and a tail of 64
    assert w.scale.shape == (4, 5) and w.name == "int4 g128"
    # Per row: 288 bytes of values, 5 zero points in 3 bytes, 5 fp32 scales.
    assert w.nbytes == 4 * (288 + 3 + 20)
    assert w.bits_per_weight == pytest.approx(8 * (288 + 3 + 20) / 576)
    tail = w.dequantize()[:, 512:]
    assert np.array_equal(tail, (w.values[:, 512:].astype(np.float32) - w.zero[:, 4:5]) * w.scale[:, 4:5])
    assert GroupWiseWeights.bytes_for((4, 576), 4, 128) == w.nbytes


def test_bad_formats_and_tensors_are_refused_with_their_names() -> None:
    good = _grid_exact(3, 64, 4, 32)
    with pytest.raises(ValueError, match="supported"):
        GroupWiseWeights(good.values, good.scale, good.zero, 5, 32)
    with pytest.raises(ValueError, match=r"scale must be float32 \[3, 2\]"):
        GroupWiseWeights(good.values, good.scale[:, :1], good.zero, 4, 32)
    with pytest.raises(ValueError, match="exceed 3"):
        GroupWiseWeights(good.values, good.scale, good.zero, 2, 32)
    with pytest.raises(ValueError, match="positive"):
        GroupWiseWeights(good.values, np.zeros_like(good.scale), good.zero, 4, 32)
    tensors = good.to_tensors("fc.")
    for name, bad in (("fc.scales", tensors["fc.scales"].astype(np.float16)),
                      ("fc.qweight", tensors["fc.qweight"][:, :-1]),
                      ("fc.layout", np.array([3, 64, 5, 32], np.int64))):
        with pytest.raises(LowbitError, match=f"model.safetensors: .*{name}"):
            GroupWiseWeights.from_tensors({**tensors, name: bad}, "fc.", where="model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "fc.qzeros"}
    with pytest.raises(LowbitError, match="lack the tensor 'fc.qzeros'"):
        GroupWiseWeights.from_tensors(missing, "fc.")


# -- rounding -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_values_in_range_and_error_within_half_a_step(bits: int) -> None:
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(bits)) * 0.05
    q = rtn_groupwise(w, bits, 64)
    assert q.values.max() <= (1 << bits) - 1 and q.zero.max() <= (1 << bits) - 1
    step = np.repeat(q.scale, 64, axis=1)[:, :200]
    assert np.all(np.abs(q.dequantize() - w.numpy()) <= 0.5 * step * (1 + 1e-5))
    per_channel = rtn_groupwise(w, bits, 1000)  # a group wider than the row: one per output channel
    assert per_channel.group == 200 and per_channel.scale.shape == (16, 1)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (2, 32), (8, 128)])
def test_gptq_beats_rtn_on_the_proxy_loss(bits: int, group: int) -> None:
    k = 320  # two blocks and a half; 320 % 128 = 64: a tail group
    x = _correlated(4096, k)
    h = _hessian(x)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(1)) * 0.05
    rtn = hessian_loss(w, rtn_groupwise(w, bits, group).dequantize(), h)
    for act_order in (False, True):
        q = gptq_groupwise(w, h, bits, group, act_order=act_order)
        assert q.values.max() <= (1 << bits) - 1
        assert hessian_loss(w, q.dequantize(), h) < 0.8 * rtn
        # The proxy loss is the summed squared output error on the Hessian's inputs.
        out_err = float(((x.double() @ (w.double() - torch.from_numpy(q.dequantize()).double()).T) ** 2).sum())
        assert hessian_loss(w, q.dequantize(), h) == pytest.approx(out_err / x.shape[0], rel=1e-6)


def test_clip_search_lowers_the_squared_error_of_gaussian_weights() -> None:
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    plain, clipped = (rtn_groupwise(w, 3, 128, ratios) for ratios in ((1.0,), CLIP_RATIOS))
    err = [float(((q.dequantize() - w.numpy()) ** 2).sum()) for q in (plain, clipped)]
    assert err[1] < 0.9 * err[0]


def test_gptq_per_channel_grid_fixed_up_front_is_gptq_round() -> None:
    """With one group per row spanning [-7s, 8s], group-wise GPTQ is per-channel GPTQ with an offset grid:
    the same integers as `gptq_round` on the symmetric grid, shifted by the zero point."""
    k = 200
    h = _hessian(_correlated(2048, k, seed=3)).unsqueeze(0)
    w = torch.randn(1, 8, k, generator=torch.Generator().manual_seed(3)) * 0.05
    w[0, :, 0], w[0, :, 1] = -0.35, 0.4  # every row's range is [-0.35, 0.4] = [-7s, 8s] with s = 0.05
    q = gptq_groupwise(w[0], h[0], 4, k, dtype=torch.float64)
    assert np.allclose(q.scale, 0.05) and np.all(q.zero == 7)
    reference = gptq_round(w, h, torch.full((1, 8), float(np.float32(0.05)), dtype=torch.float64), -7, 8)[0]
    assert np.array_equal(q.values.astype(np.int64) - 7, reference.numpy().astype(np.int64))


def test_float32_column_loop_keeps_the_float64_loss() -> None:
    k = 256
    h = _hessian(_correlated(2048, k, seed=4))
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(4)) * 0.05
    losses = [hessian_loss(w, gptq_groupwise(w, h, 3, 64, dtype=dtype).dequantize(), h)
              for dtype in (torch.float32, torch.float64)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def _q4_1_weights(out: int, k: int, seed: int = 0) -> np.ndarray:
    """Weights exactly on GGUF Q4_1's grid: per 32 columns q * d + m, d and m float16, each block spanning 0..15."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (out, k))
    q[:, ::32], q[:, 1::32] = 0, 15
    d = np.repeat(rng.uniform(0.001, 0.01, (out, k // 32)).astype(np.float16).astype(np.float32), 32, 1)
    m = np.repeat(rng.uniform(-0.08, 0.02, (out, k // 32)).astype(np.float16).astype(np.float32), 32, 1)
    return (q * d + m).astype(np.float32)


def test_float_minimums_reproduce_a_q4_1_grid_where_integer_zero_points_cannot() -> None:
    w = _q4_1_weights(16, 128)
    exact = rtn_groupwise(w, 4, 32, float_minimum=True)
    assert exact.float_minimum and exact.scale.dtype == np.float16 and exact.minimum.dtype == np.float16
    assert np.allclose(exact.dequantize(), w, rtol=0, atol=1e-6)
    step = np.abs(np.diff(np.sort(w[0, :32]))).max()
    assert np.abs(rtn_groupwise(w, 4, 32).dequantize() - w).max() > 0.1 * step  # a second rounding
    h = _hessian(_correlated(256, 128))
    gptq = gptq_groupwise(w, h, 4, 32, act_order=True, float_minimum=True)
    assert np.allclose(gptq.dequantize(), w, rtol=0, atol=1e-6)  # nothing to feed back


def test_float_minimum_format_size_serialization_and_checks() -> None:
    w = _q4_1_weights(8, 576, seed=1)[:, :576]
    q = rtn_groupwise(w, 4, 128, float_minimum=True)
    assert q.nbytes == 8 * (288 + 5 * (2 + 2)) == GroupWiseWeights.bytes_for((8, 576), 4, 128, float_minimum=True)
    assert q.bits_per_weight < GroupWiseWeights.bytes_for((8, 576), 4, 128) * 8 / w.size
    tensors = q.to_tensors("x.")
    assert set(tensors) == {"x.qweight", "x.mins", "x.scales", "x.layout"}
    again = GroupWiseWeights.from_tensors(tensors, "x.")
    assert np.array_equal(again.dequantize(), q.dequantize())
    assert np.allclose(q.offset, q.minimum.astype(np.float32))
    with pytest.raises(LowbitError, match="x.mins"):
        GroupWiseWeights.from_tensors({**tensors, "x.mins": tensors["x.mins"].astype(np.float64)}, "x.")
    with pytest.raises(ValueError, match="either"):
        GroupWiseWeights(q.values, q.scale, None, 4, 128)
    tiny = rtn_groupwise(w * 1e-6, 4, 128, float_minimum=True)  # steps below float16's normal range
    assert tiny.scale.dtype == np.float32 and np.abs(tiny.dequantize() - w * 1e-6).max() < 1e-7


def test_float_minimum_rounding_error_within_half_a_step() -> None:
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3)) + 0.5  # groups not centred on 0
    q = rtn_groupwise(w, 4, 64, float_minimum=True)
    step = np.repeat(q.scale.astype(np.float32), 64, 1)
    assert np.all(np.abs(q.dequantize() - w.numpy()) <= 0.5 * step * (1 + 1e-2) + 1e-6)
    plain = rtn_groupwise(w, 4, 64)
    assert np.abs(q.dequantize() - w.numpy()).mean() < np.abs(plain.dequantize() - w.numpy()).mean()
