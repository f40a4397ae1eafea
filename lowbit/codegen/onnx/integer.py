"""The integer-only ONNX model (`model.int.onnx`) of the IR.

QuantizeLinear on the float input, then ConvInteger/MatMulInteger, integer
Add/Mul/BitShift/Clip and Casts, and DequantizeLinear on the outputs. It runs in ONNX
Runtime and matches the reference executor bit for bit; its outputs include the
integer values before the final dequantize (`QuantizedGraph.int_outputs`) so that
can be checked.

ORT pitfall: on x86 CPUs without VNNI its u8 x s8 integer kernels add pairs of
products in saturating int16, so a uint8 activation times int8 weights is stored
as uint8 weights (w + 128, zero point 128) here: ORT's u8 x u8 kernels are exact.
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


@_integer("conv")
def _int_conv(b: Builder, op: Op) -> None:
    w = b.const(f"{op.name}/weight", op.arrays["weight"].astype(np.int8))
    acc = b.node("ConvInteger", [op.inputs[0], w], f"{op.name}/acc", **conv_attrs(op))
    _finish_layer(b, op, acc)


@_integer("linear")
def _int_linear(b: Builder, op: Op) -> None:
    w_t = np.ascontiguousarray(op.arrays["weight"].T).astype(np.int16)
    if b.value(op.inputs[0]).dtype == "uint8":
        # u8 x s8 MatMulInteger can saturate without VNNI (module docstring); u8 x u8 is exact, so store the
        # weights as uint8 w + 128 with zero point 128. (s8 x s8 cannot saturate: 2 * 128 * 127 < 2^15. ORT's
        # ConvInteger puts the weights first, s8 x u8, and is exact with int8 weights: checked at extremes.)
        w = b.const(f"{op.name}/weight_t", (w_t + 128).astype(np.uint8))
        inputs = [op.inputs[0], w, "", b.const(f"{op.name}/weight_zero_point", np.uint8(128))]
    else:
        inputs = [op.inputs[0], b.const(f"{op.name}/weight_t", w_t.astype(np.int8))]
    acc = b.node("MatMulInteger", inputs, f"{op.name}/acc")
    _finish_layer(b, op, acc)


@_integer("add")
def _int_add(b: Builder, op: Op) -> None:
    # Each input gets its own mantissa; the shift is shared, so the products add up before rounding.
    terms = []
    for i, (x, m) in enumerate(zip(op.inputs, add.input_mantissas(op), strict=True)):
        wide = b.node("Cast", [x], f"{op.name}/in{i}_64", to=TensorProto.INT64)
        terms.append(b.node("Mul", [wide, b.const(f"{op.name}/mantissa{i}", np.int64(m))], f"{op.name}/scaled{i}"))
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
        sums = b.node("ConvInteger", [x, ones], f"{op.name}/sums", kernel_shape=a["kernel"], strides=a["stride"],
                      pads=pads(a["padding"]), group=channels)
    requantize(b, op.name, sums, avgpool.requantizer(op, b.qgraph), 4, op.output)


@_integer("lut")
def _int_lut(b: Builder, op: Op) -> None:
    index = b.node("Cast", [op.inputs[0]], f"{op.name}/in32", to=TensorProto.INT32)
    index = b.node("Add", [index, b.const(f"{op.name}/offset", np.int32(lut.index_offset(op, b.qgraph)))],
                   f"{op.name}/index")
    b.node("Gather", [b.const(f"{op.name}/table", op.arrays["table"]), index], op.output, axis=0)


@_integer("maxpool")
def _int_maxpool(b: Builder, op: Op) -> None:
    maxpool(b, op, op.inputs[0], op.output)


@_integer("clamp")
def _int_clamp(b: Builder, op: Op) -> None:
    np_type = numpy_type(b.value(op.inputs[0]).dtype)
    lo = b.const(f"{op.name}/qmin", np_type(op.attrs["qmin"]))
    hi = b.const(f"{op.name}/qmax", np_type(op.attrs["qmax"]))
    b.node("Clip", [op.inputs[0], lo, hi], op.output)


@_integer("pad")
def _int_pad(b: Builder, op: Op) -> None:
    pad(b, op, op.inputs[0], op.output)


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
