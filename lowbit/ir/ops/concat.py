"""concat: inputs joined along a non-batch axis, each first requantized to the output grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..dyadic import dyadic
from ..requantizer import Requantizer
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


def _cat(ctx: Any, fx: Any) -> Any:
    parts = ctx.arg(fx, 0, "tensors")
    if not all(ctx.is_activation(p) for p in parts):
        raise UnsupportedAttr("cat of a constant")
    axis = ctx.arg(fx, 1, "dim", 0) % len(fx.meta["val"].shape)
    if axis == 0:
        raise UnsupportedAttr("cat along the batch dimension")
    return ctx.emit(fx, "concat", [p.node for p in parts], {"axis": axis})


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(args, node.attrs["axis"])


def _lower(lw: Any, node: Node) -> None:
    parts = [lw.input_value(node, i) for i in range(len(node.inputs))]
    out, qmin, qmax = lw.activation(node.name, node.shape)
    mantissa, shift = dyadic(np.array([p.scale / out.scale for p in parts]))
    lw.emit(node.name, "concat", parts, out, {"axis": node.attrs["axis"], "qmin": qmin, "qmax": qmax},
            {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32)})


def requantizers(op: Op, qgraph: QuantizedGraph) -> list[Requantizer]:
    """One per input: each is moved to the output grid on its own."""
    dtype = qgraph.values[op.output].dtype
    m, c = op.arrays["multiplier"].astype(np.int64), op.arrays["shift"].astype(np.int64)
    return [Requantizer(m[i:i + 1], c[i:i + 1], op.attrs["qmin"], op.attrs["qmax"], dtype) for i in range(len(m))]


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    parts = [rq.apply(x) for rq, x in zip(requantizers(op, qgraph), args, strict=True)]
    return np.concatenate(parts, axis=op.attrs["axis"])


CONCAT = register(OpDef(
    "concat",
    "each input requantized to the output scale (its own mantissa and shift), then concatenated along `axis`.",
    aten={aten.cat.default: _cat},
    described_as="cat",
    evaluate=_evaluate, lower=_lower, reference=_reference, requantizers=requantizers,
    joins_inputs=True,
))
