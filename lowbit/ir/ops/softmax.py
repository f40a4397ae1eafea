"""softmax: over the last dimension, optionally with an attention mask (BERT's attention probabilities).

With a mask (a second input: the model's 0/1 attention_mask [B, S]), the op is
softmax(x + (1 - mask) * mask_bias) with the bias broadcast as [B, 1, ..., 1, S]: the
masked keys get `mask_bias` added (-10000 in lowbit's BERT: exactly zero weight).
Capture fuses the model's whole chain (mask cast to float, 1 - m, times the bias,
unsqueezed, added to the scores) into this one op, so the scores stay a tensor of
their own, calibrated without the -10000s. Its integer form is `integer_softmax_int` (I-BERT,
Kim et al. 2021, with a finer exp): the mask as exact zeros, an integer exp (a shift plus a
polynomial) and an integer division by the row sum, on the exact int32 scores of the matmul
before it, giving uint8 probabilities of scale 1/255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import LowbitError
from ..dyadic import dyadic, mantissa_bits_for
from ._fx import fx_arg, is_call, mask_source, shape
from .registry import Fusion, OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

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




# --- the integer kernel (I-BERT softmax with a finer exp) ------------------------------------------------------------
#
# Run time, per row of the int32 scores q (real value q * scale), all in int64:
#   x = q - max(q over unmasked keys)                 in [-(2^32 - 1), 0]
#   v = (x * m + rnd) >> c                            x * scale / ln2 in Q.F (F = SOFTMAX_FRAC_BITS), v <= 0
#   z = (-v) >> F,  f = (-v) & (2^F - 1)              exp(x*scale) = 2^-z * 2^(-f / 2^F)
#   y = poly(f)                                       2^(-f/2^F) in Q.G (G = SOFTMAX_EXP_BITS), Horner, integer
#   e = y >> z if z <= G and the key is unmasked, else 0
#   p = (L * e + sum(e) // 2) // sum(e)               L = 255 (uint8) or 65535 (uint16), scale 1/L: rounded
# Bounds: |x * m| < 2^32 * 2^29 = 2^61 (m has mantissa_bits_for(2^32 - 1) = 29 bits) and rnd = 2^(c-1) <= 2^61 is
# added to a non-positive number: no overflow, and v <= 0. Horner: |t| < 2^(G+1) (every partial sum of the fitted
# coefficients is below 2 in Q.G, checked at fit time) and f < 2^F, so |t * f| < 2^(G+1+F) = 2^46.
# 0 < y <= 2^G + err (the polynomial's value at f = 0 is the row max's exp), e <= y, so
# sum(e) <= S * (2^G + 2^(G-8)) < 2^51 for S <= SOFTMAX_MAX_KEYS = 2^20, and L * e + sum < 2^51 + 2^47: int64
# is ample. sum(e) >= y(0) > 2^29 (the max key), so the division is defined.
# The output scale 1/L (not 2^-8) lets a certain key have probability exactly 1 (L) within uint8/uint16. Each p is
# rounded on its own, so a row's sum is within keys / 2 steps of L: on MiniLM up to 10/255 off (uint8), which
# scales that query's A.V output by up to 4%; uint16 (A.V still fits int32: 65535 * 127 * 256 < 2^31) removes it.

SOFTMAX_FRAC_BITS = 15
SOFTMAX_EXP_BITS = 30
SOFTMAX_OUT_BITS = 8
SOFTMAX_MAX_KEYS = 1 << 20
SOFTMAX_DEGREE = 3  # I-BERT's 2 adds up to 1.8e-3 relative exp error; 3 gives 8e-5 for one more multiply
_X_BOUND = (1 << 32) - 1


@dataclass(frozen=True)
class SoftmaxConstants:
    """What a lowering precomputes from the scores' float scale: the dyadic x -> Q.F multiplier and the
    exp polynomial's integer coefficients (highest degree first), and the polynomial's relative error bound."""
    mantissa: int
    shift: int
    coefficients: tuple[int, ...]
    exp_rel_error: float


def exp2_polynomial(degree: int = SOFTMAX_DEGREE) -> tuple[np.ndarray, float]:
    """A degree-`degree` polynomial in r for 2^-r on [0, 1), fitted for relative error (weights 2^r, Chebyshev
    nodes, so close to minimax); its float coefficients (highest first) and the max relative error on a fine grid."""
    nodes = 0.5 - 0.5 * np.cos(np.pi * (np.arange(400) + 0.5) / 400)
    coef = np.polyfit(nodes, np.exp2(-nodes), degree, w=np.exp2(nodes))
    grid = np.linspace(0.0, 1.0, 1 << 14)
    err = float(np.max(np.abs(np.polyval(coef, grid) * np.exp2(grid) - 1.0)))
    return coef, err


def softmax_constants(scale: float, degree: int = SOFTMAX_DEGREE) -> SoftmaxConstants:
    """The integer constants of `integer_softmax` for scores of real value q * scale."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax: the scores' scale must be finite and positive, got {scale}")
    bits = mantissa_bits_for(_X_BOUND)
    b, c = dyadic(scale / math.log(2) * (1 << SOFTMAX_FRAC_BITS), bits)
    if int(b[0]) == 0:
        raise ValueError(f"softmax: scores' scale {scale} is too small for a Q.{SOFTMAX_FRAC_BITS} exponent")
    coef, err = exp2_polynomial(degree)
    # In Horner's scheme on f = r * 2^F, the Q.G coefficient of r^k is used as is; f's scaling is the >> F.
    ints = tuple(int(round(a * (1 << SOFTMAX_EXP_BITS))) for a in coef)
    partial = np.cumsum(np.abs(coef))
    if partial.max() >= 2.0:
        raise AssertionError("exp polynomial: a Horner partial sum reaches 2, beyond the stated int64 bound")
    # Integer coefficients and the Q.F input add at most a few 2^-G units and 2^-(F+1) ln 2 of relative error.
    return SoftmaxConstants(int(b[0]), int(c[0]), ints, err + 4.0 * 2.0 ** -SOFTMAX_EXP_BITS
                            + math.log(2) * 2.0 ** -(SOFTMAX_FRAC_BITS + 1))


def softmax_error_bound(consts: SoftmaxConstants, keys: int, out_bits: int = SOFTMAX_OUT_BITS) -> float:
    """The max |p - softmax| (probability units) of `integer_softmax` over `keys` keys against the float softmax
    of q * scale: half an output step, plus 2d / (1 - d) for a relative exp error d (each p is
    p_true (1 + d_i) / (1 + d_mean)), plus the truncations of e = y >> z and the keys cut off at z > G (under one
    unit each, against sum(e) > 2^(G-1)). The rounded row sums are within keys / 2 output steps of 1."""
    d = consts.exp_rel_error
    return 0.5 / ((1 << out_bits) - 1) + 2.0 * d / (1.0 - d) + 2.0 * keys * 2.0 ** -(SOFTMAX_EXP_BITS - 1)


def integer_softmax_int(q: np.ndarray, consts: SoftmaxConstants, mask: np.ndarray | None = None,
                        record: dict[str, int] | None = None, out_bits: int = SOFTMAX_OUT_BITS) -> np.ndarray:
    """The run-time part of `integer_softmax`: integer-only, int64 throughout (bounds above). Returns uint8 or uint16
    (out_bits), scale 1 / (2^out_bits - 1).
    `record`, if given, receives the max |value| of each intermediate (for the tests of the stated bounds)."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or (q.size and not -(2**31) <= int(q.min()) <= int(q.max()) < 2**31):
        raise ValueError(f"softmax: integer scores in int32's range expected, got {q.dtype} "
                         f"[{q.min(initial=0)}, {q.max(initial=0)}]")
    if q.shape[-1] > SOFTMAX_MAX_KEYS:
        raise ValueError(f"softmax over {q.shape[-1]} keys; at most {SOFTMAX_MAX_KEYS} keep the sum in int64")
    out_dtype = np.uint8 if out_bits == 8 else np.uint16
    if mask is None:
        return _softmax_rows(q, None, consts, out_bits, record).astype(out_dtype)
    mask = np.asarray(mask)
    if mask.shape != (q.shape[0], q.shape[-1]):
        raise ValueError(f"softmax: mask of shape {mask.shape} for scores {q.shape}; expected [B, S]")
    keep = mask != 0
    # A row with every key masked: the float op adds the same bias to all keys, i.e. it is unmasked.
    keep[~keep.any(-1)] = True
    if record is not None:  # the bounds' tests see every intermediate, masked keys too
        full = np.broadcast_to(keep.reshape(keep.shape[0], *[1] * (q.ndim - 2), keep.shape[1]), q.shape)
        return _softmax_rows(q, full, consts, out_bits, record).astype(out_dtype)
    # Keys after a sample's last kept one get e = 0, so p = (sum(e) >> 1) // sum(e) = 0 exactly (sum(e) > 2^29):
    # only the keys up to it are computed (a short sentence padded to 128 tokens has few).
    out = np.zeros(q.shape, dtype=out_dtype)
    for b in range(q.shape[0]):
        stop = int(np.flatnonzero(keep[b])[-1]) + 1
        row_keep = keep[b, :stop].reshape(*[1] * (q.ndim - 2), stop)
        out[b, ..., :stop] = _softmax_rows(q[b, ..., :stop], None if row_keep.all() else row_keep, consts, out_bits)
    return out


def _softmax_rows(q: np.ndarray, keep: np.ndarray | None, consts: SoftmaxConstants, out_bits: int,
                  record: dict[str, int] | None = None) -> np.ndarray:
    """`integer_softmax_int` on rows of scores, `keep` (broadcast to q; None: every key) marking the unmasked keys;
    returns int64 probabilities. In-place steps: the same integers with fewer temporaries."""
    q = q.astype(np.int64)
    low = np.int64(np.iinfo(np.int64).min)
    x = q - (q if keep is None else np.where(keep, q, low)).max(-1, keepdims=True)
    if record is not None:
        record.update(x=int(np.abs(x).max()), **{"x*m": int(np.abs(x * consts.mantissa).max())})
    v = x  # x is not needed after this
    v *= consts.mantissa
    v += np.int64(1) << consts.shift >> 1
    v >>= consts.shift
    np.negative(v, out=v)  # -v >= 0 from here
    f = v & ((1 << SOFTMAX_FRAC_BITS) - 1)
    z = v
    z >>= SOFTMAX_FRAC_BITS
    y = np.full(q.shape, consts.coefficients[0], dtype=np.int64)
    for a in consts.coefficients[1:]:
        y *= f
        y >>= SOFTMAX_FRAC_BITS
        y += a
    if record is not None:
        record["y"] = int(np.abs(y).max())
    cut = z > SOFTMAX_EXP_BITS
    if keep is not None:
        cut |= ~keep
    np.minimum(z, SOFTMAX_EXP_BITS, out=z)
    e = y
    e >>= z
    e[cut] = 0
    total = e.sum(-1, keepdims=True)
    if record is not None:
        record.update(e=int(np.abs(e).max()), sum=int(np.abs(total).max()), min_sum=int(total.min()))
    num = e
    num *= (1 << out_bits) - 1
    num += total >> 1
    if record is not None:
        record["num"] = int(np.abs(num).max())
    num //= total
    return num


def integer_softmax(q: np.ndarray, scale: float, mask: np.ndarray | None = None, degree: int = SOFTMAX_DEGREE,
                    out_bits: int = SOFTMAX_OUT_BITS) -> tuple[np.ndarray, float]:
    """Integer-only softmax of the int8/int32 scores q (real value q * scale) over the last dim, masked keys
    (mask [B, S] == 0, broadcast as [B, 1, ..., 1, S]) exactly 0, as the float op's -10000 bias makes them:
    (uint8 or uint16 probabilities, their scale 1 / (2^out_bits - 1)). The constants come from
    `softmax_constants` (a lowering's job); the rest is `integer_softmax_int`."""
    if out_bits not in (8, 16):
        raise ValueError(f"softmax: probabilities of 8 or 16 bits, not {out_bits}")
    p = integer_softmax_int(q, softmax_constants(scale, degree), mask, out_bits=out_bits)
    return p, 1.0 / ((1 << out_bits) - 1)


def _lower(lw: Any, node: Node) -> None:
    scores = lw.input_value(node, 0)
    if scores.dtype not in ("int8", "int16", "int32"):
        raise LowbitError(f"node {node.name} (softmax): signed integer scores are needed, not {scores.dtype}")
    inputs = [scores]
    if len(node.inputs) > 1:
        inputs.append(lw.input_value(node, 1))
        if inputs[1].dtype != "int64":
            raise LowbitError(f"node {node.name} (softmax): the attention mask must be an int64 model input")
    c = softmax_constants(float(scores.scale))
    out = lw.value(node.name, "uint8", node.shape, 1.0 / ((1 << SOFTMAX_OUT_BITS) - 1))
    lw.emit(node.name, "softmax", inputs, out,
            {"mantissa": c.mantissa, "shift": c.shift, "exp_rel_error": c.exp_rel_error},
            {"coefficients": np.asarray(c.coefficients, dtype=np.int64)})


def constants_of(op: Op) -> SoftmaxConstants:
    """The op's integer constants, as `integer_softmax_int` takes them."""
    return SoftmaxConstants(op.attrs["mantissa"], op.attrs["shift"],
                            tuple(int(a) for a in op.arrays["coefficients"]), op.attrs["exp_rel_error"])


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    return integer_softmax_int(args[0], constants_of(op), args[1] if len(args) > 1 else None)


SOFTMAX = register(OpDef(
    "softmax",
    "softmax over the last dimension; with a second input, the 0/1 attention mask [B, S], of "
    "x + (1 - mask) * mask_bias broadcast as [B, 1, ..., 1, S]. Integer-only on int32 scores: masked keys exactly "
    "0, exp as a shift and a cubic, an integer division by the row sum, uint8 out of scale 1/255 "
    "(`softmax.integer_softmax_int`).",
    attrs=SoftmaxAttrs,
    aten=dict.fromkeys(_SOFTMAX, _softmax),
    fusions=dict.fromkeys(_SOFTMAX, _masked),
    described_as="softmax (last dimension, with an attention mask)",
    evaluate=_evaluate, lower=_lower, reference=_reference,
    calibrated=False,
))
