"""`model.int.onnx` converters of the encoder's integer ops: embedding, add_constant, permute, matmul, softmax,
layer_norm and masked_mean, registered in `integer.INTEGER_CONVERTERS`, bit-exact with their `OpDef.reference`.

Everything runs in int64, as the references do, with three ONNX Runtime limits worked around:
- BitShift takes unsigned types only, and `>>` must floor: `floor_shift` adds 2^62 (a multiple of every 2^c) so
  the value is non-negative, shifts it as uint64 and takes 2^(62-c) back (exact for |v| < 2^62, the bound every
  op module states for its shifted values);
- integer Div truncates toward zero: `floor_div` moves a negative numerator down by d - 1 first;
- MatMulInteger's u8 x s8 kernels add pairs of products in saturating int16 on x86 CPUs without VNNI (and s8 x s8
  can reach 2 * 128 * 128 = 2^15), so both operands of `matmul` go in as uint8 (an int8 x as x + 128 with zero
  point 128): ORT's u8 x u8 kernels widen before they add, so the int32 sum is exact on every CPU.
The masks are compared with 0 (`mask != 0` keeps a key, as in the references), so any nonzero value counts as 1.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...ir import Op
from ...ir.intmath import ISQRT_MAX_STEPS
from ...ir.ops import embedding, layer_norm, matmul, softmax
from ...ir.ops.add_constant import requantizer as add_constant_requantizer
from ...ir.ops.layer_norm import LN_H, LN_P
from ...ir.ops.softmax import SOFTMAX_EXP_BITS, SOFTMAX_FRAC_BITS
from .builder import Builder, onnx_type
from .integer import _integer, requantize

_OFFSET = 62  # floor_shift's offset: 2^62 + v stays in (0, 2^63) for |v| < 2^62


def _i64(b: Builder, name: str, value: int | np.ndarray) -> str:
    return b.const(name, np.asarray(value, dtype=np.int64))


def _cast(b: Builder, x: str, to: int, out: str) -> str:
    return b.node("Cast", [x], out, to=to)


def shift_unsigned(b: Builder, prefix: str, x: str, shift: str, direction: str = "RIGHT") -> str:
    """x >> shift (or <<) for a non-negative int64 x and an int64 shift tensor (broadcast), as uint64."""
    u = _cast(b, x, TensorProto.UINT64, f"{prefix}/u64")
    s = _cast(b, shift, TensorProto.UINT64, f"{prefix}/shift_u64")
    return _cast(b, b.node("BitShift", [u, s], f"{prefix}/shifted_u64", direction=direction), TensorProto.INT64,
                 f"{prefix}/shifted")


def floor_shift(b: Builder, prefix: str, x: str, shift: np.ndarray | int) -> str:
    """x >> shift (arithmetic: floor) for an int64 |x| < 2^62 and constant shift(s) in [0, 62] (broadcast)."""
    shift = np.asarray(shift, dtype=np.int64)
    if shift.size == 1 and int(shift.max()) == 0:
        return x
    v = b.node("Add", [x, _i64(b, f"{prefix}/offset", 1 << _OFFSET)], f"{prefix}/offset_x")
    v = shift_unsigned(b, prefix, v, _i64(b, f"{prefix}/by", shift))
    return b.node("Sub", [v, _i64(b, f"{prefix}/unoffset", np.left_shift(np.int64(1), _OFFSET - shift))],
                  f"{prefix}/floored")


def floor_div(b: Builder, prefix: str, x: str, d: str) -> str:
    """floor(x / d) for int64 x (any sign, |x| < 2^62) and d > 0: ORT's Div truncates, so a negative x is first
    moved down by d - 1."""
    negative = b.node("Less", [x, _i64(b, f"{prefix}/zero", 0)], f"{prefix}/negative")
    d_minus_one = b.node("Sub", [d, _i64(b, f"{prefix}/one", 1)], f"{prefix}/d_minus_one")
    adjust = b.node("Where", [negative, d_minus_one, _i64(b, f"{prefix}/no_adjust", 0)], f"{prefix}/adjust")
    return b.node("Div", [b.node("Sub", [x, adjust], f"{prefix}/moved"), d], f"{prefix}/quotient")


def keep_mask(b: Builder, prefix: str, mask: str) -> str:
    """The 0/1 int64 of `mask != 0`."""
    zero = b.node("Equal", [mask, _i64(b, f"{prefix}/zero", 0)], f"{prefix}/is_zero")
    return _cast(b, b.node("Not", [zero], f"{prefix}/nonzero"), TensorProto.INT64, f"{prefix}/keep")


def _wide(b: Builder, op: Op, index: int = 0) -> str:
    return _cast(b, op.inputs[index], TensorProto.INT64, f"{op.name}/in{index}_64")


def _finish(b: Builder, op: Op, x: str, qmin: int, qmax: int) -> None:
    """Clip the int64 result and cast it to the output's dtype."""
    x = b.node("Clip", [x, _i64(b, f"{op.name}/qmin", qmin), _i64(b, f"{op.name}/qmax", qmax)], f"{op.name}/clipped")
    _cast(b, x, onnx_type(b.value(op.output).dtype), op.output)


@_integer("embedding")
def _int_embedding(b: Builder, op: Op) -> None:
    rows = b.node("Gather", [b.const(f"{op.name}/rows", op.arrays["rows"].astype(np.int8)), op.inputs[0]],
                  f"{op.name}/rows_at", axis=0)
    mantissa = b.node("Gather", [b.const(f"{op.name}/mantissa", op.arrays["mantissa"].astype(np.int64)),
                                 op.inputs[0]], f"{op.name}/mantissa_at", axis=0)
    mantissa = b.node("Unsqueeze", [mantissa, _i64(b, f"{op.name}/last", [-1])], f"{op.name}/mantissa_col")
    scaled = b.node("Mul", [_cast(b, rows, TensorProto.INT64, f"{op.name}/rows64"), mantissa], f"{op.name}/scaled")
    rq = embedding.requantizer(op, b.qgraph)
    requantize(b, op.name, scaled, rq, len(b.value(op.output).shape), op.output)


@_integer("add_constant")
def _int_add_constant(b: Builder, op: Op) -> None:
    scaled = b.node("Mul", [_wide(b, op), _i64(b, f"{op.name}/mantissa", int(op.arrays["multiplier"][0]))],
                    f"{op.name}/scaled")
    total = b.node("Add", [scaled, _i64(b, f"{op.name}/constant", op.arrays["constant"])], f"{op.name}/total")
    requantize(b, op.name, total, add_constant_requantizer(op, b.qgraph), len(b.value(op.output).shape), op.output)


@_integer("permute")
def _int_permute(b: Builder, op: Op) -> None:
    b.node("Transpose", [op.inputs[0]], op.output, perm=list(op.attrs["dims"]))


def _as_uint8(b: Builder, op: Op, index: int) -> list[str]:
    """Operand `index` of a matmul as MatMulInteger's (uint8 tensor, uint8 zero point): int8 x as x + 128."""
    x = op.inputs[index]
    if b.value(x).dtype == "uint8":
        return [x, b.const(f"{op.name}/zero_point{index}", np.uint8(0))]
    shifted = b.node("Add", [_cast(b, x, TensorProto.INT32, f"{op.name}/in{index}_32"),
                             b.const(f"{op.name}/offset{index}", np.int32(128))], f"{op.name}/in{index}_offset")
    return [_cast(b, shifted, TensorProto.UINT8, f"{op.name}/in{index}_u8"),
            b.const(f"{op.name}/zero_point{index}", np.uint8(128))]


@_integer("matmul")
def _int_matmul(b: Builder, op: Op) -> None:
    (a, za), (c, zc) = _as_uint8(b, op, 0), _as_uint8(b, op, 1)
    rq = matmul.requantizer(op, b.qgraph)
    if rq is None:
        b.node("MatMulInteger", [a, c, za, zc], op.output)
        return
    acc = b.node("MatMulInteger", [a, c, za, zc], f"{op.name}/acc")
    requantize(b, op.name, acc, rq, len(b.value(op.output).shape), op.output)


def _softmax_keep(b: Builder, op: Op, rank: int) -> str | None:
    """The kept keys as 0/1 int64 [B, 1, ..., 1, S] (a row with every key masked keeps them all), or None."""
    if len(op.inputs) < 2:
        return None
    p = f"{op.name}/mask"
    keep = keep_mask(b, p, op.inputs[1])
    any_kept = b.node("ReduceMax", [keep, _i64(b, f"{p}/axes", [-1])], f"{p}/any", keepdims=1)
    none_kept = b.node("Sub", [_i64(b, f"{p}/one", 1), any_kept], f"{p}/none")
    keep = b.node("Max", [keep, none_kept], f"{p}/keep_rows")
    return b.node("Unsqueeze", [keep, _i64(b, f"{p}/unit_dims", list(range(1, rank - 1)))], f"{p}/broadcast")


@_integer("softmax")
def _int_softmax(b: Builder, op: Op) -> None:
    """`softmax.integer_softmax_int`, step for step (its comment block states the bounds used here)."""
    c = softmax.constants_of(op)
    n, rank, frac = op.name, len(b.value(op.output).shape), SOFTMAX_FRAC_BITS
    q = _wide(b, op)
    keep = _softmax_keep(b, op, rank)
    last = _i64(b, f"{n}/last", [-1])
    if keep is None:
        top = b.node("ReduceMax", [q, last], f"{n}/max", keepdims=1)
    else:
        kept = b.node("Equal", [keep, _i64(b, f"{n}/one", 1)], f"{n}/kept")
        candidates = b.node("Where", [kept, q, _i64(b, f"{n}/lowest", np.iinfo(np.int64).min)], f"{n}/candidates")
        top = b.node("ReduceMax", [candidates, last], f"{n}/max", keepdims=1)
    x = b.node("Sub", [q, top], f"{n}/x")
    if keep is not None:  # a masked key above the max: its value is discarded below; keep the shifts defined
        x = b.node("Min", [x, _i64(b, f"{n}/zero", 0)], f"{n}/x_le0")
    scaled = b.node("Mul", [x, _i64(b, f"{n}/mantissa", c.mantissa)], f"{n}/x_m")
    scaled = b.node("Add", [scaled, _i64(b, f"{n}/round", (1 << c.shift) >> 1)], f"{n}/x_m_rounded")
    v = floor_shift(b, f"{n}/v", scaled, c.shift)
    minus_v = b.node("Neg", [v], f"{n}/minus_v")  # >= 0
    z = shift_unsigned(b, f"{n}/z", minus_v, _i64(b, f"{n}/frac_bits", frac))
    f = b.node("Sub", [minus_v, b.node("Mul", [z, _i64(b, f"{n}/frac_one", 1 << frac)], f"{n}/z_scaled")], f"{n}/f")
    y = _i64(b, f"{n}/coef0", c.coefficients[0])
    for i, a in enumerate(c.coefficients[1:], 1):
        t = floor_shift(b, f"{n}/horner{i}", b.node("Mul", [y, f], f"{n}/horner{i}/yf"), frac)
        y = b.node("Add", [t, _i64(b, f"{n}/coef{i}", a)], f"{n}/y{i}")
    exp_bits = _i64(b, f"{n}/exp_bits", SOFTMAX_EXP_BITS)
    e = shift_unsigned(b, f"{n}/e", y, b.node("Min", [z, exp_bits], f"{n}/z_capped"))
    alive = b.node("LessOrEqual", [z, exp_bits], f"{n}/in_range")
    if keep is not None:
        alive = b.node("And", [alive, b.node("Equal", [keep, _i64(b, f"{n}/one_k", 1)], f"{n}/kept_k")],
                       f"{n}/alive")
    e = b.node("Where", [alive, e, _i64(b, f"{n}/zero_e", 0)], f"{n}/e_kept")
    total = b.node("ReduceSum", [e, last], f"{n}/sum", keepdims=1)
    levels = (1 << int(np.iinfo(np.dtype(b.value(op.output).dtype)).bits)) - 1
    half = b.node("Div", [total, _i64(b, f"{n}/two", 2)], f"{n}/half_sum")  # >= 0: Div floors
    num = b.node("Add", [b.node("Mul", [e, _i64(b, f"{n}/levels", levels)], f"{n}/e_levels"), half], f"{n}/num")
    _cast(b, b.node("Div", [num, total], f"{n}/p"), onnx_type(b.value(op.output).dtype), op.output)


def bit_length(b: Builder, prefix: str, x: str) -> str:
    """`intmath.bit_length` of a non-negative int64 x: the same binary search of shifts."""
    lg = _i64(b, f"{prefix}/lg0", 0)
    for s in (32, 16, 8, 4, 2, 1):
        p = f"{prefix}/s{s}"
        by = b.node("Add", [lg, _i64(b, f"{p}/s", s)], f"{p}/by")
        above = b.node("Not", [b.node("Equal", [shift_unsigned(b, p, x, by), _i64(b, f"{p}/zero", 0)],
                                      f"{p}/is_zero")], f"{p}/above")
        step = b.node("Mul", [_cast(b, above, TensorProto.INT64, f"{p}/above64"), _i64(b, f"{p}/size", s)],
                      f"{p}/step")
        lg = b.node("Add", [lg, step], f"{p}/lg")
    nonzero = b.node("Greater", [x, _i64(b, f"{prefix}/zero", 0)], f"{prefix}/nonzero")
    return b.node("Add", [lg, _cast(b, nonzero, TensorProto.INT64, f"{prefix}/nonzero64")], f"{prefix}/length")


def isqrt(b: Builder, prefix: str, x: str) -> str:
    """`intmath.isqrt` of int64 0 <= x < 2^62: Newton from 2^ceil(L/2), unrolled ISQRT_MAX_STEPS times, each
    element stopping at its first non-decreasing step (as the reference's loop does; its docstring shows that
    many steps always reach floor(sqrt(x)))."""
    half_length = shift_unsigned(b, f"{prefix}/half", b.node("Add", [bit_length(b, f"{prefix}/bits", x),
                                                                     _i64(b, f"{prefix}/one", 1)], f"{prefix}/l1"),
                                 _i64(b, f"{prefix}/by1", 1))
    guess = shift_unsigned(b, f"{prefix}/x0", _i64(b, f"{prefix}/unit", 1), half_length, "LEFT")
    active = b.node("Greater", [x, _i64(b, f"{prefix}/zero", 0)], f"{prefix}/active0")
    two = _i64(b, f"{prefix}/two", 2)
    for i in range(1, ISQRT_MAX_STEPS + 1):
        p = f"{prefix}/step{i}"
        y = b.node("Div", [b.node("Add", [guess, b.node("Div", [x, guess], f"{p}/quotient")], f"{p}/sum"), two],
                   f"{p}/y")  # non-negative operands: Div floors
        active = b.node("And", [active, b.node("Less", [y, guess], f"{p}/decreases")], f"{p}/active")
        guess = b.node("Where", [active, y, guess], f"{p}/x")
    positive = b.node("Greater", [x, _i64(b, f"{prefix}/zero_out", 0)], f"{prefix}/positive")
    return b.node("Where", [positive, guess, _i64(b, f"{prefix}/zero_root", 0)], f"{prefix}/root")


@_integer("layer_norm")
def _int_layer_norm(b: Builder, op: Op) -> None:
    """`layer_norm.integer_layer_norm_int`, step for step (its comment block states the bounds used here)."""
    c = layer_norm.constants_of(op)
    n, last = op.name, _i64(b, f"{op.name}/last", [-1])
    q = _wide(b, op)
    total = b.node("ReduceSum", [q, last], f"{n}/sum_q", keepdims=1)
    d = b.node("Sub", [b.node("Mul", [q, _i64(b, f"{n}/width", c.width)], f"{n}/nq"), total], f"{n}/centred")
    if c.k:
        d = floor_shift(b, f"{n}/d", b.node("Add", [d, _i64(b, f"{n}/round_k", (1 << c.k) >> 1)], f"{n}/d_rounded"),
                        c.k)
    w = b.node("ReduceSum", [b.node("Mul", [d, d], f"{n}/d2"), last], f"{n}/sum_d2", keepdims=1)
    w = b.node("Add", [w, _i64(b, f"{n}/eps", c.eps_int)], f"{n}/w")
    half_t = shift_unsigned(b, f"{n}/half_t", b.node("Sub", [_i64(b, f"{n}/top", 62), bit_length(b, f"{n}/w_bits", w)],
                                                     f"{n}/free_bits"), _i64(b, f"{n}/by1", 1))
    normalized = shift_unsigned(b, f"{n}/w_shifted", w, b.node("Mul", [half_t, _i64(b, f"{n}/two", 2)], f"{n}/t"),
                                "LEFT")
    r = b.node("Max", [isqrt(b, f"{n}/isqrt", normalized), _i64(b, f"{n}/one", 1)], f"{n}/r")
    scale = shift_unsigned(b, f"{n}/pow", _i64(b, f"{n}/unit", 1),
                           b.node("Add", [half_t, _i64(b, f"{n}/p_bits", LN_P)], f"{n}/num_bits"), "LEFT")
    num = b.node("Mul", [d, scale], f"{n}/num")
    two_r = b.node("Mul", [r, _i64(b, f"{n}/two_r", 2)], f"{n}/r2")
    normed = floor_div(b, f"{n}/n", b.node("Add", [b.node("Mul", [num, _i64(b, f"{n}/two_num", 2)], f"{n}/num2"), r],
                                           f"{n}/num2_r"), two_r)
    step = np.asarray(c.shift, dtype=np.int64) - LN_H
    u = b.node("Mul", [normed, _i64(b, f"{n}/gamma", np.asarray(c.mantissa, dtype=np.int64))], f"{n}/n_gamma")
    u = floor_shift(b, f"{n}/u", b.node("Add", [u, _i64(b, f"{n}/round_u", np.left_shift(np.int64(1), step) >> 1)],
                                        f"{n}/u_rounded"), step)
    out = b.node("Add", [u, _i64(b, f"{n}/beta", np.asarray(c.beta, dtype=np.int64) + (1 << (LN_H - 1)))],
                 f"{n}/u_beta")
    _finish(b, op, floor_shift(b, f"{n}/out", out, LN_H), c.qmin, c.qmax)


@_integer("masked_mean")
def _int_masked_mean(b: Builder, op: Op) -> None:
    n = op.name
    keep = keep_mask(b, f"{n}/mask", op.inputs[1])
    rows = b.node("Mul", [_wide(b, op), b.node("Unsqueeze", [keep, _i64(b, f"{n}/last", [-1])], f"{n}/keep_col")],
                  f"{n}/kept_rows")
    seq = _i64(b, f"{n}/seq_axis", [1])
    total = b.node("Mul", [b.node("ReduceSum", [rows, seq], f"{n}/sum", keepdims=0),
                           _i64(b, f"{n}/frac", 1 << int(op.attrs["frac_bits"]))], f"{n}/sum_frac")
    count = b.node("ReduceSum", [keep, seq], f"{n}/count", keepdims=1)
    num = b.node("Add", [b.node("Mul", [total, _i64(b, f"{n}/two", 2)], f"{n}/sum2"), count], f"{n}/num")
    den = b.node("Max", [b.node("Mul", [count, _i64(b, f"{n}/two_d", 2)], f"{n}/count2"), _i64(b, f"{n}/one", 1)],
                 f"{n}/den")
    mean = floor_div(b, f"{n}/div", num, den)
    counted = b.node("Greater", [count, _i64(b, f"{n}/zero", 0)], f"{n}/counted")
    mean = b.node("Where", [counted, mean, _i64(b, f"{n}/empty", 0)], f"{n}/mean")
    _cast(b, mean, onnx_type(b.value(op.output).dtype), op.output)
