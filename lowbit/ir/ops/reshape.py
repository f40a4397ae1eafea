"""reshape: flatten/view/reshape that keeps the batch dimension; the integers and the scale are unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


def _reshape(ctx: Any, fx: Any) -> Any:
    x = ctx.tensor(fx, 0, "input")
    if fx.meta["val"].shape[0] != ctx.by_name[x].shape[0]:
        raise UnsupportedAttr("reshape that changes the batch dimension")
    return ctx.emit(fx, "reshape", [x])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return args[0].reshape(args[0].shape[0], *node.shape[1:])


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    lw.emit(node.name, "reshape", [x], lw.like(node.name, x, node.shape), {"shape": list(node.shape[1:])})


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    return args[0].reshape(args[0].shape[0], *op.attrs["shape"])


RESHAPE = register(OpDef(
    "reshape",
    "row-major reshape of the non-batch dimensions to `shape`; the scale is unchanged.",
    aten={t: _reshape for t in (aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                                aten._unsafe_view.default)},
    described_as="flatten/view/reshape",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    scale_preserving=True,
))
