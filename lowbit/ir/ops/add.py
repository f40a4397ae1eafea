"""add: elementwise sum of two same-shaped tensors, each rescaled to the output grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

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


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return args[0] + args[1]


def _lower(lw: Any, node: Node) -> None:
    a, b = lw.input_value(node, 0), lw.input_value(node, 1)
    clamp = lw.fused.get(node.name)
    out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
    # One shared shift, so the two scaled inputs add up before rounding.
    ratios = np.array([a.scale / out.scale, b.scale / out.scale])
    _, shift = dyadic(ratios.max())
    mantissas = np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32)
    lw.emit(node.name, "add", [a, b], out, {"qmin": qmin, "qmax": qmax},
            {"multiplier": mantissas, "shift": shift.astype(np.int32)})


def input_mantissas(op: Op) -> list[int]:
    """The mantissa each input is multiplied by before the sum."""
    return [int(m) for m in op.arrays["multiplier"]]


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer:
    """The shared shift-round-clip applied to x0 * m0 + x1 * m1 (already scaled: no mantissa)."""
    return Requantizer(None, op.arrays["shift"].astype(np.int64)[:1], op.attrs["qmin"], op.attrs["qmax"],
                       qgraph.values[op.output].dtype)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    m = input_mantissas(op)
    return requantizer(op, qgraph).apply(args[0] * np.int64(m[0]) + args[1] * np.int64(m[1]))


ADD = register(OpDef(
    "add",
    "two int8/uint8/int16 inputs, each multiplied by its own mantissa, summed in int64, then one shared shift, "
    "rounding and clamp (|int16| x mantissas < 2^45 stays far below int64's range).",
    aten={aten.add.Tensor: _add, aten.add_.Tensor: _add},
    described_as="add (an activation, or a constant broadcast over the batch)",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=lambda op, qgraph: [requantizer(op, qgraph)],
    absorbs_clamp=True, joins_inputs=True,
))
