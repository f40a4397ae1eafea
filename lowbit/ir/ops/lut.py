"""lut: an elementwise function of an 8-bit integer as a 256-entry table, the primitive of integer activations.

Any float function f of an int8/uint8 tensor x with scale s_x, requantized to an
output grid s_out, takes at most 256 values, so it can be computed exactly in
advance: table[i] = clip(round(f((i + qmin_x) * s_x) / s_out)). At run time the
op is one gather, integer in and integer out. Float ops such as hardswish or
sigmoid lower to it (`lower_elementwise`), so a new elementwise op is one module
with no backend work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dtypes import dtype, qrange
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

TABLE_INPUT_DTYPES = ("int8", "uint8")
# An int16 input would need a 65536-entry table per op: these ops keep their inputs at 8 bits.
TABLE_REFUSAL = "it lowers to a 256-entry table lookup, which needs an 8-bit input"


def table_for(fn: Callable[[np.ndarray], np.ndarray], in_dtype: str, in_scale: float, out_scale: float,
              qmin: int, qmax: int, out_dtype: str) -> np.ndarray:
    """The table of `fn` (float64 -> float64, elementwise) from the input grid to the output grid."""
    lo, hi = qrange(in_dtype)
    x = np.arange(lo, hi + 1, dtype=np.float64) * np.float64(in_scale)
    q = np.rint(fn(x) / np.float64(out_scale))  # half to even, as the fake-quant simulation rounds
    return np.clip(q, qmin, qmax).astype(dtype(out_dtype).numpy)


def lower_elementwise(lw: Any, node: Node, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Lower a float node y = fn(x) to a `lut` on its quantized input (a clamp after it folds into the table)."""
    x = lw.input_value(node)
    if x.dtype not in TABLE_INPUT_DTYPES:
        raise LowbitError(f"node {node.name} ({node.op}): {TABLE_REFUSAL}, not {x.dtype}")
    clamp = lw.fused.get(node.name)
    out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
    table = table_for(fn, x.dtype, x.scale, out.scale, qmin, qmax, out.dtype)
    lw.emit(node.name, "lut", [x], out, {"qmin": qmin, "qmax": qmax}, {"table": table})


def index_offset(op: Op, qgraph: QuantizedGraph) -> int:
    """What is added to the input to index the table: -qmin of the input dtype (128 for int8, 0 for uint8)."""
    return -qrange(qgraph.values[op.inputs[0]].dtype)[0]


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    index = np.asarray(args[0], dtype=np.int64) + index_offset(op, qgraph)
    return op.arrays["table"].astype(np.int64)[index]


LUT = register(OpDef(
    "lut",
    "table lookup: out = table[x - qmin(x's dtype)] for an int8/uint8 input (never int16: 65536 entries), a "
    "256-entry table of the output dtype (an elementwise function precomputed on the integer grid).",
    reference=_reference, int16_refusal=TABLE_REFUSAL,
))


def elementwise_op(name: str, summary: str, numpy_fn: Callable[[np.ndarray], np.ndarray],
                   torch_fn: Callable[[torch.Tensor], torch.Tensor], aten_targets: tuple[Any, ...],
                   absorbs_clamp: bool = False, check: Callable[[Any, Any], None] | None = None) -> OpDef:
    """Register a float elementwise op y = f(x) that lowers to `lut`: its float semantics (`torch_fn`), the same
    function in float64 numpy for the table (`numpy_fn`), and the ATen ops captured as it. `check(ctx, fx)`
    raises `UnsupportedAttr` for an ATen call whose other arguments make it a different function."""

    def convert(ctx: Any, fx: Any) -> Any:
        if check is not None:
            check(ctx, fx)
        return ctx.emit(fx, name, [ctx.tensor(fx, 0, "input")])

    def evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch_fn(args[0])

    return register(OpDef(
        name, f"{summary}; lowered to `lut`.",
        aten=dict.fromkeys(aten_targets, convert), described_as=name,
        evaluate=evaluate, lower=lambda lw, node: lower_elementwise(lw, node, numpy_fn),
        absorbs_clamp=absorbs_clamp, int16_refusal=TABLE_REFUSAL,
    ))
