"""add_constant: an activation plus a constant broadcast over its leading dims (position embedding rows).

Capture makes it from an ATen add of an activation and a weight-only value (which
capture has already folded to a constant): `add` itself joins two activations on one
grid and stays free of broadcasting. Two in a row fold into one (BERT adds the position
rows, then the token-type row).

Integer form: x is rescaled to the output grid by a dyadic mantissa, and the constant is
stored already on the output grid at the same shift, so it keeps every bit the shift gives:

    out = clip((x * mantissa + C + 2^(shift-1)) >> shift),  C = round(c / out_scale * 2^shift)

|x * mantissa| < 2^15 * 2^30 and |C| < 2^60 (checked at lowering): the sum stays below 2^61.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dyadic import dyadic
from ..requantizer import Requantizer
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

_CONSTANT_LIMIT = 1 << 60


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


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    clamp = lw.fused.get(node.name)
    out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
    mantissa, shift = dyadic(np.float64(x.scale) / np.float64(out.scale))
    constant = lw.graph.params[f"{node.name}.constant"].double().numpy()
    on_grid = np.round(constant / np.float64(out.scale) * np.exp2(float(shift[0])))
    if np.abs(on_grid).max(initial=0) >= _CONSTANT_LIMIT:
        raise LowbitError(f"node {node.name} (add_constant): the constant (max |c| {np.abs(constant).max():.3g}) "
                          f"is too large for the output grid (step {out.scale:.3g}) at shift {int(shift[0])}")
    lw.emit(node.name, "add_constant", [x], out, {"qmin": qmin, "qmax": qmax},
            {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32),
             "constant": on_grid.astype(np.int64)})


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer:
    """The shift-round-clip applied to x * mantissa + C (already scaled: no mantissa)."""
    return Requantizer(None, op.arrays["shift"].astype(np.int64)[:1], op.attrs["qmin"], op.attrs["qmax"],
                       qgraph.values[op.output].dtype)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    x = np.asarray(args[0], dtype=np.int64) * np.int64(op.arrays["multiplier"][0])
    return requantizer(op, qgraph).apply(x + op.arrays["constant"])


ADD_CONSTANT = register(OpDef(
    "add_constant",
    "x + c, a constant c (no batch dimension) broadcast over x's leading dimensions (position embedding rows): "
    "clip((x * mantissa + C + 2^(shift-1)) >> shift), the constant C stored on the output grid at that shift.",
    evaluate=_evaluate, lower=_lower, reference=_reference, constants=("constant",),
    requantizers=lambda op, qgraph: [requantizer(op, qgraph)], absorbs_clamp=True,
))
