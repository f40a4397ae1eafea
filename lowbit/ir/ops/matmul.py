"""matmul: alpha * (a @ b) of two activations, batched over identical leading dims (Q·Kᵀ and A·V).

Neither operand is a weight, so it is not a searchable layer. A multiplication by a
Python number right after it (attention's 1/sqrt(head_size)) is fused into `alpha`.

Integer form: 8-bit x 8-bit (int8 queries and keys, uint8 probabilities times int8
values), the exact sum in int32 (K * 255 * 128 < 2^31 for K < 65793, checked at
lowering), then either a requantizer with alpha folded into its multiplier, or, where
only softmaxes read it, the raw int32 sum (scale a * b * alpha): softmax then sees the
scores with no rounding (its error from int8 scores is 3x that from int32 ones on
MiniLM, benchmarks/ibert_kernels.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dtypes import qrange
from ..dyadic import dyadic
from ..requantizer import Requantizer
from . import _layer
from ._fx import fx_arg, is_call, is_scalar, single_user
from .registry import Fusion, OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

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


OPERAND_DTYPES = ("int8", "uint8")
_REFUSAL = "its operands are 8-bit (int8 or uint8), multiplied with an int32 sum"


def _lower(lw: Any, node: Node) -> None:
    a, b = lw.input_value(node, 0), lw.input_value(node, 1)
    if a.dtype not in OPERAND_DTYPES or b.dtype not in OPERAND_DTYPES:
        raise LowbitError(f"node {node.name} (matmul): {_REFUSAL}, not {a.dtype} x {b.dtype}")
    alpha = node.attrs["alpha"]
    reduction = lw.graph.node(node.inputs[0]).shape[-1]
    bound = reduction * max(abs(v) for v in qrange(a.dtype)) * max(abs(v) for v in qrange(b.dtype))
    if not (alpha > 0 and bound < 2**31):
        raise LowbitError(f"node {node.name} (matmul): needs alpha > 0 ({alpha}) and a reduction of at most "
                          f"{(2**31 - 1) // (bound // reduction)} terms for an int32 sum ({reduction})")
    acc_scale = np.float64(a.scale) * np.float64(b.scale) * alpha
    readers = lw.graph.consumers(node.name)
    if readers and all(r.op == "softmax" for r in readers) and node.name not in lw.graph.outputs:
        lw.emit(node.name, "matmul", [a, b], lw.value(node.name, "int32", node.shape, acc_scale))
        return
    out, qmin, qmax = lw.activation(node.name, node.shape)
    mantissa, shift = dyadic(acc_scale / np.float64(out.scale))
    lw.emit(node.name, "matmul", [a, b], out, {"qmin": qmin, "qmax": qmax},
            {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32)})


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer | None:
    """The per-tensor requantizer of the int32 product, or None where the op outputs it raw."""
    if "multiplier" not in op.arrays:
        return None
    return Requantizer(op.arrays["multiplier"].astype(np.int64), op.arrays["shift"].astype(np.int64),
                       op.attrs["qmin"], op.attrs["qmax"], qgraph.values[op.output].dtype)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    # Exact in float32 while every partial sum stays below 2^24, else in float64 (as `_layer` sums).
    a, b = (np.asarray(t, dtype=np.int64) for t in args)
    worst = a.shape[-1] * int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0))
    ftype = np.float32 if worst < 2**24 else np.float64
    acc = _layer.to_int(_layer.as_float(a, ftype) @ _layer.as_float(b, ftype))
    rq = requantizer(op, qgraph)
    return acc if rq is None else rq.apply(acc)


MATMUL = register(OpDef(
    "matmul",
    "alpha * (a @ b) of two activations [..., M, K] @ [..., K, N] with identical leading dims, no weights: "
    "int8/uint8 x int8/uint8, the exact int32 sum, then a per-tensor requantizer (alpha in its multiplier), or "
    "the raw int32 sum (scale a * b * alpha) where only softmaxes read it.",
    attrs=MatmulAttrs,
    aten={aten.matmul.default: _matmul, aten.bmm.default: _matmul},
    fusions={aten.mul.Tensor: _scaled},
    described_as="matmul of two activations (times a number)",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    requantizers=lambda op, qgraph: [rq for rq in [requantizer(op, qgraph)] if rq is not None],
    int16_refusal=_REFUSAL,
))
