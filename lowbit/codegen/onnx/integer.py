"""The integer-only ONNX model (`model.int.onnx`) of the IR.

QuantizeLinear on the float input, then ConvInteger/MatMulInteger, integer
Add/Mul/BitShift/Clip and Casts, and DequantizeLinear on the outputs. It runs in ONNX
Runtime and matches the reference executor bit for bit; its outputs include the
integer values before the final dequantize (`QuantizedGraph.int_outputs`) so that
can be checked.

int16 activations: ORT's ConvInteger/MatMulInteger take 8-bit inputs only, and its
MaxPool, Pad and Clip have no int16 kernels. A layer reading int16 x runs on its two
bytes, x = 256 * h + l with h = x >> 8 (int8) and l = x & 255 (uint8): W . x =
256 * (W . h) + W . l, each half an exact int32, summed in int64 (the bound is in
`lowbit.ir.ops._layer`). Zero padding stays exact: x = 0 gives h = l = 0. Pad and
Clip run on the values cast to int32; MaxPool as the Max of its taps' strided Slices
in int32 (`_maxpool_by_taps`). No float tensor appears.

ORT pitfall: on x86 CPUs without VNNI its u8 x s8 integer kernels add pairs of
products in saturating int16, so a uint8 activation times int8 weights is stored
as uint8 weights (w + 128, zero point 128) here: ORT's u8 x u8 kernels are exact.

The encoder's ops (embedding, softmax, LayerNorm, ...) have their converters in
`transformer`, registered in the same `INTEGER_CONVERTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto

from ...errors import LowbitError
from ...ir import Op, QuantizedGraph
from ...ir.dyadic import rounding_term
from ...ir.ops import _layer, add, avgpool, concat, lut
from ...ir.requantizer import Requantizer
from .builder import (
    Builder,
    build,
    check_ir,
    conv_attrs,
    is_global_pool,
    maxpool,
    numpy_type,
    onnx_type,
    pad,
    pads,
    registrar,
    reshape,
    save,
    value_info,
)

# Requantization adds 2^62 so the value is non-negative for the unsigned-only BitShift (see _shift_round_clip).
_OFFSET_BITS = 62

INTEGER_CONVERTERS: dict[str, Callable[[Builder, Op], None]] = {}
_integer = registrar(INTEGER_CONVERTERS)


def trailing(values: np.ndarray, axis: int | None, ndim: int, np_type: type = np.int64) -> np.ndarray:
    """Per-channel constants shaped [C, 1, ..., 1] to broadcast against a tensor of `ndim` dims along `axis`
    (numpy/ONNX broadcasting aligns trailing dims); per-tensor ones as scalars."""
    values = np.asarray(values).astype(np_type)
    if axis is None:
        return values.reshape(())
    return values.reshape(-1, *[1] * (ndim - 1 - axis))


def _shift_round_clip(b: Builder, prefix: str, scaled: str, shift: np.ndarray, qmin: int, qmax: int,
                      dtype: str, out: str) -> str:
    """clip((scaled + r) >> c, qmin, qmax) cast to `dtype`, for an int64 `scaled` = acc * mantissa.

    ONNX Runtime's BitShift takes only unsigned types, and `>>` must floor. Since
    |acc * b| < 2^61 (see ir.dyadic) and r <= 2^61, v = acc * b + r lies in
    (-2^62, 2^62), so v + 2^62 is in (0, 2^63): no int64 overflow, and non-negative.
    Shift that as uint64, then subtract 2^(62-c). This is exact, because 2^62 is a
    multiple of 2^c: floor((v + 2^62) / 2^c) = floor(v / 2^c) + 2^(62-c).
    """
    if shift.max(initial=0) > _OFFSET_BITS:
        raise LowbitError(f"{prefix}: requantization shift out of range [0, {_OFFSET_BITS}]: {shift.ravel()}")
    offset = rounding_term(shift) + np.int64(1 << _OFFSET_BITS)
    unbias = np.left_shift(np.int64(1), _OFFSET_BITS - shift)
    v = b.node("Add", [scaled, b.const(f"{prefix}/round_offset", offset)], f"{prefix}/offset")
    v = b.node("Cast", [v], f"{prefix}/offset_u64", to=TensorProto.UINT64)
    v = b.node("BitShift", [v, b.const(f"{prefix}/shift", shift.astype(np.uint64))], f"{prefix}/shifted_u64",
               direction="RIGHT")
    v = b.node("Cast", [v], f"{prefix}/shifted", to=TensorProto.INT64)
    v = b.node("Sub", [v, b.const(f"{prefix}/unoffset", unbias)], f"{prefix}/rounded")
    v = b.node("Clip", [v, b.const(f"{prefix}/qmin", np.int64(qmin)), b.const(f"{prefix}/qmax", np.int64(qmax))],
               f"{prefix}/clipped")
    return b.node("Cast", [v], out, to=onnx_type(dtype))


def requantize(b: Builder, prefix: str, acc: str, rq: Requantizer, ndim: int, out: str,
               bias: np.ndarray | None = None) -> str:
    """The one place this exporter emits a `Requantizer`: `ir.dyadic.requantize` on the integer tensor `acc`
    (of `ndim` dims), widened to int64 after adding `bias` if given. Without a mantissa, `acc` is the int64
    sum already scaled (a residual add)."""
    shift = trailing(rq.shift, rq.axis, ndim)
    scaled = acc
    if rq.mantissa is not None:
        wide = b.node("Cast", [acc], f"{prefix}/acc64", to=TensorProto.INT64)
        if bias is not None:
            wide = b.node("Add", [wide, b.const(f"{prefix}/bias", trailing(bias, rq.axis, ndim))],
                          f"{prefix}/acc_biased")
        mantissa = b.const(f"{prefix}/mantissa", trailing(rq.mantissa, rq.axis, ndim))
        scaled = b.node("Mul", [wide, mantissa], f"{prefix}/scaled")
    return _shift_round_clip(b, prefix, scaled, shift, rq.qmin, rq.qmax, rq.dtype, out)


def _finish_layer(b: Builder, op: Op, acc: str) -> None:
    """Add the bias to the int32 accumulator, then requantize, or for an int32 output stop there."""
    ndim = len(b.value(op.output).shape)
    rq = _layer.requantizer(op, b.qgraph)
    if rq is None:
        bias = trailing(op.arrays["bias"], _layer.channel_axis(op.op, ndim), ndim, np.int32)
        b.node("Add", [acc, b.const(f"{op.name}/bias", bias)], op.output)
        return
    # The bias is added in int64, as the reference executor does, so even an acc + bias beyond int32 matches.
    requantize(b, op.name, acc, rq, ndim, op.output, op.arrays["bias"])


@_integer("quantize")
def _int_quantize(b: Builder, op: Op) -> None:
    v = b.value(op.output)
    scale = b.const(f"{op.name}/scale", np.float32(v.scale))
    zero_point = b.const(f"{op.name}/zero_point", numpy_type(v.dtype)(0))  # its type sets the output type
    b.node("QuantizeLinear", [op.inputs[0], scale, zero_point], op.output)


@_integer("dequantize")
def _int_dequantize(b: Builder, op: Op) -> None:
    v = b.value(op.inputs[0])
    scale = b.const(f"{op.name}/scale", np.asarray(v.scale, np.float32))
    attrs = {} if v.axis is None else {"axis": v.axis}
    b.node("DequantizeLinear", [op.inputs[0], scale], op.output, **attrs)


def split_int16(b: Builder, prefix: str, x: str) -> tuple[str, str]:
    """int16 x -> (h, l): h = floor(x / 256) as int8 and l = x - 256 * h as uint8, so x = 256 * h + l.

    BitShift takes only unsigned types: u = x + 32768 is in [0, 65535] and floor(x / 256) = (u >> 8) - 128."""
    x32 = b.node("Cast", [x], f"{prefix}/x32", to=TensorProto.INT32)
    u = b.node("Add", [x32, b.const(f"{prefix}/offset", np.int32(32768))], f"{prefix}/u")
    u = b.node("Cast", [u], f"{prefix}/u_u32", to=TensorProto.UINT32)
    high = b.node("BitShift", [u, b.const(f"{prefix}/eight", np.uint32(8))], f"{prefix}/high_u32", direction="RIGHT")
    high = b.node("Cast", [high], f"{prefix}/high_u", to=TensorProto.INT32)
    high = b.node("Sub", [high, b.const(f"{prefix}/unoffset", np.int32(128))], f"{prefix}/high32")
    scaled_high = b.node("Mul", [high, b.const(f"{prefix}/byte", np.int32(256))], f"{prefix}/high_scaled")
    low = b.node("Sub", [x32, scaled_high], f"{prefix}/low32")
    return (b.node("Cast", [high], f"{prefix}/high", to=TensorProto.INT8),
            b.node("Cast", [low], f"{prefix}/low", to=TensorProto.UINT8))


Product = Callable[[str, str, str], str]  # (8-bit tensor, its IR dtype, output name) -> int32 output


def by_bytes(b: Builder, prefix: str, x: str, product: Product) -> str:
    """A linear integer map P (conv, matmul, window sum) of int16 x, exactly: 256 * P(h) + P(l) in int64.
    `product(x8, dtype, name)` emits P on an 8-bit tensor as an int32 named `name`."""
    high, low = split_int16(b, f"{prefix}/split", x)
    high = b.node("Cast", [product(high, "int8", f"{prefix}/acc_high")], f"{prefix}/acc_high64", to=TensorProto.INT64)
    low = b.node("Cast", [product(low, "uint8", f"{prefix}/acc_low")], f"{prefix}/acc_low64", to=TensorProto.INT64)
    high = b.node("Mul", [high, b.const(f"{prefix}/byte64", np.int64(256))], f"{prefix}/acc_high_scaled")
    return b.node("Add", [high, low], f"{prefix}/acc")


def _layer_acc(b: Builder, op: Op, product: Product) -> str:
    """The layer's accumulator without bias: int32 for an 8-bit input, int64 (by bytes) for int16."""
    x = op.inputs[0]
    if b.value(x).dtype == "int16":
        return by_bytes(b, op.name, x, product)
    return product(x, b.value(x).dtype, f"{op.name}/acc")


@_integer("conv")
def _int_conv(b: Builder, op: Op) -> None:
    w = b.const(f"{op.name}/weight", op.arrays["weight"].astype(np.int8))
    _finish_layer(b, op, _layer_acc(b, op, lambda x, _, out: b.node("ConvInteger", [x, w], out, **conv_attrs(op))))


@_integer("linear")
def _int_linear(b: Builder, op: Op) -> None:
    w_t = np.ascontiguousarray(op.arrays["weight"].T).astype(np.int16)
    weights: dict[str, list[str]] = {}

    def matmul(x: str, x_dtype: str, out: str) -> str:
        if x_dtype == "uint8":
            # u8 x s8 MatMulInteger can saturate without VNNI (module docstring); u8 x u8 is exact, so store the
            # weights as uint8 w + 128 with zero point 128. (s8 x s8 cannot saturate: 2 * 128 * 127 < 2^15. ORT's
            # ConvInteger puts the weights first, s8 x u8, and is exact with int8 weights: checked at extremes.)
            if "u8" not in weights:
                weights["u8"] = [b.const(f"{op.name}/weight_t_u8", (w_t + 128).astype(np.uint8)), "",
                                 b.const(f"{op.name}/weight_zero_point", np.uint8(128))]
            return b.node("MatMulInteger", [x, *weights["u8"]], out)
        if "s8" not in weights:
            weights["s8"] = [b.const(f"{op.name}/weight_t", w_t.astype(np.int8))]
        return b.node("MatMulInteger", [x, *weights["s8"]], out)

    _finish_layer(b, op, _layer_acc(b, op, matmul))


@_integer("add")
def _int_add(b: Builder, op: Op) -> None:
    # Each input gets its own mantissa; the shift is shared, so the products add up before rounding.
    # A per-channel mantissa vector (over the last axis) broadcasts as a trailing-axis constant.
    add.check_channels(op, b.qgraph)
    terms = []
    for i, (x, m) in enumerate(zip(op.inputs, add.input_multipliers(op), strict=True)):
        wide = b.node("Cast", [x], f"{op.name}/in{i}_64", to=TensorProto.INT64)
        terms.append(b.node("Mul", [wide, b.const(f"{op.name}/mantissa{i}", m)], f"{op.name}/scaled{i}"))
    total = b.node("Add", terms, f"{op.name}/scaled")
    requantize(b, op.name, total, add.requantizer(op, b.qgraph), len(b.value(op.output).shape), op.output)


@_integer("concat")
def _int_concat(b: Builder, op: Op) -> None:
    ndim = len(b.value(op.output).shape)
    parts = [requantize(b, f"{op.name}/in{i}", x, rq, ndim, f"{op.name}/part{i}")
             for i, (x, rq) in enumerate(zip(op.inputs, concat.requantizers(op, b.qgraph), strict=True))]
    b.node("Concat", parts, op.output, axis=op.attrs["axis"])


@_integer("avgpool")
def _int_avgpool(b: Builder, op: Op) -> None:
    a, x = op.attrs, op.inputs[0]
    if is_global_pool(b, op):
        wide = b.node("Cast", [x], f"{op.name}/in64", to=TensorProto.INT64)
        axes = b.const(f"{op.name}/axes", np.array([2, 3], np.int64))
        sums = b.node("ReduceSum", [wide, axes], f"{op.name}/sums", keepdims=1)
    else:
        # Window sums as a depthwise convolution with an all-ones kernel; zero padding counts, as in the IR.
        channels = b.value(x).shape[1]
        ones = b.const(f"{op.name}/ones", np.ones((channels, 1, *a["kernel"]), np.int8))

        def window_sums(x8: str, _: str, out: str) -> str:
            return b.node("ConvInteger", [x8, ones], out, kernel_shape=a["kernel"], strides=a["stride"],
                          pads=pads(a["padding"]), group=channels)

        sums = (by_bytes(b, op.name, x, window_sums) if b.value(x).dtype == "int16"
                else window_sums(x, b.value(x).dtype, f"{op.name}/sums"))
    requantize(b, op.name, sums, avgpool.requantizer(op, b.qgraph), 4, op.output)


@_integer("lut")
def _int_lut(b: Builder, op: Op) -> None:
    index = b.node("Cast", [op.inputs[0]], f"{op.name}/in32", to=TensorProto.INT32)
    offset = np.int32(lut.index_offset(op, b.qgraph))
    table = op.arrays["table"]
    if lut.channels(op):  # per-channel tables, flattened: channel j's entry i is at 256 * j + i
        lut.check_channels(op, b.qgraph)
        offset = offset + np.arange(table.shape[0], dtype=np.int32) * np.int32(table.shape[1])
    index = b.node("Add", [index, b.const(f"{op.name}/offset", offset)], f"{op.name}/index")
    b.node("Gather", [b.const(f"{op.name}/table", table.reshape(-1)), index], op.output, axis=0)


def _on_8bit_or_int32(b: Builder, op: Op, emit: Callable[[str, str, type], str]) -> None:
    """`emit(x, out, numpy type)` an op that ORT runs on 8-bit and int32 tensors but not on int16: an int16
    input goes through int32 and back."""
    dtype = b.value(op.inputs[0]).dtype
    if dtype != "int16":
        emit(op.inputs[0], op.output, numpy_type(dtype))
        return
    x = b.node("Cast", [op.inputs[0]], f"{op.name}/in32", to=TensorProto.INT32)
    y = emit(x, f"{op.name}/out32", np.int32)
    b.node("Cast", [y], op.output, to=onnx_type(dtype))


def _maxpool_by_taps(b: Builder, op: Op) -> None:
    """MaxPool of int16 x, which ORT's MaxPool does not take: in int32, pad with -2^31 (so padding never wins,
    as in torch), take each kernel tap's strided slice, and their elementwise Max."""
    a = op.attrs
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    _, _, h, w = b.value(op.inputs[0]).shape
    _, _, oh, ow = b.value(op.output).shape
    # Pad far enough on the bottom/right for every window the output reads (ceil_mode's last ones included).
    bottom = max(ph, (oh - 1) * sh + (kh - 1) * dh + 1 - h - ph)
    right = max(pw, (ow - 1) * sw + (kw - 1) * dw + 1 - w - pw)
    x = b.node("Cast", [op.inputs[0]], f"{op.name}/in32", to=TensorProto.INT32)
    x = b.node("Pad", [x, b.const(f"{op.name}/pads", np.array([0, 0, ph, pw, 0, 0, bottom, right], np.int64)),
                       b.const(f"{op.name}/lowest", np.int32(-(2**31)))], f"{op.name}/padded", mode="constant")
    axes = b.const(f"{op.name}/axes", np.array([2, 3], np.int64))
    steps = b.const(f"{op.name}/steps", np.array([sh, sw], np.int64))
    taps = []
    for i in range(kh):
        for j in range(kw):
            start = np.array([i * dh, j * dw], np.int64)
            end = start + np.array([(oh - 1) * sh + 1, (ow - 1) * sw + 1], np.int64)
            taps.append(b.node("Slice", [x, b.const(f"{op.name}/start{i}_{j}", start),
                                         b.const(f"{op.name}/end{i}_{j}", end), axes, steps], f"{op.name}/tap{i}_{j}"))
    y = b.node("Max", taps, f"{op.name}/max32") if len(taps) > 1 else taps[0]
    b.node("Cast", [y], op.output, to=onnx_type(b.value(op.output).dtype))


@_integer("maxpool")
def _int_maxpool(b: Builder, op: Op) -> None:
    if b.value(op.inputs[0]).dtype == "int16":
        _maxpool_by_taps(b, op)
    else:
        maxpool(b, op, op.inputs[0], op.output)


@_integer("clamp")
def _int_clamp(b: Builder, op: Op) -> None:
    def clip(x: str, out: str, np_type: type) -> str:
        lo = b.const(f"{op.name}/qmin", np_type(op.attrs["qmin"]))
        hi = b.const(f"{op.name}/qmax", np_type(op.attrs["qmax"]))
        return b.node("Clip", [x, lo, hi], out)

    _on_8bit_or_int32(b, op, clip)


@_integer("pad")
def _int_pad(b: Builder, op: Op) -> None:
    _on_8bit_or_int32(b, op, lambda x, out, _: pad(b, op, x, out))


@_integer("reshape")
def _int_reshape(b: Builder, op: Op) -> None:
    reshape(b, op, op.inputs[0], op.output)


def _integer_model(qgraph: QuantizedGraph) -> ModelProto:
    check_ir(qgraph, INTEGER_CONVERTERS, "integer ONNX")
    outputs = [value_info(n, "float32", qgraph.values[n].shape) for n in qgraph.outputs]
    outputs += [value_info(n, qgraph.values[n].dtype, qgraph.values[n].shape) for n in qgraph.int_outputs]
    doc = ("lowbit integer-only model: integer tensors from QuantizeLinear to DequantizeLinear. Outputs: "
           f"{', '.join(qgraph.outputs)} (float) and {', '.join(qgraph.int_outputs)} (integer, before dequantize).")
    return build(Builder(qgraph), INTEGER_CONVERTERS, outputs, doc)


def export_integer(qgraph: QuantizedGraph, path: Path) -> None:
    """Write the integer-only ONNX model (`model.int.onnx`), bit-exact with the reference executor.

    Outputs are the IR's float outputs and its integer outputs before dequantize.
    """
    save(_integer_model(qgraph), path)
