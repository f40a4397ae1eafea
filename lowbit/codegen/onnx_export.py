"""ONNX export of the integer IR (`QuantizedGraph`).

Two models come out of one IR:

- `export_integer` writes `model.int.onnx`, an integer-only graph: QuantizeLinear on
  the float input, then ConvInteger/MatMulInteger, integer Add/Mul/BitShift/Clip and
  Casts, and DequantizeLinear on the outputs. It runs in ONNX Runtime and matches the
  reference executor bit for bit; its outputs include the integer values before the
  final dequantize (`QuantizedGraph.int_outputs`) so that can be checked.
- `export_qdq` writes `model.onnx`, a float graph with QuantizeLinear/DequantizeLinear
  pairs around float ops (the "QDQ" format), which ONNX Runtime fuses into its own
  int8 kernels. It is the portable, fast model; it is close to the IR, not exact.

Both mind one ONNX Runtime pitfall: on x86 CPUs without VNNI (AVX2, AVX-512F), its
u8 x s8 integer kernels add pairs of products in saturating int16 (vpmaddubsw), so
an int8 weight paired with uint8 data may be stored as uint8 (w + 128, zero point
128) where it could saturate: ORT's u8 x u8 kernels widen first and are exact.
`model.int.onnx` always does this (it must be exact everywhere). `model.onnx` does
it only for CPUs that need it (`ONNX_WEIGHTS`): the u8 x u8 kernels are about twice
as slow, and on a VNNI CPU the u8 x s8 ones are exact.

Each exporter is a registry of small converters, one per IR op. Tensor and node
names are derived from IR names only, so the same IR always gives the same bytes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, ValueInfoProto, helper, numpy_helper

from .. import __version__
from ..errors import LowbitError
from ..quantizer.dyadic import MANTISSA_BITS, MAX_SHIFT, rounding_term
from ..quantizer.ir import DTYPE_RANGES, Op, QuantizedGraph, Value

OPSET = 21
ONNX_IR_VERSION = 10  # the ONNX IR version of opset 21, which ONNX Runtime accepts
BATCH_DIM = "N"

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
               "int32": TensorProto.INT32}
_NP_TYPES = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}
# Requantization adds 2^62 so the value is non-negative for the unsigned-only BitShift (see _shift_round_clip).
_OFFSET_BITS = 62
# Largest |w| for which u8 x s8 pair sums fit int16: 2 * 255 * 64 = 32640 <= 32767.
_U8S8_SAFE_WEIGHT = 64
# How model.onnx stores weights: "int8" (ORT's fast u8 x s8 kernels; exact on CPUs with VNNI and on ARM),
# "safe" (uint8 where |w| > 64: exact on every CPU, slower), "auto" (int8 if this machine's CPU computes it exactly).
ONNX_WEIGHTS = ("auto", "int8", "safe")


def u8s8_exact_here(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels are exact on this machine: not x86, or x86 with VNNI.

    An x86 machine whose flags cannot be read (no /proc/cpuinfo) counts as not exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def saturation_safe_weights(choice: str) -> bool:
    """`ONNX_WEIGHTS` choice -> whether model.onnx stores its saturation-prone weights as uint8."""
    if choice not in ONNX_WEIGHTS:
        raise LowbitError(f"ONNX weight format {choice!r}: expected one of {', '.join(ONNX_WEIGHTS)}")
    return choice == "safe" or (choice == "auto" and not u8s8_exact_here())


# -- shared graph building ------------------------------------------------------------------------------------------

class _Builder:
    """Accumulates the nodes and initializers of one ONNX graph built from `qgraph`.

    Every name is given by the caller (IR names plus a fixed suffix), and a name used
    twice is an error: it would be a converter bug, and silent renaming could make
    the output depend on conversion order.
    """

    def __init__(self, qgraph: QuantizedGraph):
        self.qgraph = qgraph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set(qgraph.inputs)

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise AssertionError(f"ONNX export: tensor name {name!r} used twice")
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray | np.generic) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), self._claim(name)))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        """Add a node with one output; the node is named after that output."""
        self.nodes.append(helper.make_node(op_type, inputs, [self._claim(output)], name=output, **attrs))
        return output

    def value(self, name: str) -> Value:
        return self.qgraph.values[name]


B = TypeVar("B", bound=_Builder)
F = TypeVar("F", bound=Callable)


def _registrar(table: dict[str, Callable]) -> Callable[..., Callable[[F], F]]:
    """A decorator factory: `@register("conv", ...)` puts a converter in `table` under those IR op names."""
    def register(*ops: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            for name in ops:
                table[name] = fn
            return fn
        return add
    return register


def _value_info(name: str, dtype: str, shape: tuple[int, ...]) -> ValueInfoProto:
    """A graph input/output with a symbolic batch dimension."""
    return helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], [BATCH_DIM, *shape[1:]])


def _check_ir(qgraph: QuantizedGraph, converters: dict[str, Callable], what: str) -> None:
    unknown = sorted({f"{o.name} ({o.op})" for o in qgraph.ops if o.op not in converters})
    if unknown:
        raise LowbitError(f"{what} export: no converter for IR ops {', '.join(unknown)}")
    # Converters rely on the IR's symmetric quantization: padding inserts 0, no zero-point terms.
    nonzero = sorted(v.name for v in qgraph.values.values() if v.zero_point != 0)
    if nonzero:
        raise LowbitError(f"{what} export: values {', '.join(nonzero)} have non-zero zero points; the IR is symmetric")


def _build(builder: B, converters: dict[str, Callable[[B, Op], None]], outputs: list[ValueInfoProto],
           doc: str) -> ModelProto:
    """Run the converters over the IR in order and wrap the result in a checked model."""
    qgraph = builder.qgraph
    for op in qgraph.ops:
        converters[op.op](builder, op)
    inputs = [_value_info(n, "float32", qgraph.values[n].shape) for n in qgraph.inputs]
    graph = helper.make_graph(builder.nodes, qgraph.name, inputs, outputs, builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ONNX_IR_VERSION,
                              producer_name="lowbit", producer_version=__version__, doc_string=doc)
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


# -- attributes and structural ops shared by both exporters --------------------------------------------------------

def _pads(padding: list[int]) -> list[int]:
    """IR [pad_h, pad_w] -> ONNX [top, left, bottom, right]."""
    return [padding[0], padding[1], padding[0], padding[1]]


def _conv_attrs(op: Op) -> dict[str, object]:
    a = op.attrs
    return {"kernel_shape": list(op.arrays["weight"].shape[2:]), "strides": a["stride"], "pads": _pads(a["padding"]),
            "dilations": a["dilation"], "group": a["groups"]}


def _is_global_pool(b: _Builder, op: Op) -> bool:
    """A window covering the whole (unpadded) feature map: a plain sum over H and W."""
    height, width = b.value(op.inputs[0]).shape[2:]
    return list(op.attrs["kernel"]) == [height, width] and not any(op.attrs["padding"])


def _maxpool(b: _Builder, op: Op, x: str, out: str) -> str:
    a = op.attrs
    # ONNX MaxPool pads with -inf like torch, and uses torch's ceil_mode rule.
    return b.node("MaxPool", [x], out, kernel_shape=a["kernel"], strides=a["stride"], pads=_pads(a["padding"]),
                  dilations=a["dilation"], ceil_mode=int(a["ceil_mode"]))


def _pad(b: _Builder, op: Op, x: str, out: str) -> str:
    left, right, top, bottom = op.attrs["pads"]
    pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
    return b.node("Pad", [x, b.const(f"{op.name}/pads", pads)], out, mode="constant")  # constant_value: 0


def _reshape(b: _Builder, op: Op, x: str, out: str) -> str:
    # 0 copies the batch dimension (allowzero=0), so the symbolic batch survives.
    shape = np.array([0, *op.attrs["shape"]], np.int64)
    return b.node("Reshape", [x, b.const(f"{op.name}/shape", shape)], out)


# -- the integer-only model --------------------------------------------------------------------------------------------

INTEGER_CONVERTERS: dict[str, Callable[[_Builder, Op], None]] = {}
_integer = _registrar(INTEGER_CONVERTERS)


def _per_channel(op: Op, array: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """Per-output-channel constants shaped to broadcast against the layer output (channel axis 1 for conv, last
    for linear)."""
    array = np.asarray(array).astype(dtype)
    return array.reshape(-1, 1, 1) if op.op == "conv" else array.reshape(-1)


def _shift_round_clip(b: _Builder, prefix: str, scaled: str, shift: np.ndarray, qmin: int, qmax: int,
                      dtype: str, out: str) -> str:
    """clip((scaled + r) >> c, qmin, qmax) cast to `dtype`, for an int64 `scaled` = acc * mantissa.

    ONNX Runtime's BitShift takes only unsigned types, and `>>` must floor. Since
    |acc * b| < 2^61 (see quantizer.dyadic) and r <= 2^61, v = acc * b + r lies in
    (-2^62, 2^62), so v + 2^62 is in (0, 2^63): no int64 overflow, and non-negative.
    Shift that as uint64, then subtract 2^(62-c). This is exact, because 2^62 is a
    multiple of 2^c: floor((v + 2^62) / 2^c) = floor(v / 2^c) + 2^(62-c).
    """
    shift = np.asarray(shift, np.int64)
    if shift.min() < 0 or shift.max() > min(MAX_SHIFT, _OFFSET_BITS):
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
    return b.node("Cast", [v], out, to=_ONNX_TYPES[dtype])


def _requantize(b: _Builder, prefix: str, acc: str, mantissa: np.ndarray, shift: np.ndarray, qmin: int, qmax: int,
                dtype: str, out: str, bias: np.ndarray | None = None) -> str:
    """quantizer.dyadic.requantize on an integer tensor `acc` (any integer type, widened to int64), after adding
    `bias` if given."""
    mantissa = np.asarray(mantissa, np.int64)
    if mantissa.min() < 0 or mantissa.max() >= 1 << MANTISSA_BITS:  # the bound that keeps acc * b below 2^61
        raise LowbitError(f"{prefix}: requantization mantissa outside [0, 2^{MANTISSA_BITS}): {mantissa.ravel()}")
    wide = b.node("Cast", [acc], f"{prefix}/acc64", to=TensorProto.INT64)
    if bias is not None:
        wide = b.node("Add", [wide, b.const(f"{prefix}/bias", bias.astype(np.int64))], f"{prefix}/acc_biased")
    scaled = b.node("Mul", [wide, b.const(f"{prefix}/mantissa", mantissa)], f"{prefix}/scaled")
    return _shift_round_clip(b, prefix, scaled, shift, qmin, qmax, dtype, out)


def _finish_layer(b: _Builder, op: Op, acc: str) -> None:
    """Add the bias to the int32 accumulator, then requantize, or for an int32 output stop there."""
    bias = _per_channel(op, op.arrays["bias"])
    if "multiplier" not in op.arrays:
        b.node("Add", [acc, b.const(f"{op.name}/bias", bias.astype(np.int32))], op.output)
        return
    # The bias is added in int64, as the reference executor does, so even an acc + bias beyond int32 matches.
    _requantize(b, op.name, acc, _per_channel(op, op.arrays["multiplier"]), _per_channel(op, op.arrays["shift"]),
                op.attrs["qmin"], op.attrs["qmax"], b.value(op.output).dtype, op.output, bias)


@_integer("quantize")
def _int_quantize(b: _Builder, op: Op) -> None:
    v = b.value(op.output)
    scale = b.const(f"{op.name}/scale", np.float32(v.scale))
    zero_point = b.const(f"{op.name}/zero_point", _NP_TYPES[v.dtype](0))  # its type sets the output type
    b.node("QuantizeLinear", [op.inputs[0], scale, zero_point], op.output)


@_integer("dequantize")
def _int_dequantize(b: _Builder, op: Op) -> None:
    v = b.value(op.inputs[0])
    scale = b.const(f"{op.name}/scale", np.asarray(v.scale, np.float32))
    attrs = {} if v.axis is None else {"axis": v.axis}
    b.node("DequantizeLinear", [op.inputs[0], scale], op.output, **attrs)


@_integer("conv")
def _int_conv(b: _Builder, op: Op) -> None:
    w = b.const(f"{op.name}/weight", op.arrays["weight"].astype(np.int8))
    acc = b.node("ConvInteger", [op.inputs[0], w], f"{op.name}/acc", **_conv_attrs(op))
    _finish_layer(b, op, acc)


@_integer("linear")
def _int_linear(b: _Builder, op: Op) -> None:
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
def _int_add(b: _Builder, op: Op) -> None:
    # Each input gets its own mantissa; the shift is shared, so the products add up before rounding.
    # (|int8| * two mantissas below 2^30 is far below the 2^61 bound.)
    terms = []
    for i, (x, m) in enumerate(zip(op.inputs, op.arrays["multiplier"], strict=True)):
        wide = b.node("Cast", [x], f"{op.name}/in{i}_64", to=TensorProto.INT64)
        terms.append(b.node("Mul", [wide, b.const(f"{op.name}/mantissa{i}", np.int64(m))], f"{op.name}/scaled{i}"))
    total = b.node("Add", terms, f"{op.name}/scaled")
    _shift_round_clip(b, op.name, total, op.arrays["shift"][0], op.attrs["qmin"], op.attrs["qmax"],
                      b.value(op.output).dtype, op.output)


@_integer("concat")
def _int_concat(b: _Builder, op: Op) -> None:
    dtype = b.value(op.output).dtype
    parts = [_requantize(b, f"{op.name}/in{i}", x, op.arrays["multiplier"][i], op.arrays["shift"][i],
                         op.attrs["qmin"], op.attrs["qmax"], dtype, f"{op.name}/part{i}")
             for i, x in enumerate(op.inputs)]
    b.node("Concat", parts, op.output, axis=op.attrs["axis"])


@_integer("avgpool")
def _int_avgpool(b: _Builder, op: Op) -> None:
    a, x = op.attrs, op.inputs[0]
    mantissa, shift = op.arrays["multiplier"][0], op.arrays["shift"][0]
    dtype = b.value(op.output).dtype
    if _is_global_pool(b, op):
        wide = b.node("Cast", [x], f"{op.name}/in64", to=TensorProto.INT64)
        axes = b.const(f"{op.name}/axes", np.array([2, 3], np.int64))
        sums = b.node("ReduceSum", [wide, axes], f"{op.name}/sums", keepdims=1)
    else:
        # Window sums as a depthwise convolution with an all-ones kernel; zero padding counts, as in the IR.
        channels = b.value(x).shape[1]
        ones = b.const(f"{op.name}/ones", np.ones((channels, 1, *a["kernel"]), np.int8))
        sums = b.node("ConvInteger", [x, ones], f"{op.name}/sums", kernel_shape=a["kernel"], strides=a["stride"],
                      pads=_pads(a["padding"]), group=channels)
    _requantize(b, op.name, sums, mantissa, shift, a["qmin"], a["qmax"], dtype, op.output)


@_integer("maxpool")
def _int_maxpool(b: _Builder, op: Op) -> None:
    _maxpool(b, op, op.inputs[0], op.output)


@_integer("clamp")
def _int_clamp(b: _Builder, op: Op) -> None:
    np_type = _NP_TYPES[b.value(op.inputs[0]).dtype]
    lo = b.const(f"{op.name}/qmin", np_type(op.attrs["qmin"]))
    hi = b.const(f"{op.name}/qmax", np_type(op.attrs["qmax"]))
    b.node("Clip", [op.inputs[0], lo, hi], op.output)


@_integer("pad")
def _int_pad(b: _Builder, op: Op) -> None:
    _pad(b, op, op.inputs[0], op.output)


@_integer("reshape")
def _int_reshape(b: _Builder, op: Op) -> None:
    _reshape(b, op, op.inputs[0], op.output)


def _integer_model(qgraph: QuantizedGraph) -> ModelProto:
    _check_ir(qgraph, INTEGER_CONVERTERS, "integer ONNX")
    outputs = [_value_info(n, "float32", qgraph.values[n].shape) for n in qgraph.outputs]
    outputs += [_value_info(n, qgraph.values[n].dtype, qgraph.values[n].shape) for n in qgraph.int_outputs]
    doc = ("lowbit integer-only model: integer tensors from QuantizeLinear to DequantizeLinear. Outputs: "
           f"{', '.join(qgraph.outputs)} (float) and {', '.join(qgraph.int_outputs)} (integer, before dequantize).")
    return _build(_Builder(qgraph), INTEGER_CONVERTERS, outputs, doc)


def export_integer(qgraph: QuantizedGraph, path: Path) -> None:
    """Write the integer-only ONNX model (`model.int.onnx`), bit-exact with the reference executor.

    Outputs are the IR's float outputs and its integer outputs before dequantize.
    """
    _save(_integer_model(qgraph), path)


# -- the QDQ model ----------------------------------------------------------------------------------------------------

class _QdqBuilder(_Builder):
    def __init__(self, qgraph: QuantizedGraph, saturation_safe: bool):
        super().__init__(qgraph)
        self.saturation_safe = saturation_safe
        self.float_of: dict[str, str] = {}  # IR value -> the float tensor that carries it


QDQ_CONVERTERS: dict[str, Callable[[_QdqBuilder, Op], None]] = {}
_qdq = _registrar(QDQ_CONVERTERS)


def _activation(b: _QdqBuilder, name: str, y: str) -> None:
    """Put the float result `y` on IR value `name`'s integer grid: QuantizeLinear, then DequantizeLinear.

    int8 values are stored as uint8 with zero point 128 (the same real values):
    ONNX Runtime's fast x86 kernels take u8 activations and s8 weights. An int32
    accumulator (a graph output) stays float.
    """
    v = b.value(name)
    if v.dtype == "int32":
        b.float_of[name] = y
        return
    scale = b.const(f"{name}/scale", np.float32(v.scale))
    zero_point = b.const(f"{name}/zero_point", np.uint8(128 if v.dtype == "int8" else 0))
    q = b.node("QuantizeLinear", [y, scale, zero_point], name)
    b.float_of[name] = b.node("DequantizeLinear", [q, scale, zero_point], f"{name}/dq")


def _clamp_float(b: _QdqBuilder, op: Op, y: str) -> str:
    """The clamp an integer op applies (attrs qmin/qmax), as Relu/Clip in float, where it is narrower than the
    output dtype's range (QuantizeLinear saturates to that range anyway)."""
    v = b.value(op.output)
    lo, hi = DTYPE_RANGES[v.dtype]
    qmin, qmax = op.attrs.get("qmin", lo), op.attrs.get("qmax", hi)
    if qmin <= lo and qmax >= hi:
        return y
    if qmin == 0 and qmax >= hi:
        return b.node("Relu", [y], f"{op.name}/relu")
    bound = [b.const(f"{op.name}/{k}", np.float32(q * v.scale)) if narrower else ""
             for k, q, narrower in (("min", qmin, qmin > lo), ("max", qmax, qmax < hi))]
    return b.node("Clip", [y, *bound], f"{op.name}/clip")


def _weight_dq(b: _QdqBuilder, op: Op, weight: np.ndarray, axis: int) -> str:
    """The weight initializer and its per-channel DequantizeLinear.

    Weights are int8 (zero point 0), except where they could saturate ORT's u8 x s8
    kernels on CPUs without VNNI (see the module docstring): 2 * 255 * |w| > 32767
    once |w| > 64. With `saturation_safe`, such layers store uint8 w + 128 with zero
    point 128 instead (the same real values).
    """
    scale = np.asarray(op.attrs["weight_scale"], np.float32)
    if b.saturation_safe and np.abs(weight.astype(np.int16)).max(initial=0) > _U8S8_SAFE_WEIGHT:
        w = b.const(f"{op.name}/weight", (weight.astype(np.int16) + 128).astype(np.uint8))
        z = b.const(f"{op.name}/weight_zero_point", np.full(scale.shape, 128, np.uint8))
    else:
        w = b.const(f"{op.name}/weight", weight.astype(np.int8))
        z = b.const(f"{op.name}/weight_zero_point", np.zeros(scale.shape, np.int8))
    s = b.const(f"{op.name}/weight_scale", scale)
    return b.node("DequantizeLinear", [w, s, z], f"{op.name}/weight_dq", axis=axis)


def _bias_dq(b: _QdqBuilder, op: Op) -> str:
    # The scale ONNX Runtime assumes when it feeds the int32 bias to its integer kernels: input * weight scale.
    scale = np.float32(op.attrs["input_scale"]) * np.asarray(op.attrs["weight_scale"], np.float32)
    bias = b.const(f"{op.name}/bias", op.arrays["bias"].astype(np.int32))
    s = b.const(f"{op.name}/bias_scale", scale)
    return b.node("DequantizeLinear", [bias, s], f"{op.name}/bias_dq", axis=0)


@_qdq("quantize")
def _qdq_quantize(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, op.inputs[0])


@_qdq("dequantize")
def _qdq_dequantize(b: _QdqBuilder, op: Op) -> None:
    b.node("Identity", [b.float_of[op.inputs[0]]], op.output)


@_qdq("conv")
def _qdq_conv(b: _QdqBuilder, op: Op) -> None:
    x = b.float_of[op.inputs[0]]
    y = b.node("Conv", [x, _weight_dq(b, op, op.arrays["weight"], 0), _bias_dq(b, op)], f"{op.name}/conv",
               **_conv_attrs(op))
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("linear")
def _qdq_linear(b: _QdqBuilder, op: Op) -> None:
    x = b.float_of[op.inputs[0]]
    if len(b.value(op.inputs[0]).shape) == 2:
        y = b.node("Gemm", [x, _weight_dq(b, op, op.arrays["weight"], 0), _bias_dq(b, op)], f"{op.name}/gemm",
                   transB=1)
    else:  # Gemm is 2-D only
        w = _weight_dq(b, op, np.ascontiguousarray(op.arrays["weight"].T), 1)
        y = b.node("MatMul", [x, w], f"{op.name}/matmul")
        y = b.node("Add", [y, _bias_dq(b, op)], f"{op.name}/add_bias")
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("add")
def _qdq_add(b: _QdqBuilder, op: Op) -> None:
    y = b.node("Add", [b.float_of[x] for x in op.inputs], f"{op.name}/add")
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("concat")
def _qdq_concat(b: _QdqBuilder, op: Op) -> None:
    y = b.node("Concat", [b.float_of[x] for x in op.inputs], f"{op.name}/concat", axis=op.attrs["axis"])
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("avgpool")
def _qdq_avgpool(b: _QdqBuilder, op: Op) -> None:
    a, x = op.attrs, b.float_of[op.inputs[0]]
    if _is_global_pool(b, op):
        y = b.node("GlobalAveragePool", [x], f"{op.name}/pool")
    else:
        y = b.node("AveragePool", [x], f"{op.name}/pool", kernel_shape=a["kernel"], strides=a["stride"],
                   pads=_pads(a["padding"]), count_include_pad=1)
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("maxpool")
def _qdq_maxpool(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, _maxpool(b, op, b.float_of[op.inputs[0]], f"{op.name}/pool"))


@_qdq("clamp")
def _qdq_clamp(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, _clamp_float(b, op, b.float_of[op.inputs[0]]))


@_qdq("pad")
def _qdq_pad(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, _pad(b, op, b.float_of[op.inputs[0]], f"{op.name}/pad"))


@_qdq("reshape")
def _qdq_reshape(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, _reshape(b, op, b.float_of[op.inputs[0]], f"{op.name}/reshape"))


def _qdq_model(qgraph: QuantizedGraph, saturation_safe: bool) -> ModelProto:
    _check_ir(qgraph, QDQ_CONVERTERS, "QDQ ONNX")
    outputs = [_value_info(n, "float32", qgraph.values[n].shape) for n in qgraph.outputs]
    weights = ("weights above 64 in magnitude stored as uint8 (exact on every CPU)" if saturation_safe else
               "int8 weights (exact on x86 CPUs with VNNI and on ARM; older x86 CPUs may saturate)")
    doc = (f"lowbit QDQ model: QuantizeLinear/DequantizeLinear around float ops, for ONNX Runtime's int8 kernels; "
           f"{weights}.")
    return _build(_QdqBuilder(qgraph, saturation_safe), QDQ_CONVERTERS, outputs, doc)


def export_qdq(qgraph: QuantizedGraph, path: Path, *, weights: str = "auto") -> bool:
    """Write the QDQ ONNX model (`model.onnx`): float ops between QuantizeLinear/DequantizeLinear pairs, which
    ONNX Runtime runs with int8 kernels. Close to the reference executor, not bit-exact.

    `weights` (`ONNX_WEIGHTS`): "safe" stores layers with weights above 64 in magnitude as uint8 with zero point
    128, so CPUs without VNNI compute them exactly (see `_weight_dq`), on ORT's u8 x u8 kernels (about half as
    fast). "int8" keeps every weight int8: ORT's u8 x s8 fast path, exact only on CPUs with VNNI (or ARM).
    "auto" picks int8 where this machine computes it exactly. Returns whether the weights are saturation-safe.
    """
    saturation_safe = saturation_safe_weights(weights)
    _save(_qdq_model(qgraph, saturation_safe), path)
    return saturation_safe
