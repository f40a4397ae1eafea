"""permute: a transpose of the non-batch dimensions (attention heads in and out); values and scale unchanged.

Two in a row fold into one (BERT's key heads are transposed twice: [B, S, h, d] ->
[B, h, S, d] -> [B, h, d, S]). In the integer graph it moves integers and keeps the input's
grid, as `reshape` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class PermuteAttrs:
    dims: list[int]  # output dim i is input dim dims[i]; dims[0] == 0 (the batch stays first)


def _emit(ctx: Any, fx: Any, x: str, dims: list[int]) -> Any:
    if dims[0] != 0:
        raise UnsupportedAttr("permute/transpose that moves the batch dimension")
    prev = ctx.by_name[x]
    src = ctx.fx_of.get(x)
    if prev.op == "permute" and src is not None and len(src.users) == 1:
        # x.permute(p1).permute(p2) == x.permute(p1[p2]): one node; the first becomes dead and is pruned.
        dims = [prev.attrs["dims"][d] for d in dims]
        x = prev.inputs[0]
    if dims == list(range(len(dims))):
        return ctx.activation(x)  # the two cancel
    return ctx.emit(fx, "permute", [x], vars(PermuteAttrs(dims)))


def _transpose(ctx: Any, fx: Any) -> Any:
    x = ctx.tensor(fx, 0, "self")
    rank = len(ctx.by_name[x].shape)
    d0, d1 = ctx.arg(fx, 1, "dim0") % rank, ctx.arg(fx, 2, "dim1") % rank
    dims = list(range(rank))
    dims[d0], dims[d1] = d1, d0
    return _emit(ctx, fx, x, dims)


def _permute(ctx: Any, fx: Any) -> Any:
    x = ctx.tensor(fx, 0, "self")
    rank = len(ctx.by_name[x].shape)
    return _emit(ctx, fx, x, [d % rank for d in ctx.arg(fx, 1, "dims")])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return args[0].permute(node.attrs["dims"])


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    lw.emit(node.name, "permute", [x], lw.like(node.name, x, node.shape), {"dims": list(node.attrs["dims"])})


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(args[0], op.attrs["dims"]))


PERMUTE = register(OpDef(
    "permute",
    "output dim i is input dim dims[i] (dims[0] = 0: the batch stays first); the values and scale are unchanged.",
    attrs=PermuteAttrs,
    aten={aten.transpose.int: _transpose, aten.permute.default: _permute},
    described_as="transpose/permute (batch first)",
    evaluate=_evaluate, lower=_lower, reference=_reference, scale_preserving=True,
))
