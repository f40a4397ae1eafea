"""clamp: ReLU, ReLU6, hardtanh and clamp. Folded into the op before it where it can be; else an integer clip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..dtypes import qrange
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class ClampAttrs:
    min: float | None
    max: float | None


def _emit(ctx: Any, fx: Any, lo: float | None, hi: float | None) -> Any:
    return ctx.emit(fx, "clamp", [ctx.tensor(fx, 0, "input")], vars(ClampAttrs(lo, hi)))


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


_CONVERTERS = {
    aten.relu.default: lambda ctx, fx: _emit(ctx, fx, 0.0, None),
    aten.relu_.default: lambda ctx, fx: _emit(ctx, fx, 0.0, None),
    aten.relu6.default: lambda ctx, fx: _emit(ctx, fx, 0.0, 6.0),
    aten.hardtanh.default: lambda ctx, fx: _emit(ctx, fx, float(ctx.arg(fx, 1, "min_val", -1.0)),
                                                 float(ctx.arg(fx, 2, "max_val", 1.0))),
    aten.clamp.default: lambda ctx, fx: _emit(ctx, fx, _optional_float(ctx.arg(fx, 1, "min")),
                                              _optional_float(ctx.arg(fx, 2, "max"))),
    aten.clamp_min.default: lambda ctx, fx: _emit(ctx, fx, float(ctx.arg(fx, 1, "min")), None),
    aten.clamp_max.default: lambda ctx, fx: _emit(ctx, fx, None, float(ctx.arg(fx, 1, "max"))),
}
_CONVERTERS[aten.hardtanh_.default] = _CONVERTERS[aten.hardtanh.default]
_CONVERTERS[aten.clamp_.default] = _CONVERTERS[aten.clamp.default]


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.clamp(args[0], node.attrs["min"], node.attrs["max"])


def integer_bounds(lo: float | None, hi: float | None, scale: float, qmin: int, qmax: int) -> tuple[int, int]:
    """A float clamp [lo, hi] on a grid of step `scale`, narrowed into [qmin, qmax]."""
    if lo is not None:
        qmin = max(qmin, round(lo / scale))
    if hi is not None:
        qmax = min(qmax, round(hi / scale))
    return qmin, qmax


def _lower(lw: Any, node: Node) -> None:
    if lw.is_fused_clamp(node):
        return  # its producer's requantizer already applies it
    x = lw.input_value(node)
    out = lw.like(node.name, x, node.shape)
    qmin, qmax = integer_bounds(node.attrs["min"], node.attrs["max"], x.scale, *qrange(x.dtype))
    lw.emit(node.name, "clamp", [x], out, {"qmin": qmin, "qmax": qmax})


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    return np.clip(args[0], op.attrs["qmin"], op.attrs["qmax"])


CLAMP = register(OpDef(
    "clamp",
    "integer clip to [qmin, qmax]; the scale is unchanged (where possible the clamp is folded into the "
    "requantizer of the op before it instead).",
    attrs=ClampAttrs,
    aten=_CONVERTERS,
    described_as="relu, relu6/hardtanh, clamp",
    evaluate=_evaluate, lower=_lower, reference=_reference,
))
