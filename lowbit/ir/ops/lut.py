"""lut: an elementwise function of an 8-bit integer as a 256-entry table, the primitive of integer activations.

Any float function f of an int8/uint8 tensor x with scale s_x, requantized to an
output grid s_out, takes at most 256 values, so it can be computed exactly in
advance: table[i] = clip(round(f((i + qmin_x) * s_x) / s_out)). At run time the
op is one gather, integer in and integer out. Float ops such as hardswish or
sigmoid lower to it (`lower_elementwise`), so a new elementwise op is one module
with no backend work.

A float elementwise node may carry `attrs["channel_scale"]`, a vector m over the last axis: it then computes
f(x) * m_j (SmoothQuant's 1/s folded through the nonlinearity, `quantizer.smooth`). Its `lut` has one table per
channel, [C, 256], table[j, i] = clip(round(f(x_i) * m_j / s_out)): still exact on the integer grid.
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
TABLE_OPS: set[str] = set()  # the float elementwise ops that lower to `lut` (and so take a channel_scale)


def table_for(fn: Callable[[np.ndarray], np.ndarray], in_dtype: str, in_scale: float, out_scale: float,
              qmin: int, qmax: int, out_dtype: str, channel_scale: np.ndarray | None = None) -> np.ndarray:
    """The table of `fn` (float64 -> float64, elementwise) from the input grid to the output grid: [256], or
    [C, 256] for the function times `channel_scale` [C] (one table per channel of the last axis)."""
    lo, hi = qrange(in_dtype)
    x = np.arange(lo, hi + 1, dtype=np.float64) * np.float64(in_scale)
    y = fn(x)
    if channel_scale is not None:
        y = np.asarray(channel_scale, dtype=np.float64).reshape(-1, 1) * y
    q = np.rint(y / np.float64(out_scale))  # half to even, as the fake-quant simulation rounds
    return np.clip(q, qmin, qmax).astype(dtype(out_dtype).numpy)


def channel_scale(node: Node) -> np.ndarray | None:
    """The node's per-channel output multiplier (float64 [C] over the last axis), or None."""
    scale = node.attrs.get("channel_scale")
    if scale is None:
        return None
    scale = np.asarray(torch.as_tensor(scale).double().numpy()).reshape(-1)
    if node.shape and scale.shape != (node.shape[-1],):
        raise LowbitError(f"node {node.name} ({node.op}): channel_scale has {scale.size} entries, but the last "
                          f"axis has {node.shape[-1]} channels")
    return scale


def lower_elementwise(lw: Any, node: Node, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Lower a float node y = fn(x) to a `lut` on its quantized input (a clamp after it folds into the table)."""
    x = lw.input_value(node)
    if x.dtype not in TABLE_INPUT_DTYPES:
        raise LowbitError(f"node {node.name} ({node.op}): {TABLE_REFUSAL}, not {x.dtype}")
    clamp = lw.fused.get(node.name)
    out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
    table = table_for(fn, x.dtype, x.scale, out.scale, qmin, qmax, out.dtype, channel_scale(node))
    lw.emit(node.name, "lut", [x], out, {"qmin": qmin, "qmax": qmax}, {"table": table})


def index_offset(op: Op, qgraph: QuantizedGraph) -> int:
    """What is added to the input to index the table: -qmin of the input dtype (128 for int8, 0 for uint8)."""
    return -qrange(qgraph.values[op.inputs[0]].dtype)[0]


def channels(op: Op) -> int:
    """The number of per-channel tables (over the input's last axis), or 0 for one table for all."""
    table = op.arrays["table"]
    return table.shape[0] if table.ndim == 2 else 0


def check_channels(op: Op, qgraph: QuantizedGraph) -> None:
    """A per-channel table must have one row per channel of the input's last axis."""
    width = qgraph.values[op.inputs[0]].shape[-1]
    if channels(op) and channels(op) != width:
        raise LowbitError(f"lut {op.name}: {channels(op)} per-channel tables for an input whose last axis has "
                          f"{width} channels")


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    index = np.asarray(args[0], dtype=np.int64) + index_offset(op, qgraph)
    table = op.arrays["table"].astype(np.int64)
    if not channels(op):
        return table[index]
    check_channels(op, qgraph)
    return table[np.arange(table.shape[0]), index]  # the channel index broadcasts over the last axis


LUT = register(OpDef(
    "lut",
    "table lookup: out = table[x - qmin(x's dtype)] for an int8/uint8 input (never int16: 65536 entries), a "
    "256-entry table of the output dtype (an elementwise function precomputed on the integer grid); or one "
    "table per channel of the last axis, table [C, 256]: out[..., j] = table[j, x[..., j] - qmin].",
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
        y = torch_fn(args[0])
        scale = node.attrs.get("channel_scale")
        return y if scale is None else y * scale.to(y.dtype)

    TABLE_OPS.add(name)
    return register(OpDef(
        name, f"{summary}; lowered to `lut` (one table per channel with `channel_scale`).",
        aten=dict.fromkeys(aten_targets, convert), described_as=name,
        evaluate=evaluate, lower=lambda lw, node: lower_elementwise(lw, node, numpy_fn),
        absorbs_clamp=absorbs_clamp, int16_refusal=TABLE_REFUSAL,
    ))
