"""pad: constant zero padding of H and W (zero is the zero point, so it is exact on the integers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


def _emit(ctx: Any, fx: Any, pads: list[int], value: float | None) -> Any:
    if value not in (None, 0, 0.0):
        raise UnsupportedAttr(f"padding value {value}; only zero padding is supported")
    if len(pads) != 4 or min(pads) < 0:
        raise UnsupportedAttr(f"pad {pads}; only non-negative padding of H and W is supported")
    return ctx.emit(fx, "pad", [ctx.tensor(fx, 0, "input")], {"pads": [int(p) for p in pads]})


def _pad(ctx: Any, fx: Any) -> Any:
    if ctx.arg(fx, 2, "mode", "constant") != "constant":
        raise UnsupportedAttr(f"pad mode {ctx.arg(fx, 2, 'mode')!r}; only constant padding is supported")
    return _emit(ctx, fx, list(ctx.arg(fx, 1, "pad")), ctx.arg(fx, 3, "value"))


def _constant_pad(ctx: Any, fx: Any) -> Any:
    return _emit(ctx, fx, list(ctx.arg(fx, 1, "pad")), ctx.arg(fx, 2, "value", 0))


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.pad(args[0], node.attrs["pads"])


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    lw.emit(node.name, "pad", [x], lw.like(node.name, x, node.shape), {"pads": node.attrs["pads"]})


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    left, right, top, bottom = op.attrs["pads"]
    return np.pad(args[0], ((0, 0), (0, 0), (top, bottom), (left, right)))


PAD = register(OpDef(
    "pad",
    "zero padding of H and W, `pads` = [left, right, top, bottom]; the scale is unchanged.",
    aten={aten.pad.default: _pad, aten.constant_pad_nd.default: _constant_pad},
    described_as="constant zero pad",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    scale_preserving=True,
))
