"""softmax: over the last dimension, optionally with an attention mask (BERT's attention probabilities).

With a mask (a second input: the model's 0/1 attention_mask [B, S]), the op is
softmax(x + (1 - mask) * mask_bias) with the bias broadcast as [B, 1, ..., 1, S]: the
masked keys get `mask_bias` added (-10000 in lowbit's BERT: exactly zero weight).
Capture fuses the model's whole chain (mask cast to float, 1 - m, times the bias,
unsqueezed, added to the scores) into this one op, so the scores stay a tensor of
their own, calibrated without the -10000s. Its integer lowering (to come, I-BERT):
the mask as an integer add of a large negative number in the scores' units, then an
integer exp (shift plus a second-order polynomial) and an integer division by the row sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._fx import fx_arg, is_call, mask_source, shape
from .registry import Fusion, OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten
_SOFTMAX = (aten.softmax.int, aten._softmax.default)


@dataclass(frozen=True)
class SoftmaxAttrs:
    mask_bias: float | None  # added to the keys whose mask is 0; None: no mask input


def _check_last_dim(fx: Any) -> None:
    rank = len(fx.meta["val"].shape)
    if fx_arg(fx, 1, "dim") % rank != rank - 1:
        raise UnsupportedAttr("softmax over a dimension other than the last")
    if fx_arg(fx, 2, "half_to_float", False) is True:
        raise UnsupportedAttr("softmax with half_to_float")


def _softmax(ctx: Any, fx: Any) -> Any:
    _check_last_dim(fx)
    return ctx.emit(fx, "softmax", [ctx.tensor(fx, 0, "self")], vars(SoftmaxAttrs(None)))


def _masked(root: Any) -> Fusion | None:
    """softmax(scores + f(mask)), f(mask) = a * mask + b from the model's 0/1 attention mask [B, S], broadcast as
    [B, 1, ..., 1, S], with f(1) = 0: one masked softmax with mask_bias = f(0)."""
    add = fx_arg(root, 0, "self")
    if not (is_call(add, aten.add.Tensor) and len(add.users) == 1 and fx_arg(add, 2, "alpha", 1) == 1):
        return None
    for scores, bias in ((fx_arg(add, 0, "self"), fx_arg(add, 1, "other")),
                         (fx_arg(add, 1, "other"), fx_arg(add, 0, "self"))):
        src = mask_source(bias)
        if src is None or src.a + src.b != 0 or not hasattr(scores, "meta"):
            continue
        x_shape, bias_shape, mask_shape = shape(scores), shape(bias), tuple(src.input.meta["val"].shape)
        batch, keys = x_shape[0], x_shape[-1]
        if mask_shape == (batch, keys) and bias_shape == (batch, *[1] * (len(x_shape) - 2), keys):
            return Fusion(frozenset([add]), (scores, src.input),
                          lambda ctx, fx, scores=scores, src=src: _emit_masked(ctx, fx, scores, src.input, src.b))
    return None


def _emit_masked(ctx: Any, fx: Any, scores: Any, mask: Any, mask_bias: float) -> Any:
    _check_last_dim(fx)
    x, m = ctx.resolve(scores), ctx.resolve(mask)
    if not (ctx.is_activation(x) and ctx.is_activation(m)):
        raise UnsupportedAttr("masked softmax needs activation scores and the attention mask as a model input")
    return ctx.emit(fx, "softmax", [x.node, m.node], vars(SoftmaxAttrs(float(mask_bias))))


def mask_bias_of(mask: torch.Tensor, mask_bias: float, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """(1 - mask) * mask_bias, [B, S] -> [B, 1, ..., 1, S] of `rank` dims, computed as the model does."""
    bias = (1.0 - mask.to(dtype)) * mask_bias
    return bias.reshape(bias.shape[0], *[1] * (rank - 2), bias.shape[1])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    x = args[0]
    if len(args) > 1:
        x = x + mask_bias_of(args[1], node.attrs["mask_bias"], x.dim(), x.dtype)
    return torch.softmax(x, dim=-1)


SOFTMAX = register(OpDef(
    "softmax",
    "softmax over the last dimension; with a second input, the 0/1 attention mask [B, S], of "
    "x + (1 - mask) * mask_bias broadcast as [B, 1, ..., 1, S].",
    attrs=SoftmaxAttrs,
    aten=dict.fromkeys(_SOFTMAX, _softmax),
    fusions=dict.fromkeys(_SOFTMAX, _masked),
    described_as="softmax (last dimension, with an attention mask)",
    evaluate=_evaluate,
))
