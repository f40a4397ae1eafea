"""matmul: alpha * (a @ b) of two activations, batched over identical leading dims (Q·Kᵀ and A·V).

Neither operand is a weight, so it is not a searchable layer. A multiplication by a
Python number right after it (attention's 1/sqrt(head_size)) is fused into `alpha`.
Its integer lowering (to come): int8 (or uint8 probabilities) x int8 with int32
accumulation, alpha folded into the requantizer's multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._fx import fx_arg, is_call, is_scalar, single_user
from .registry import Fusion, OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten


@dataclass(frozen=True)
class MatmulAttrs:
    alpha: float  # the product is multiplied by it (after the sum, as the model did)


def _emit(ctx: Any, fx: Any, alpha: float) -> Any:
    a, b = ctx.tensor(fx, 0, "self"), ctx.tensor(fx, 1, "other")
    sa, sb = ctx.by_name[a].shape, ctx.by_name[b].shape
    if len(sa) < 3 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
        raise UnsupportedAttr(f"matmul of {list(sa)} and {list(sb)}; lowbit's matmul multiplies two activations "
                              "of the same rank (3 or more) with identical leading dims, [..., M, K] @ [..., K, N]")
    out = tuple(int(s) for s in fx.meta["val"].shape)
    macs = math.prod(out[1:]) * sa[-1]  # per sample, as conv and linear count them
    return ctx.emit(fx, "matmul", [a, b], vars(MatmulAttrs(float(alpha))), macs=macs)


def _matmul(ctx: Any, fx: Any) -> Any:
    return _emit(ctx, fx, 1.0)


def _scaled(root: Any) -> Fusion | None:
    """matmul(a, b) * c, c a Python number: one matmul with alpha = c."""
    lhs, rhs = fx_arg(root, 0, "self"), fx_arg(root, 1, "other")
    mm, c = (lhs, rhs) if is_call(lhs, aten.matmul.default) else (rhs, lhs)
    if not (is_call(mm, aten.matmul.default) and is_scalar(c) and single_user(mm)):
        return None
    a, b = fx_arg(mm, 0, "self"), fx_arg(mm, 1, "other")
    return Fusion(frozenset([mm]), (a, b), lambda ctx, _: _emit(ctx, mm, c))


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    product = torch.matmul(args[0], args[1])
    alpha = node.attrs["alpha"]
    return product if alpha == 1.0 else product * alpha


MATMUL = register(OpDef(
    "matmul",
    "alpha * (a @ b) of two activations [..., M, K] @ [..., K, N] with identical leading dims; no weights.",
    attrs=MatmulAttrs,
    aten={aten.matmul.default: _matmul, aten.bmm.default: _matmul},
    fusions={aten.mul.Tensor: _scaled},
    described_as="matmul of two activations (times a number)",
    evaluate=_evaluate,
))
