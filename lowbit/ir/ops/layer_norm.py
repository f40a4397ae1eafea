"""layer_norm: normalization over the last dimension, then gamma and beta (BERT's LayerNorm).

gamma and beta are constants, not weights (no bit-width). Its integer form is `integer_layer_norm_int` (I-BERT,
Kim et al. 2021): an exact integer centring and variance of the input row, an integer square root
by Newton iteration, and gamma and beta folded into per-channel dyadic multipliers and offsets;
eps becomes an integer added to the variance in the input's integer units.

Its input is always int16 (`wide_input`): on MiniLM an int8 input moves outputs by up to 20.9
output steps, an int16 one by at most 0.55 (benchmarks/ibert_kernels.py), because the residual
stream's few large channels take most of an 8-bit grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import LowbitError
from ..dtypes import dtype
from ..dyadic import dyadic
from ..intmath import bit_length, isqrt
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

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




# --- the integer kernel (I-BERT LayerNorm) ----------------------------------------------------------------------------
#
# Run time, per row of N integers q (real value q * in_scale, |q| <= 2^(bits-1)), all in int64:
#   d = (N * q - sum(q) + rnd_k) >> k             N (q - mean): exact centring, no rounded mean; k >= 0 below
#   W = sum(d^2) + E                              N^2 var / 4^k plus eps in the same units (E, rounded)
#   t = 2 ((62 - bit_length(W)) >> 1)             even, so that W << t lies in [2^60, 2^62)
#   r = isqrt(W << t)                             in [2^30, 2^31): sqrt(W) 2^(t/2) to 31 bits
#   n = round(d << (t/2 + P) / r)                 (x - mean) / sqrt(var + eps) / sqrt(N) in Q.P, P = 30
#   u = (n * b_j + rnd) >> (c_j - H)              times gamma_j sqrt(N) / out_scale, in Q.H, H = 16
#   o = clip((u + beta_j + 2^(H-1)) >> H)         plus beta_j / out_scale (beta_j in Q.H), rounded: int8
# Bounds: |sum(q)| <= N 2^31 and |N q - sum(q)| <= N 2^32 < 2^53 for N <= 2^20. k is the least shift (chosen at
# lowering from N and the input width) with N (d_max + 1)^2 < 2^61 and E < 2^61, so W < 2^62 and t >= 0.
# d^2 <= W, so |d| 2^(t/2) <= sqrt(W << t) < 2^31 and |d << (t/2 + P)| < 2^61; 2 num + r < 2^62.
# |n| <= 2^P (sqrt(W << t) / r) + 1 <= 2^P + 2, and |b_j| < 2^30: |n b_j| < 2^61. |beta_j| is clipped to 2^40
# (any beyond saturates the output anyway), so u + beta_j < 2^62. W = 0 (a constant row and E = 0) gives d = 0
# and r is taken as 1: the output is beta.
# eps: E = round(N eps (N / (2^k in_scale))^2), added to the variance (the float op's var + eps), so it also
# floors it: a constant row never divides by zero when E >= 1.

LN_P = 30
LN_H = 16
LN_MAX_WIDTH = 1 << 20
_LIMIT = 1 << 61


@dataclass(frozen=True)
class LayerNormConstants:
    """What a lowering precomputes: the centring shift k, eps in integer units E, the per-channel dyadic
    multipliers (signed mantissa, shift) of gamma_j sqrt(N) / (out_scale 2^P), beta_j / out_scale in Q.H, and the
    output's integer range."""
    width: int
    k: int
    eps_int: int
    mantissa: np.ndarray
    shift: np.ndarray
    beta: np.ndarray
    qmin: int
    qmax: int


def layer_norm_constants(width: int, in_bits: int, gamma: np.ndarray, beta: np.ndarray, eps: float,
                         in_scale: float, out_scale: float, out_bits: int = 8) -> LayerNormConstants:
    """The integer constants of `integer_layer_norm` for rows of `width` signed `in_bits`-bit integers."""
    if not 1 <= width <= LN_MAX_WIDTH or not 2 <= in_bits <= 32:
        raise ValueError(f"layer_norm: rows of 1..{LN_MAX_WIDTH} integers of 2..32 bits, got {width} of {in_bits}")
    if not (in_scale > 0 and out_scale > 0 and eps >= 0):
        raise ValueError(f"layer_norm: scales must be positive and eps non-negative ({in_scale}, {out_scale}, {eps})")
    d_max = width << in_bits  # |N q - sum(q)| <= N (qmax - qmin) < N 2^bits
    k = 0
    while True:
        eps_units = width * eps * (width / (2.0 ** k * in_scale)) ** 2
        if width * ((d_max >> k) + 1) ** 2 < _LIMIT and eps_units < _LIMIT / 2:
            break
        k += 1
    gamma = np.asarray(gamma, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if gamma.shape != (width,) or beta.shape != (width,):
        raise ValueError(f"layer_norm: gamma {gamma.shape} and beta {beta.shape} must have the row width {width}")
    b, c = dyadic(np.abs(gamma) * math.sqrt(width) / (out_scale * 2.0 ** LN_P))
    if np.any(c[b != 0] < LN_H + 1):
        raise ValueError(f"layer_norm: gamma / out_scale up to {np.abs(gamma).max() / out_scale:.3g} is too large "
                         "for the Q.16 output step; use a larger output scale")
    c = np.where(b == 0, LN_H + 1, c)
    beta_q = np.clip(np.round(beta / out_scale * 2.0 ** LN_H), -(2.0 ** 40), 2.0 ** 40).astype(np.int64)
    return LayerNormConstants(width, k, int(round(eps_units)), np.where(gamma < 0, -b, b), c, beta_q,
                              -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1)


def integer_layer_norm_int(q: np.ndarray, consts: LayerNormConstants,
                           record: dict[str, int] | None = None) -> np.ndarray:
    """The run-time part of `integer_layer_norm`: integer-only, int64 throughout (bounds above).
    `record`, if given, receives the max |value| of each intermediate (for the tests of the stated bounds)."""
    q = np.asarray(q)
    if q.dtype.kind != "i" or q.shape[-1] != consts.width:
        raise ValueError(f"layer_norm: signed integer rows of width {consts.width} expected, got {q.dtype} {q.shape}")
    q = q.astype(np.int64)
    k = consts.k
    d = consts.width * q - q.sum(-1, keepdims=True)
    d = (d + ((1 << k) >> 1)) >> k
    w = (d * d).sum(-1, keepdims=True) + consts.eps_int
    half_t = (62 - bit_length(w)) >> 1
    r = np.maximum(isqrt(w << (2 * half_t)), 1)
    num = d << (half_t + LN_P)
    n = (2 * num + r) // (2 * r)
    step = consts.shift - LN_H
    u = (n * consts.mantissa + ((np.int64(1) << step) >> 1)) >> step
    out = (u + consts.beta + (1 << (LN_H - 1))) >> LN_H
    if record is not None:
        record.update({name: int(np.abs(a).max()) for name, a in (("d", d), ("w", w), ("num", num), ("n", n),
                                                                   ("n*b", n * consts.mantissa), ("u", u))})
        record["r_min"], record["r_max"] = int(r.min()), int(r.max())
    return np.clip(out, consts.qmin, consts.qmax).astype(np.int8 if consts.qmax < 128 else np.int16)


def integer_layer_norm(q: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, in_scale: float,
                       out_scale: float, in_bits: int | None = None, out_bits: int = 8) -> np.ndarray:
    """Integer-only LayerNorm over the last dim of int8/int16/int32 rows q (real value q * in_scale): the
    int8 (out_bits 8) or int16 output of scale out_scale. Constants from `layer_norm_constants` (a lowering's job),
    the rest is `integer_layer_norm_int`."""
    q = np.asarray(q)
    bits = in_bits if in_bits is not None else 8 * q.dtype.itemsize
    return integer_layer_norm_int(q, layer_norm_constants(q.shape[-1], bits, gamma, beta, eps, in_scale, out_scale,
                                                          out_bits))


def _lower(lw: Any, node: Node) -> None:
    x = lw.input_value(node)
    if x.dtype not in ("int8", "int16", "int32"):
        raise LowbitError(f"node {node.name} (layer_norm): a signed integer input is needed, not {x.dtype}")
    out, qmin, qmax = lw.activation(node.name, node.shape)
    gamma, beta = (lw.graph.params[f"{node.name}.{k}"].double().numpy() for k in ("weight", "bias"))
    try:
        c = layer_norm_constants(node.shape[-1], dtype(x.dtype).bits, gamma, beta, node.attrs["eps"], x.scale,
                                 out.scale, dtype(out.dtype).bits)
    except ValueError as e:
        raise LowbitError(f"node {node.name} (layer_norm): {e}") from e
    lw.emit(node.name, "layer_norm", [x], out, {"k": c.k, "eps_int": c.eps_int, "qmin": qmin, "qmax": qmax},
            {"multiplier": c.mantissa.astype(np.int64), "shift": c.shift.astype(np.int64),
             "beta": c.beta.astype(np.int64)})


def constants_of(op: Op) -> LayerNormConstants:
    """The op's integer constants, as `integer_layer_norm_int` takes them."""
    return LayerNormConstants(len(op.arrays["beta"]), op.attrs["k"], op.attrs["eps_int"], op.arrays["multiplier"],
                              op.arrays["shift"], op.arrays["beta"], op.attrs["qmin"], op.attrs["qmax"])


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    return integer_layer_norm_int(args[0], constants_of(op))


LAYER_NORM = register(OpDef(
    "layer_norm",
    "(x - mean) / sqrt(var + eps) * gamma + beta over the last dimension (biased variance), gamma and beta "
    "constants, not weights; integer-only on an int16 input (I-BERT: exact integer centring and variance, "
    "integer square root, per-channel dyadic gamma, beta in Q.16; `layer_norm.integer_layer_norm_int`).",
    attrs=LayerNormAttrs,
    aten={aten.layer_norm.default: _layer_norm, aten.native_layer_norm.default: _native_layer_norm},
    described_as="layer_norm (last dimension)",
    evaluate=_evaluate, lower=_lower, reference=_reference, constants=("weight", "bias"), wide_input=True,
))
