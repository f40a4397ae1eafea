"""input, quantize and dequantize: where the integer graph begins and ends.

A float graph input gets a `quantize` right after it, and every graph output a
`dequantize` before it. An integer graph input (token ids, an attention mask) is
int64 and enters the integer graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
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


INPUT_DTYPES = ("float32", "int64")


@dataclass(frozen=True)
class InputAttrs:
    dtype: str = "float32"  # float32, or int64 (token ids, masks)

    def __post_init__(self) -> None:
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"graph inputs are {' or '.join(INPUT_DTYPES)}, not {self.dtype}")


def input_dtype(node: Node) -> str:
    return node.attrs.get("dtype", "float32")


def _lower_input(lw: Any, node: Node) -> None:
    if input_dtype(node) == "int64":
        lw.float_to_int[node.name] = lw.graph_input(node.name, "int64", node.shape).name
        return
    # The float input keeps the user's name; its quantized copy is `<name>_q`.
    q, _, _ = lw.activation(node.name, node.shape, ir_name=f"{node.name}_q")
    x = lw.graph_input(node.name, "float32", node.shape)
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


INPUT = register(OpDef("input", "a graph input: float32, lowered to a `quantize`, or int64 (token ids, a mask), "
                             "read by the integer ops as it is.", attrs=InputAttrs, lower=_lower_input))
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
