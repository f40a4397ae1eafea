"""layer_norm: normalization over the last dimension, then gamma and beta (BERT's LayerNorm).

gamma and beta are constants, not weights (no bit-width). Its integer lowering (to come,
I-BERT): integer mean and variance of the int8/int32 input row, an integer square root by
Newton iteration, and gamma folded into the output requantizer; eps then matters only
as a floor on the variance in the input's integer units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten


@dataclass(frozen=True)
class LayerNormAttrs:
    eps: float


def _emit(ctx: Any, fx: Any, normalized_shape: Any, eps: float) -> Any:
    x = ctx.tensor(fx, 0, "input")
    shape = ctx.by_name[x].shape
    if list(normalized_shape) != [shape[-1]]:
        raise UnsupportedAttr(f"layer_norm over {list(normalized_shape)} of a {list(shape)} tensor; only the last "
                              "dimension is supported")
    width = shape[-1]
    gamma, beta = ctx.const(fx, 2, "weight"), ctx.const(fx, 3, "bias")
    params = {"weight": torch.ones(width) if gamma is None else gamma,
              "bias": torch.zeros(width) if beta is None else beta}
    return ctx.emit(fx, "layer_norm", [x], vars(LayerNormAttrs(float(eps))), params, prefer_module_name=True)


def _layer_norm(ctx: Any, fx: Any) -> Any:
    return _emit(ctx, fx, ctx.arg(fx, 1, "normalized_shape"), ctx.arg(fx, 4, "eps", 1e-5))


def _native_layer_norm(ctx: Any, fx: Any) -> tuple:
    return (_emit(ctx, fx, ctx.arg(fx, 1, "normalized_shape"), ctx.arg(fx, 4, "eps")), None, None)


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    x = args[0]
    return F.layer_norm(x, (x.shape[-1],), params["weight"], params["bias"], node.attrs["eps"])


LAYER_NORM = register(OpDef(
    "layer_norm",
    "(x - mean) / sqrt(var + eps) * gamma + beta over the last dimension (biased variance); gamma and beta are "
    "constants, not weights.",
    attrs=LayerNormAttrs,
    aten={aten.layer_norm.default: _layer_norm, aten.native_layer_norm.default: _native_layer_norm},
    described_as="layer_norm (last dimension)",
    evaluate=_evaluate, constants=("weight", "bias"),
))
