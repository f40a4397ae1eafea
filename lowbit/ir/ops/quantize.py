"""input, quantize and dequantize: where the integer graph begins and ends.

A graph input is float; lowering puts a `quantize` right after it, and a
`dequantize` before every graph output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import qrange
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """float32 -> int, as ONNX QuantizeLinear: x / scale in float32, round half to even, saturate."""
    lo, hi = qrange(dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, lo, hi).astype(np.int64)


def _lower_input(lw: Any, node: Node) -> None:
    # The float input keeps the user's name; its quantized copy is `<name>_q`.
    q, _, _ = lw.activation(node.name, node.shape, ir_name=f"{node.name}_q")
    x = lw.float_value(node.name, node.shape)
    lw.emit(f"{node.name}_quantize", "quantize", [x], q)


def _quantize(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    out = qgraph.values[op.output]
    return quantize_input(args[0], out.scale, out.zero_point, out.dtype)


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _dequantize(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    v = qgraph.values[op.inputs[0]]
    scale = np.asarray(v.scale, dtype=np.float32)
    if v.axis is not None:
        scale = scale.reshape(channel_shape(args[0].ndim, v.axis))
    return (args[0] - v.zero_point).astype(np.float32) * scale


INPUT = register(OpDef("input", "a float graph input; lowered to a `quantize`.", lower=_lower_input))
QUANTIZE = register(OpDef(
    "quantize",
    "float32 -> int8/uint8/int16 as ONNX QuantizeLinear: x / scale in float32, round half to even, saturate.",
    reference=_quantize,
))
DEQUANTIZE = register(OpDef(
    "dequantize",
    "int -> float32: q * scale, per tensor or per channel on the value's `axis`.",
    reference=_dequantize,
))
