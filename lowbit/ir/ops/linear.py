"""linear: x @ Wᵀ + b over the last axis, with per-output-channel weights."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import _layer
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


def _emit(ctx: Any, fx: Any, x: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
    if b is None:
        b = torch.zeros(w.shape[0])
    macs = math.prod(fx.meta["val"].shape[1:]) * w.shape[1]  # per sample, as conv counts them
    return ctx.emit(fx, "linear", [x], {}, {"weight": w, "bias": b}, macs, prefer_module_name=True)


def _linear(ctx: Any, fx: Any) -> Any:
    return _emit(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"))


def _addmm(ctx: Any, fx: Any) -> Any:
    if ctx.arg(fx, 3, "beta", 1) != 1 or ctx.arg(fx, 4, "alpha", 1) != 1:
        raise UnsupportedAttr("addmm with alpha/beta other than 1")
    return _emit(ctx, fx, ctx.tensor(fx, 1, "mat1"), ctx.const(fx, 2, "mat2").t(), ctx.const(fx, 0, "input"))


def _mm(ctx: Any, fx: Any) -> Any:
    return _emit(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "mat2").t(), None)


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(args[0], params["weight"], params["bias"])


def _input_columns(attrs: dict[str, Any], weight_shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """Every row of every sample is one column: [1, in_features, rows]."""
    return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)


def _lower(lw: Any, node: Node) -> None:
    _layer.lower_layer(lw, node, ())


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    w = op.arrays["weight"]
    dtype = _layer.exact_float(w, int(np.abs(args[0]).max(initial=0)))
    x, w = _layer.as_float(args[0], dtype), _layer.as_float(w, dtype)
    acc = _layer.to_int(x @ w.T) + op.arrays["bias"].astype(np.int64)
    return _layer.finish(op, acc, qgraph)


LINEAR = register(OpDef(
    "linear",
    "x @ Wᵀ over the last axis: int8/uint8/int16 x per-channel int8 weights, accumulated as conv, then a "
    "per-channel requantizer, or for a graph output the int32 accumulator (an int16 input's rounded by 2^s).",
    aten={aten.linear.default: _linear, aten.addmm.default: _addmm, aten.mm.default: _mm},
    described_as="linear",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=_layer.requantizers,
    weights=_layer.LAYER_WEIGHTS, input_columns=_input_columns, absorbs_clamp=True,
))
