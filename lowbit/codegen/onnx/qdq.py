"""The QDQ ONNX model (`model.onnx`) of the IR: float ops between QuantizeLinear/DequantizeLinear pairs.

ONNX Runtime fuses the pairs into its own int8 kernels, so this is the portable,
fast model; it is close to the reference executor, not bit-exact.

ORT pitfall: on x86 CPUs without VNNI (AVX2, AVX-512F), ORT's u8 x s8 integer
kernels add pairs of products in saturating int16 (vpmaddubsw), so an int8 weight
paired with uint8 data may be stored as uint8 (w + 128, zero point 128) where it
could saturate: ORT's u8 x u8 kernels widen first and are exact. That is only done
for CPUs that need it (`ONNX_WEIGHTS`): the u8 x u8 kernels are about twice as
slow, and on a VNNI CPU the u8 x s8 ones are exact.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto

from ...errors import LowbitError
from ...ir import Op, QuantizedGraph
from ...ir.dtypes import qrange
from ...ir.ops import add, lut
from ...ir.ops.layer_norm import LN_H, LN_P
from ...ir.ops.layer_norm import constants_of as layer_norm_constants
from ...ir.weights import u8s8_pairs_exact
from .builder import (
    Builder,
    build,
    check_ir,
    conv_attrs,
    is_global_pool,
    maxpool,
    pad,
    pads,
    registrar,
    reshape,
    save,
    value_info,
)

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


class _QdqBuilder(Builder):
    def __init__(self, qgraph: QuantizedGraph, saturation_safe: bool):
        super().__init__(qgraph)
        self.saturation_safe = saturation_safe
        self.float_of: dict[str, str] = {}  # IR value -> the float tensor that carries it


QDQ_CONVERTERS: dict[str, Callable[[_QdqBuilder, Op], None]] = {}
_qdq = registrar(QDQ_CONVERTERS)


def _activation(b: _QdqBuilder, name: str, y: str, alpha: float = 1.0) -> None:
    """Put the float result `y` times `alpha` on IR value `name`'s integer grid: QuantizeLinear (of y, at scale
    s / alpha, so no Mul stands between an op and its QuantizeLinear), then DequantizeLinear at s.

    int8 values are stored as uint8 with zero point 128 (the same real values):
    ONNX Runtime's fast x86 kernels take u8 activations and s8 weights. int16 values
    stay int16 (zero point 0). An int32 value (an accumulator, scores, a pooled sum) stays float.
    """
    v = b.value(name)
    if v.dtype == "int32":
        b.float_of[name] = y if alpha == 1.0 else b.node("Mul", [y, b.const(f"{name}/alpha", np.float32(alpha))],
                                                         f"{name}/scaled")
        return
    scale = b.const(f"{name}/scale", np.float32(v.scale))
    stored = np.int16(0) if v.dtype == "int16" else np.uint8(128 if v.dtype == "int8" else 0)
    zero_point = b.const(f"{name}/zero_point", stored)
    q_scale = scale if alpha == 1.0 else b.const(f"{name}/q_scale", np.float32(np.float64(v.scale) / alpha))
    q = b.node("QuantizeLinear", [y, q_scale, zero_point], name)
    b.float_of[name] = b.node("DequantizeLinear", [q, scale, zero_point], f"{name}/dq")


def _clamp_float(b: _QdqBuilder, op: Op, y: str) -> str:
    """The clamp an integer op applies (attrs qmin/qmax), as Relu/Clip in float, where it is narrower than the
    output dtype's range (QuantizeLinear saturates to that range anyway)."""
    v = b.value(op.output)
    lo, hi = qrange(v.dtype)
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
    if b.saturation_safe and not u8s8_pairs_exact(weight):
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
               **conv_attrs(op))
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
    terms = [b.float_of[x] for x in op.inputs]
    k = add.channel_input(op)
    if k is not None:  # input k times s_j, the per-channel factor its mantissas carry from its grid to the output's
        ratio = np.float64(b.value(op.output).scale) / np.float64(b.value(op.inputs[k]).scale)
        s = op.arrays["channel_multiplier"].astype(np.float64) * np.exp2(-float(op.arrays["shift"][0])) * ratio
        terms[k] = b.node("Mul", [terms[k], _f32(b, f"{op.name}/channel_scale", s)], f"{op.name}/rescaled{k}")
    y = b.node("Add", terms, f"{op.name}/add")
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("concat")
def _qdq_concat(b: _QdqBuilder, op: Op) -> None:
    y = b.node("Concat", [b.float_of[x] for x in op.inputs], f"{op.name}/concat", axis=op.attrs["axis"])
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("avgpool")
def _qdq_avgpool(b: _QdqBuilder, op: Op) -> None:
    a, x = op.attrs, b.float_of[op.inputs[0]]
    if is_global_pool(b, op):
        y = b.node("GlobalAveragePool", [x], f"{op.name}/pool")
    else:
        y = b.node("AveragePool", [x], f"{op.name}/pool", kernel_shape=a["kernel"], strides=a["stride"],
                   pads=pads(a["padding"]), count_include_pad=1)
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("lut")
def _qdq_lut(b: _QdqBuilder, op: Op) -> None:
    # The stored (uint8) integer of the input, as `_activation` names it, is the table index itself: int8
    # values are stored with zero point 128, that is x + 128 = x - qmin. The table's entries go back to float.
    # Per-channel tables are flattened: channel j's entries start at 256 * j.
    index = b.node("Cast", [op.inputs[0]], f"{op.name}/index", to=TensorProto.INT32)
    table = (op.arrays["table"].astype(np.float32) * np.float32(b.value(op.output).scale)).astype(np.float32)
    if lut.channels(op):
        offset = np.arange(table.shape[0], dtype=np.int32) * np.int32(table.shape[1])
        index = b.node("Add", [index, b.const(f"{op.name}/channel_offset", offset)], f"{op.name}/channel_index")
    y = b.node("Gather", [b.const(f"{op.name}/table", table.reshape(-1)), index], f"{op.name}/lut", axis=0)
    _activation(b, op.output, y)


@_qdq("maxpool")
def _qdq_maxpool(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, maxpool(b, op, b.float_of[op.inputs[0]], f"{op.name}/pool"))


@_qdq("clamp")
def _qdq_clamp(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, _clamp_float(b, op, b.float_of[op.inputs[0]]))


@_qdq("pad")
def _qdq_pad(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, pad(b, op, b.float_of[op.inputs[0]], f"{op.name}/pad"))


@_qdq("reshape")
def _qdq_reshape(b: _QdqBuilder, op: Op) -> None:
    _activation(b, op.output, reshape(b, op, b.float_of[op.inputs[0]], f"{op.name}/reshape"))


# -- the encoder's ops: float ops that ORT runs (and fuses where it can), on the same grids as the IR ----------------

def _f32(b: _QdqBuilder, name: str, value: np.ndarray | float) -> str:
    return b.const(name, np.asarray(value, dtype=np.float32))


def _nonzero(b: _QdqBuilder, prefix: str, mask: str) -> str:
    """The float 0/1 of `mask != 0` (the integer ops keep a key or row where its mask is not 0)."""
    zero = b.node("Equal", [mask, b.const(f"{prefix}/zero", np.int64(0))], f"{prefix}/is_zero")
    return b.node("Cast", [b.node("Not", [zero], f"{prefix}/nonzero")], f"{prefix}/keep", to=TensorProto.FLOAT)


@_qdq("embedding")
def _qdq_embedding(b: _QdqBuilder, op: Op) -> None:
    # The int8 rows with their own scales (mantissa / 2^shift output steps): a per-row DequantizeLinear that ORT
    # folds once at load, so the file keeps the table at one byte per entry.
    scale = (op.arrays["mantissa"].astype(np.float64) * np.exp2(-float(op.arrays["shift"][0]))
             * np.float64(b.value(op.output).scale))
    rows = b.const(f"{op.name}/rows", op.arrays["rows"].astype(np.int8))
    zero = b.const(f"{op.name}/rows_zero_point", np.zeros(len(scale), np.int8))
    table = b.node("DequantizeLinear", [rows, _f32(b, f"{op.name}/row_scale", scale), zero], f"{op.name}/table",
                   axis=0)
    _activation(b, op.output, b.node("Gather", [table, op.inputs[0]], f"{op.name}/gather", axis=0))


@_qdq("add_constant")
def _qdq_add_constant(b: _QdqBuilder, op: Op) -> None:
    # C is stored on the output grid at 2^shift times its step.
    constant = (op.arrays["constant"].astype(np.float64) * np.exp2(-float(op.arrays["shift"][0]))
                * np.float64(b.value(op.output).scale))
    y = b.node("Add", [b.float_of[op.inputs[0]], _f32(b, f"{op.name}/constant", constant)], f"{op.name}/add")
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("permute")
def _qdq_permute(b: _QdqBuilder, op: Op) -> None:
    y = b.node("Transpose", [b.float_of[op.inputs[0]]], f"{op.name}/transpose", perm=list(op.attrs["dims"]))
    _activation(b, op.output, y)


@_qdq("matmul")
def _qdq_matmul(b: _QdqBuilder, op: Op) -> None:
    a, c, out = (b.value(v) for v in (*op.inputs, op.output))
    # alpha (1/sqrt(head size)) is folded in the IR: recover it from the scales (and the requantizer).
    alpha = np.float64(out.scale) / (np.float64(a.scale) * np.float64(c.scale))
    if "multiplier" in op.arrays:
        alpha *= float(op.arrays["multiplier"][0]) * 2.0 ** -float(op.arrays["shift"][0])
    y = b.node("MatMul", [b.float_of[op.inputs[0]], b.float_of[op.inputs[1]]], f"{op.name}/matmul")
    _activation(b, op.output, y, float(alpha))


@_qdq("softmax")
def _qdq_softmax(b: _QdqBuilder, op: Op) -> None:
    x = b.float_of[op.inputs[0]]
    if len(op.inputs) > 1:
        # The masked keys' bias, as the model adds it: (1 - keep) * -10000 broadcast as [B, 1, ..., 1, S].
        rank = len(b.value(op.output).shape)
        keep = _nonzero(b, f"{op.name}/mask", op.inputs[1])
        dropped = b.node("Sub", [_f32(b, f"{op.name}/one", 1.0), keep], f"{op.name}/dropped")
        bias = b.node("Mul", [dropped, _f32(b, f"{op.name}/mask_bias", -10000.0)], f"{op.name}/bias")
        bias = b.node("Unsqueeze", [bias, b.const(f"{op.name}/unit_dims", np.arange(1, rank - 1, dtype=np.int64))],
                      f"{op.name}/bias_broadcast")
        x = b.node("Add", [x, bias], f"{op.name}/masked")
    _activation(b, op.output, b.node("Softmax", [x], f"{op.name}/softmax", axis=-1))


@_qdq("layer_norm")
def _qdq_layer_norm(b: _QdqBuilder, op: Op) -> None:
    c = layer_norm_constants(op)
    out_scale, in_scale = np.float64(b.value(op.output).scale), np.float64(b.value(op.inputs[0]).scale)
    # The integer constants back to floats: gamma_j = b_j / 2^c_j * out_scale * 2^P / sqrt(N), beta_j in Q.H steps,
    # and eps from E = N eps (N / (2^k in_scale))^2 (rounded to an integer: 0 becomes a tiny eps).
    gamma = c.mantissa.astype(np.float64) * np.exp2(-c.shift.astype(np.float64)) * out_scale * 2.0**LN_P
    gamma /= np.sqrt(c.width)
    beta = c.beta.astype(np.float64) * 2.0**-LN_H * out_scale
    eps = c.eps_int / (c.width * (c.width / (2.0**c.k * in_scale)) ** 2) if c.eps_int else 1e-12
    y = b.node("LayerNormalization", [b.float_of[op.inputs[0]], _f32(b, f"{op.name}/gamma", gamma),
                                      _f32(b, f"{op.name}/beta", beta)], f"{op.name}/layer_norm", axis=-1,
               epsilon=float(eps))
    _activation(b, op.output, _clamp_float(b, op, y))


@_qdq("masked_mean")
def _qdq_masked_mean(b: _QdqBuilder, op: Op) -> None:
    keep = _nonzero(b, f"{op.name}/mask", op.inputs[1])
    seq = b.const(f"{op.name}/seq_axis", np.array([1], np.int64))
    rows = b.node("Mul", [b.float_of[op.inputs[0]],
                          b.node("Unsqueeze", [keep, b.const(f"{op.name}/last", np.array([-1], np.int64))],
                                 f"{op.name}/keep_column")], f"{op.name}/kept")
    total = b.node("ReduceSum", [rows, seq], f"{op.name}/sum", keepdims=0)
    count = b.node("Max", [b.node("ReduceSum", [keep, seq], f"{op.name}/count", keepdims=1),
                           _f32(b, f"{op.name}/one", 1.0)], f"{op.name}/count_at_least_one")
    _activation(b, op.output, b.node("Div", [total, count], f"{op.name}/mean"))


def _qdq_model(qgraph: QuantizedGraph, saturation_safe: bool) -> ModelProto:
    check_ir(qgraph, QDQ_CONVERTERS, "QDQ ONNX")
    outputs = [value_info(n, "float32", qgraph.values[n].shape) for n in qgraph.outputs]
    weights = ("weights above 64 in magnitude stored as uint8 (exact on every CPU)" if saturation_safe else
               "int8 weights (exact on x86 CPUs with VNNI and on ARM; older x86 CPUs may saturate)")
    doc = (f"lowbit QDQ model: QuantizeLinear/DequantizeLinear around float ops, for ONNX Runtime's int8 kernels; "
           f"{weights}.")
    return build(_QdqBuilder(qgraph, saturation_safe), QDQ_CONVERTERS, outputs, doc)


def export_qdq(qgraph: QuantizedGraph, path: Path, *, weights: str = "auto") -> bool:
    """Write the QDQ ONNX model (`model.onnx`): float ops between QuantizeLinear/DequantizeLinear pairs, which
    ONNX Runtime runs with int8 kernels. Close to the reference executor, not bit-exact.

    `weights` (`ONNX_WEIGHTS`): "safe" stores layers with weights above 64 in magnitude as uint8 with zero point
    128, so CPUs without VNNI compute them exactly (see `_weight_dq`), on ORT's u8 x u8 kernels (about half as
    fast). "int8" keeps every weight int8: ORT's u8 x s8 fast path, exact only on CPUs with VNNI (or ARM).
    "auto" picks int8 where this machine computes it exactly. Returns whether the weights are saturation-safe.
    """
    saturation_safe = saturation_safe_weights(weights)
    save(_qdq_model(qgraph, saturation_safe), path)
    return saturation_safe
