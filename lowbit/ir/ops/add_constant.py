"""add_constant: an activation plus a constant broadcast over its leading dims (position embedding rows).

Capture makes it from an ATen add of an activation and a weight-only value (which
capture has already folded to a constant): `add` itself joins two activations on one
grid and stays free of broadcasting. Two in a row fold into one (BERT adds the position
rows, then the token-type row). Its integer lowering (to come) is an `add` whose second
input is the constant rounded to its own grid, both rescaled to the output's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node


def emit(ctx: Any, fx: Any, x: str, constant: torch.Tensor) -> Any:
    """x + constant, from the ATen add `fx` (called by `add`'s converter, which owns aten.add)."""
    shape = ctx.by_name[x].shape
    constant = torch.as_tensor(constant, dtype=torch.float32)
    if torch.broadcast_shapes(shape, constant.shape) != tuple(shape):
        raise UnsupportedAttr(f"add of a constant of shape {tuple(constant.shape)} that broadcasts the "
                              f"activation {tuple(shape)} to a larger shape")
    while constant.dim() >= len(shape) and constant.shape[0] == 1:
        constant = constant[0]  # a unit batch dim broadcasts: the constant is the same for every sample
    if constant.dim() >= len(shape):
        raise UnsupportedAttr("add of a constant that differs per sample (a batch dimension)")
    prev = ctx.by_name[x]
    src = ctx.fx_of.get(x)
    if prev.op == "add_constant" and src is not None and len(src.users) == 1:
        # (x + c1) + c2 -> x + (c1 + c2): one node; the first becomes dead and is pruned.
        constant = ctx.params[f"{x}.constant"] + constant
        x = prev.inputs[0]
    return ctx.emit(fx, "add_constant", [x], {}, {"constant": constant})


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return args[0] + params["constant"]


ADD_CONSTANT = register(OpDef(
    "add_constant",
    "x + c, a constant c (no batch dimension) broadcast over x's leading dimensions (position embedding rows).",
    evaluate=_evaluate, constants=("constant",),
))
