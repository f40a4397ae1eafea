"""conv: 2-D convolution (grouped, strided, dilated, zero-padded) with per-channel weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ConvAttrs:
    stride: list[int]
    padding: list[int]  # [pad_h, pad_w], both sides
    dilation: list[int]
    groups: int


def pair(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v


def emit_conv(ctx: Any, fx: Any, x: str, w: torch.Tensor, b: torch.Tensor | None, stride: Any, padding: Any,
              dilation: Any, groups: int) -> Any:
    if w.dim() != 4:
        raise UnsupportedAttr(f"only 2-D convolutions are supported (weight has {w.dim()} dims)")
    if isinstance(padding, str):
        raise UnsupportedAttr(f"padding={padding!r}; use explicit integer padding")
    if b is None:
        b = torch.zeros(w.shape[0])
    out = fx.meta["val"].shape
    macs = math.prod(out) * w.shape[1] * w.shape[2] * w.shape[3] // out[0]
    attrs = ConvAttrs(pair(stride), pair(padding), pair(dilation), int(groups))
    return ctx.emit(fx, "conv", [x], vars(attrs), {"weight": w, "bias": b}, macs, prefer_module_name=True)


def _conv2d(ctx: Any, fx: Any) -> Any:
    return emit_conv(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                     ctx.arg(fx, 3, "stride", 1), ctx.arg(fx, 4, "padding", 0), ctx.arg(fx, 5, "dilation", 1),
                     ctx.arg(fx, 6, "groups", 1))


def _convolution(ctx: Any, fx: Any) -> Any:
    if ctx.arg(fx, 6, "transposed"):
        raise UnsupportedAttr("transposed convolution")
    return emit_conv(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                     ctx.arg(fx, 3, "stride"), ctx.arg(fx, 4, "padding"), ctx.arg(fx, 5, "dilation"),
                     ctx.arg(fx, 8, "groups"))


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.conv2d(args[0], params["weight"], params["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])


def _input_columns(attrs: dict[str, Any], weight_shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """im2col: [groups, C/groups * kh * kw, N * OH * OW]."""
    kernel, groups = list(weight_shape[2:]), attrs["groups"]
    if kernel == [1, 1] and attrs["stride"] == [1, 1] and attrs["padding"] == [0, 0]:
        cols = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    else:
        cols = F.unfold(x, kernel, attrs["dilation"], attrs["padding"], attrs["stride"])  # [N, C*kh*kw, L]
        cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
    return cols.reshape(groups, cols.shape[0] // groups, cols.shape[1])


def _lower(lw: Any, node: Node) -> None:
    _layer.lower_layer(lw, node, ("stride", "padding", "dilation", "groups"))


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    a, w = op.attrs, op.arrays["weight"]
    dtype = _layer.exact_float(w, int(np.abs(args[0]).max(initial=0)))
    x, w = _layer.as_float(args[0], dtype), _layer.as_float(w, dtype)
    acc = _layer.to_int(F.conv2d(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]))
    acc += op.arrays["bias"].astype(np.int64).reshape(1, -1, 1, 1)
    return _layer.finish(op, acc, qgraph)


CONV = register(OpDef(
    "conv",
    "int8/uint8/int16 (NCHW) x per-channel int8 weights (int4 values at 4 bits), the exact integer sum plus int32 "
    "bias (int32 for 8-bit inputs; an int16 input's can pass 2^31, see `_layer`), then a per-channel requantizer "
    "(clamp folded into its range), or for a graph output the int32 accumulator (an int16 input's rounded by 2^s).",
    attrs=ConvAttrs,
    aten={aten.conv2d.default: _conv2d, aten.convolution.default: _convolution},
    described_as="conv2d",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=_layer.requantizers,
    weights=_layer.LAYER_WEIGHTS, input_columns=_input_columns, absorbs_clamp=True,
))
