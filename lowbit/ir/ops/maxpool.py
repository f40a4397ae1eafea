"""maxpool: max over each window's positions inside the input (padding never wins, as in torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .conv import pair
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class MaxPoolAttrs:
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    ceil_mode: bool


def _maxpool(ctx: Any, fx: Any) -> Any:
    kernel = pair(ctx.arg(fx, 1, "kernel_size"))
    stride = pair(ctx.arg(fx, 2, "stride", []) or kernel)
    attrs = MaxPoolAttrs(kernel, stride, pair(ctx.arg(fx, 3, "padding", 0)), pair(ctx.arg(fx, 4, "dilation", 1)),
                         bool(ctx.arg(fx, 5, "ceil_mode", False)))
    out = ctx.emit(fx, "maxpool", [ctx.tensor(fx, 0, "input")], vars(attrs))
    return (out, None) if fx.target == aten.max_pool2d_with_indices.default else out


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.max_pool2d(args[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    lw.emit(node.name, "maxpool", [x], lw.like(node.name, x, node.shape), dict(node.attrs))


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    a = op.attrs
    x = torch.from_numpy(np.asarray(args[0], dtype=np.float64))
    out = F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    return out.numpy().astype(np.int64)


MAXPOOL = register(OpDef(
    "maxpool",
    "window maximum on the integers; the scale is unchanged.",
    attrs=MaxPoolAttrs,
    aten={aten.max_pool2d.default: _maxpool, aten.max_pool2d_with_indices.default: _maxpool},
    described_as="max pool",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    scale_preserving=True,
))
