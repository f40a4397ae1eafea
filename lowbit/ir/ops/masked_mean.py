"""masked_mean: the mean over the sequence of the rows whose mask is 1 (sentence embedding mean pooling).

sum_s(x[b, s, :] * mask[b, s]) / max(sum_s mask[b, s], min_count), x [B, S, H], mask the
model's 0/1 attention_mask [B, S]. Capture fuses the model's chain (mask cast to float and
unsqueezed, the product, the two sums, the clamp and the division) into this one op, so
no tensor of sums needs a scale.

Integer form, per row b: the exact sum of the rows whose mask is not 0, shifted left by F
and divided by their count n, rounded half up, as int32 of scale x_scale / 2^F:

    out[b, :] = floor((2 * (sum << F) + n) / (2 n)),  F = 31 - bits(x)   (0 where n = 0)

|out| <= max|x| * 2^F < 2^31, and |sum << F| < S * 2^(bits-1) * 2^F < 2^62 for S < 2^32. The float
op divides by max(n, min_count); with min_count <= 1 that is n, or a sum of zeros when n = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dtypes import dtype
from ._fx import fx_arg, is_call, is_scalar, mask_source, shape
from .registry import Fusion, OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class MaskedMeanAttrs:
    min_count: float  # the count's floor: a row of all padding gives 0, not a division by 0


def _identity_mask(n: Any, want_shape: tuple[int, ...]) -> Any:
    """The mask model input behind `n` if `n` is the mask itself (cast to float, unit dims added), else None."""
    src = mask_source(n)
    if src is None or (src.a, src.b) != (1.0, 0.0) or shape(n) != want_shape:
        return None
    return src.input


def _sum_over_seq(n: Any, keepdim: bool) -> Any:
    if not (is_call(n, aten.sum.dim_IntList) and list(fx_arg(n, 1, "dim") or []) == [1]
            and bool(fx_arg(n, 2, "keepdim", False)) == keepdim and fx_arg(n, 3, "dtype") is None):
        return None
    return fx_arg(n, 0, "self")


def _clamped_count(n: Any) -> tuple[Any, Any, float] | None:
    """clamp(count, min=c) or clamp_min(count, c) -> (the clamp node, count, c)."""
    if is_call(n, aten.clamp.default) and fx_arg(n, 2, "max") is None and is_scalar(fx_arg(n, 1, "min")):
        return n, fx_arg(n, 0, "self"), float(fx_arg(n, 1, "min"))
    if is_call(n, aten.clamp_min.default) and is_scalar(fx_arg(n, 1, "min")):
        return n, fx_arg(n, 0, "self"), float(fx_arg(n, 1, "min"))
    return None


def _pooling(root: Any) -> Fusion | None:
    """sum(x * mask[:, :, None], 1) / clamp(sum(mask, 1, keepdim=True), min=c), x [B, S, H]."""
    num, den = fx_arg(root, 0, "self"), fx_arg(root, 1, "other")
    prod = _sum_over_seq(num, keepdim=False)
    clamped = _clamped_count(den)
    if not (is_call(prod, aten.mul.Tensor) and clamped is not None):
        return None
    clamp, count, min_count = clamped
    counted = _sum_over_seq(count, keepdim=True)  # the mask that is counted
    for x, m in ((fx_arg(prod, 0, "self"), fx_arg(prod, 1, "other")),
                 (fx_arg(prod, 1, "other"), fx_arg(prod, 0, "self"))):
        if not hasattr(x, "meta") or len(shape(x)) != 3:
            continue
        batch, seq, _ = shape(x)
        mask = _identity_mask(m, (batch, seq, 1))
        if mask is not None and counted is not None and _identity_mask(counted, (batch, seq)) is mask:
            return Fusion(frozenset([num, prod, clamp, count]), (x, mask),
                          lambda ctx, fx, x=x, mask=mask: _emit(ctx, fx, x, mask, min_count))
    return None


def _emit(ctx: Any, fx: Any, x: Any, mask: Any, min_count: float) -> Any:
    xv, mv = ctx.resolve(x), ctx.resolve(mask)
    if not (ctx.is_activation(xv) and ctx.is_activation(mv)):
        raise UnsupportedAttr("masked mean pooling needs an activation and the attention mask as a model input")
    return ctx.emit(fx, "masked_mean", [xv.node, mv.node], vars(MaskedMeanAttrs(min_count)))


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    x = args[0]
    mask = args[1].to(x.dtype)
    summed = (x * mask[:, :, None]).sum(dim=1)
    return summed / torch.clamp(mask.sum(dim=1, keepdim=True), min=node.attrs["min_count"])


def _lower(lw: Any, node: Node) -> None:
    x, mask = lw.input_value(node, 0), lw.input_value(node, 1)
    if x.dtype not in ("int8", "uint8", "int16") or mask.dtype != "int64":
        raise LowbitError(f"node {node.name} (masked_mean): an 8/16-bit input and an int64 mask are needed, not "
                          f"{x.dtype} and {mask.dtype}")
    if node.attrs["min_count"] > 1:
        raise LowbitError(f"node {node.name} (masked_mean): a count floor of {node.attrs['min_count']} (> 1) has "
                          "no integer form yet")
    frac_bits = 31 - dtype(x.dtype).bits
    lw.emit(node.name, "masked_mean", [x, mask], lw.value(node.name, "int32", node.shape, x.scale / 2**frac_bits),
            {"frac_bits": frac_bits})


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    x, keep = np.asarray(args[0], dtype=np.int64), (np.asarray(args[1]) != 0)
    total = (x * keep[:, :, None]).sum(axis=1) << op.attrs["frac_bits"]
    count = keep.sum(axis=1, keepdims=True).astype(np.int64)
    return np.where(count > 0, (2 * total + count) // np.maximum(2 * count, 1), 0)


MASKED_MEAN = register(OpDef(
    "masked_mean",
    "sum over s of x[b, s, :] * mask[b, s], divided by max(sum over s of mask[b, s], min_count): x [B, S, H], "
    "mask the 0/1 attention mask [B, S]. Integer: the exact sum of the rows whose mask is not 0, times 2^F, "
    "divided by their count rounding half up, as int32 of scale x_scale / 2^F, F = 31 - bits(x).",
    attrs=MaskedMeanAttrs,
    fusions={aten.div.Tensor: _pooling},
    described_as="masked mean pooling (sum(x * mask) / clamp(sum(mask)))",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    calibrated=False,
))
