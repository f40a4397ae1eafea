"""avgpool: integer window sum (zero padding counts) and a dyadic divide; also adaptive pools and spatial means."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..dyadic import dyadic
from ..requantizer import Requantizer
from .conv import pair
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class PoolAttrs:
    kernel: list[int]
    stride: list[int]
    padding: list[int]


def _emit(ctx: Any, fx: Any, x: str, kernel: list[int], stride: list[int], padding: list[int]) -> Any:
    macs = math.prod(fx.meta["val"].shape) * kernel[0] * kernel[1]
    return ctx.emit(fx, "avgpool", [x], vars(PoolAttrs(kernel, stride, padding)), macs=macs)


def _avg_pool2d(ctx: Any, fx: Any) -> Any:
    kernel = pair(ctx.arg(fx, 1, "kernel_size"))
    padding = pair(ctx.arg(fx, 3, "padding", 0))
    if ctx.arg(fx, 4, "ceil_mode", False):
        raise UnsupportedAttr("avg_pool2d with ceil_mode=True")
    if any(padding) and not ctx.arg(fx, 5, "count_include_pad", True):
        raise UnsupportedAttr("avg_pool2d with padding and count_include_pad=False")
    if ctx.arg(fx, 6, "divisor_override") is not None:
        raise UnsupportedAttr("avg_pool2d with divisor_override")
    stride = pair(ctx.arg(fx, 2, "stride", []) or kernel)
    return _emit(ctx, fx, ctx.tensor(fx, 0, "input"), kernel, stride, padding)


def _adaptive_avg_pool(ctx: Any, fx: Any) -> Any:
    x = ctx.tensor(fx, 0, "input")
    h, w = ctx.by_name[x].shape[-2:]
    oh, ow = pair(ctx.arg(fx, 1, "output_size"))
    if h % oh or w % ow:
        raise UnsupportedAttr(f"adaptive_avg_pool2d from {h}x{w} to {oh}x{ow} (sizes must divide)")
    kernel = [h // oh, w // ow]
    return _emit(ctx, fx, x, kernel, kernel, [0, 0])


def _mean(ctx: Any, fx: Any) -> Any:
    x = ctx.tensor(fx, 0, "input")
    shape = ctx.by_name[x].shape
    dims = sorted(d % len(shape) for d in ctx.arg(fx, 1, "dim"))
    if len(shape) != 4 or dims != [2, 3]:
        raise UnsupportedAttr(f"mean over dims {dims} of a {len(shape)}-D tensor; only the spatial mean is supported")
    if ctx.arg(fx, 2, "keepdim", False):
        return _emit(ctx, fx, x, list(shape[2:]), list(shape[2:]), [0, 0])
    # Global pool, then drop the two unit dims.
    pooled = ctx.add_node(f"{fx.name}_pool", "avgpool", [x], (*shape[:2], 1, 1),
                          vars(PoolAttrs(list(shape[2:]), list(shape[2:]), [0, 0])), math.prod(shape), fx)
    return ctx.emit(fx, "reshape", [pooled])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.avg_pool2d(args[0], a["kernel"], a["stride"], a["padding"])


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    out, qmin, qmax = lw.activation(node.name, node.shape)
    window = node.attrs["kernel"][0] * node.attrs["kernel"][1]
    mantissa, shift = dyadic(x.scale / (window * out.scale))
    lw.emit(node.name, "avgpool", [x], out, {**node.attrs, "qmin": qmin, "qmax": qmax},
            {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32)})


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer:
    """Window sum -> output grid: one multiplier folding the 1/window divide and the scale change."""
    return Requantizer(op.arrays["multiplier"].astype(np.int64)[:1], op.arrays["shift"].astype(np.int64)[:1],
                       op.attrs["qmin"], op.attrs["qmax"], qgraph.values[op.output].dtype)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    a = op.attrs
    x = torch.from_numpy(np.asarray(args[0], dtype=np.float64))
    sums = F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], divisor_override=1)
    return requantizer(op, qgraph).apply(sums.numpy().astype(np.int64))


AVGPOOL = register(OpDef(
    "avgpool",
    "integer window sum (zero padding counts), then a dyadic requantizer that also divides by the window size.",
    attrs=PoolAttrs,
    aten={aten.avg_pool2d.default: _avg_pool2d, aten.adaptive_avg_pool2d.default: _adaptive_avg_pool,
          aten._adaptive_avg_pool2d.default: _adaptive_avg_pool, aten.mean.dim: _mean},
    described_as="avg pool, adaptive avg pool, mean over H and W",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=lambda op, qgraph: [requantizer(op, qgraph)],
))
