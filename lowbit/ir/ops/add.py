"""add: elementwise sum of two same-shaped tensors, each rescaled to the output grid.

A float add node may carry `attrs["channel_scale"]`, a vector m over the last axis, and `attrs["channel_input"]`
= k: it computes x_k * m + x_(1-k). SmoothQuant puts it there (`quantizer.smooth`) when a post-LN LayerNorm's
output, divided by s per channel so that the linears reading it quantize well, is also read by the residual add:
m = s restores the LayerNorm's output in the sum. The integer add then multiplies input k by a mantissa per
channel; its rescale was a multiplication anyway, so the sum stays exact up to the usual requantization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dyadic import dyadic
from ..requantizer import Requantizer
from . import add_constant
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


def _add(ctx: Any, fx: Any) -> Any:
    if ctx.arg(fx, 2, "alpha", 1) != 1:
        raise UnsupportedAttr("add with alpha != 1")
    lhs, rhs = ctx.arg(fx, 0, "self"), ctx.arg(fx, 1, "other")
    x, c = (lhs, rhs) if ctx.is_activation(lhs) else (rhs, lhs)
    if ctx.is_activation(x) and isinstance(c, torch.Tensor):  # an activation plus a (folded) constant tensor
        return add_constant.emit(ctx, fx, x.node, c)
    a, b = ctx.tensor(fx, 0, "self"), ctx.tensor(fx, 1, "other")
    if ctx.by_name[a].shape != ctx.by_name[b].shape:
        raise UnsupportedAttr("add with broadcasting")
    return ctx.emit(fx, "add", [a, b])


def channel_scale(node: Node) -> tuple[int, torch.Tensor] | None:
    """(k, m): input k is multiplied by m over the last axis before the sum; None for a plain add."""
    scale = node.attrs.get("channel_scale")
    if scale is None:
        return None
    k = node.attrs.get("channel_input")
    if k not in (0, 1) or tuple(scale.shape) != tuple(node.shape[-1:]):
        raise LowbitError(f"node {node.name} (add): channel_scale {tuple(scale.shape)} must be a vector over the "
                          f"last axis {tuple(node.shape[-1:])} and channel_input 0 or 1, not {k!r}")
    return k, scale


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    scaled = channel_scale(node)
    if scaled is None:
        return args[0] + args[1]
    k, m = scaled
    return args[k] * m.to(args[k].dtype) + args[1 - k]


def _lower(lw: Any, node: Node) -> None:
    a, b = lw.input_value(node, 0), lw.input_value(node, 1)
    clamp = lw.fused.get(node.name)
    out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
    ratios = [np.float64(a.scale / out.scale), np.float64(b.scale / out.scale)]
    scaled = channel_scale(node)
    if scaled is not None:
        ratios[scaled[0]] = ratios[scaled[0]] * scaled[1].double().numpy()
    # One shared shift, so the two scaled inputs add up before rounding.
    _, shift = dyadic(max(float(np.max(r)) for r in ratios))
    mantissas = [np.round(r * np.exp2(float(shift[0]))).astype(np.int32) for r in ratios]
    attrs = {"qmin": qmin, "qmax": qmax}
    arrays = {"shift": shift.astype(np.int32)}
    if scaled is None:
        arrays["multiplier"] = np.array(mantissas, dtype=np.int32)
    else:
        k = scaled[0]
        attrs["channel_input"] = k
        arrays["multiplier"] = np.array([mantissas[1 - k]], dtype=np.int32)  # the other input's
        arrays["channel_multiplier"] = mantissas[k]
    lw.emit(node.name, "add", [a, b], out, attrs, arrays)


def channel_input(op: Op) -> int | None:
    """The input multiplied per channel (over the last axis), or None for a plain add."""
    return op.attrs.get("channel_input") if "channel_multiplier" in op.arrays else None


def input_multipliers(op: Op) -> list[np.ndarray]:
    """What each input is multiplied by before the sum: an int64 scalar, or for the per-channel input an int64
    vector over the last axis."""
    k = channel_input(op)
    if k is None:
        return [np.int64(m) for m in op.arrays["multiplier"]]
    out = [np.int64(op.arrays["multiplier"][0])] * 2
    out[k] = op.arrays["channel_multiplier"].astype(np.int64)
    return out


def input_mantissas(op: Op) -> list[int]:
    """The mantissa each input is multiplied by before the sum, for an add with no per-channel multiplier (a
    LowbitError for one: read `input_multipliers` instead)."""
    if channel_input(op) is not None:
        raise LowbitError(f"add {op.name}: input {channel_input(op)} has a mantissa per channel; this backend "
                          "path supports only scalar mantissas")
    return [int(m) for m in op.arrays["multiplier"]]


def check_channels(op: Op, qgraph: QuantizedGraph) -> None:
    """The per-channel mantissas must match the last axis."""
    k = channel_input(op)
    width = qgraph.values[op.output].shape[-1]
    if k is not None and op.arrays["channel_multiplier"].shape != (width,):
        raise LowbitError(f"add {op.name}: {op.arrays['channel_multiplier'].shape} per-channel mantissas for a "
                          f"last axis of {width}")


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer:
    """The shared shift-round-clip applied to x0 * m0 + x1 * m1 (already scaled: no mantissa)."""
    return Requantizer(None, op.arrays["shift"].astype(np.int64)[:1], op.attrs["qmin"], op.attrs["qmax"],
                       qgraph.values[op.output].dtype)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    check_channels(op, qgraph)
    m = input_multipliers(op)
    return requantizer(op, qgraph).apply(args[0].astype(np.int64) * m[0] + args[1].astype(np.int64) * m[1])


ADD = register(OpDef(
    "add",
    "two int8/uint8/int16 inputs, each multiplied by its own mantissa, summed in int64, then one shared shift, "
    "rounding and clamp (|int16| x mantissas < 2^45 stays far below int64's range). With `channel_input` = k, "
    "input k's mantissa is a vector `channel_multiplier` over the last axis (a per-channel rescale; the other "
    "input's is `multiplier` [1]).",
    aten={aten.add.Tensor: _add, aten.add_.Tensor: _add},
    described_as="add (an activation, or a constant broadcast over the batch)",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=lambda op, qgraph: [requantizer(op, qgraph)],
    absorbs_clamp=True, joins_inputs=True,
))
