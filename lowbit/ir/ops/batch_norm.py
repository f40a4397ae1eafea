"""batch_norm (inference): folded into the conv before it, or else a depthwise 1x1 conv. Not an op of its own."""

from __future__ import annotations

import math
from typing import Any

import torch

from .conv import ConvAttrs
from .registry import UnsupportedAttr, register_converters

aten = torch.ops.aten


def _batch_norm(ctx: Any, fx: Any, x: str, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                mean: torch.Tensor, var: torch.Tensor, eps: float) -> Any:
    scale = (var + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale + (beta if beta is not None else 0)
    prev = ctx.by_name[x]
    src = fx.args[0]
    if prev.op == "conv" and ctx.fx_of.get(x) is src and len(src.users) == 1:
        # Fold into the conv: w' = w * scale, b' = b * scale + shift. The conv keeps its
        # name and takes this op's output shape (identical).
        w = ctx.params[f"{x}.weight"]
        ctx.params[f"{x}.weight"] = (w * scale.reshape(-1, 1, 1, 1)).contiguous()
        ctx.params[f"{x}.bias"] = (ctx.params[f"{x}.bias"] * scale + shift).contiguous()
        return ctx.activation(x)
    # A batch norm with no conv before it becomes a depthwise 1x1 conv.
    c = scale.numel()
    attrs = ConvAttrs([1, 1], [0, 0], [1, 1], c)
    macs = math.prod(fx.meta["val"].shape)
    return ctx.emit(fx, "conv", [x], vars(attrs), {"weight": scale.reshape(c, 1, 1, 1), "bias": shift}, macs, True)


def _bn(ctx: Any, fx: Any) -> Any:
    if ctx.arg(fx, 5, "training"):
        raise UnsupportedAttr("batch norm in training mode; call model.eval() before exporting")
    return _batch_norm(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                       ctx.const(fx, 3, "running_mean"), ctx.const(fx, 4, "running_var"), ctx.arg(fx, 7, "eps"))


def _bn_no_training(ctx: Any, fx: Any) -> tuple:
    out = _batch_norm(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                      ctx.const(fx, 3, "running_mean"), ctx.const(fx, 4, "running_var"), ctx.arg(fx, 6, "eps"))
    return (out, None, None)


register_converters({aten.batch_norm.default: _bn, aten._native_batch_norm_legit_no_training.default: _bn_no_training},
                    "batch_norm (folded)")
