"""TVM converters and TE kernels of the encoder's integer ops: embedding, add_constant, permute, matmul, softmax,
layer_norm and masked_mean, registered in `lower.CONVERTERS`, bit-exact with their `OpDef.reference`.

Correctness first: every kernel computes in int64 exactly as the reference's comment block states it (an
arithmetic `>>` floors, `floordiv` floors), its tensors in the IR's order (these ops never see NHWC). Row
statistics (max, sums, the integer square root) are small stages of their own, so no expression is repeated;
the stages are scheduled only by parallelizing their outer loop. These generic kernels serve portable builds and
the cases the fast ones refuse: x86 builds (`lower`'s `encoder_threads`) run the matmuls on `x86.matmul_pairs`
(AVX2), reading the heads through the permutes around them (`fusions.permute_folds`: no transpose kernels), and
the softmax and LayerNorm rows on `rows` (int32 where bounded, exact float64 divisions). The GELU lut and the
residual adds run in the epilogues of the linears before them (`fusions.dense_fusions`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir.schedule import ScheduleError

from ...ir import Op
from ...ir.intmath import ISQRT_MAX_STEPS
from ...ir.ops import embedding, layer_norm, matmul, softmax
from ...ir.ops.add_constant import requantizer as add_constant_requantizer
from ...ir.ops.layer_norm import LN_H, LN_P, LayerNormConstants
from ...ir.ops.softmax import SOFTMAX_EXP_BITS, SOFTMAX_FRAC_BITS, SoftmaxConstants
from . import kernels, rows, x86
from .kernels import requantize_expr
from .lower import _Context, converter

Expr = tvm.ir.expr.Expr
I64 = "int64"


def _i64(value: int) -> Expr:
    return tirx.const(int(value), I64)


def _shr(x: Expr, s: Expr | int) -> Expr:
    """x >> s, arithmetic (floor) for a signed int64 x."""
    return tirx.shift_right(x, s if isinstance(s, Expr) else _i64(s))


def _where(cond: Expr, a: Expr, b: Expr) -> Expr:
    return tirx.Select(cond, a, b)


def parallel_outer(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Run each stage's outermost loop in parallel. Nothing is inlined: the row stages (bit length, Newton steps)
    read their predecessor several times each, so inlining them would multiply the expression at every step."""
    sch = tvm.s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        if loops and int(sch.get(loops[0]).extent) > 1:
            try:
                sch.parallel(loops[0])
            except ScheduleError:  # a reduction's outermost loop
                pass
    return sch.mod["main"]


# -- kernels ---------------------------------------------------------------------------------------

def embedding_kernel(ids_shape: tuple[int, ...], vocab: int, width: int, shift: int, qmin: int, qmax: int,
                     out_dtype: str) -> tirx.PrimFunc:
    """(ids int64, rows int8 [V, H], mantissa int64 [V], out): the per-row requantizer of gathered rows. An id
    outside [0, V) (which the reference refuses) reads a clamped row rather than memory beyond the table."""
    ids = te.placeholder(ids_shape, I64, name="ids")
    rows = te.placeholder((vocab, width), "int8", name="rows")
    mantissa = te.placeholder((vocab,), I64, name="mantissa")

    def at(*i: Expr) -> Expr:
        row = tirx.max(tirx.min(ids(*i[:-1]), _i64(vocab - 1)), _i64(0))
        return requantize_expr(rows[row, i[-1]].astype(I64) * mantissa[row], 1, shift, qmin, qmax, out_dtype)

    out = te.compute((*ids_shape, width), at, name="embedding")
    return kernels.schedule_elementwise(te.create_prim_func([ids, rows, mantissa, out]))


def add_constant_kernel(shape: tuple[int, ...], x_dtype: str, multiplier: int, constant_shape: tuple[int, ...],
                        shift: int, qmin: int, qmax: int, out_dtype: str) -> tirx.PrimFunc:
    """(x, constant int64 broadcast over x's leading dims, out): clip((x * m + C + rnd) >> shift)."""
    x = te.placeholder(shape, x_dtype, name="x")
    constant = te.placeholder(constant_shape, I64, name="constant")
    lead = len(shape) - len(constant_shape)

    def at(*i: Expr) -> Expr:
        c = constant(*[0 if n == 1 else j for n, j in zip(constant_shape, i[lead:], strict=True)])
        return requantize_expr(x(*i).astype(I64) * _i64(multiplier) + c, 1, shift, qmin, qmax, out_dtype)

    return kernels.schedule_elementwise(te.create_prim_func([x, constant, te.compute(shape, at, name="add")]))


def transpose_kernel(shape: tuple[int, ...], dtype: str, dims: list[int]) -> tirx.PrimFunc:
    x = te.placeholder(shape, dtype, name="x")
    return kernels.schedule_elementwise(te.create_prim_func([x, topi.transpose(x, dims)]))


def matmul_kernel(a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtypes: tuple[str, str],
                  requant: tuple[int, int, int, int, str] | None) -> tirx.PrimFunc:
    """Batched a [..., M, K] @ b [..., K, N] of 8-bit operands, the exact int32 sum, then the per-tensor requantizer
    (mantissa, shift, qmin, qmax, dtype) or the raw sum."""
    a = te.placeholder(a_shape, dtypes[0], name="a")
    b = te.placeholder(b_shape, dtypes[1], name="b")
    k = te.reduce_axis((0, a_shape[-1]), "k")
    out_shape = (*a_shape[:-1], b_shape[-1])
    acc = te.compute(out_shape, lambda *i: te.sum(a[(*i[:-1], k)].astype("int32") * b[(*i[:-2], k, i[-1])]
                                                   .astype("int32"), axis=k), name="acc")
    if requant is None:
        return parallel_outer(te.create_prim_func([a, b, acc]))
    mantissa, shift, qmin, qmax, dtype = requant
    out = te.compute(out_shape, lambda *i: requantize_expr(acc(*i), mantissa, shift, qmin, qmax, dtype),
                     name="requantize")
    return parallel_outer(te.create_prim_func([a, b, out]))


def softmax_kernel(shape: tuple[int, ...], scores_dtype: str, masked: bool, consts: SoftmaxConstants,
                   out_dtype: str) -> tirx.PrimFunc:
    """(scores, [mask int64 [B, S]], out): `softmax.integer_softmax_int` over the last axis."""
    q = te.placeholder(shape, scores_dtype, name="q")
    lead, keys = shape[:-1], shape[-1]
    args = [q]
    if masked:
        mask = te.placeholder((shape[0], keys), I64, name="mask")
        args.append(mask)
        s = te.reduce_axis((0, keys), "s")
        # A row with every key masked keeps them all (the float op adds the same bias to every key).
        any_kept = te.compute((shape[0],), lambda b: te.max(tirx.Cast(I64, mask[b, s] != _i64(0)), axis=s),
                              name="any_kept")

        def keep(i: tuple[Expr, ...]) -> Expr:
            return tirx.Or(mask[i[0], i[-1]] != _i64(0), any_kept[i[0]] == _i64(0))
    else:
        def keep(i: tuple[Expr, ...]) -> Expr:
            return tirx.const(True, "bool")

    low = tirx.const(np.iinfo(np.int64).min, I64)
    k1 = te.reduce_axis((0, keys), "k1")
    top = te.compute(lead, lambda *i: te.max(_where(keep((*i, k1)), q[(*i, k1)].astype(I64), low), axis=k1),
                     name="row_max")
    frac, exp_bits = SOFTMAX_FRAC_BITS, SOFTMAX_EXP_BITS

    def exp_at(*i: Expr) -> Expr:
        x = tirx.min(q(*i).astype(I64) - top(*i[:-1]), _i64(0))  # a masked key above the max is discarded
        minus_v = -_shr(x * _i64(consts.mantissa) + _i64((1 << consts.shift) >> 1), consts.shift)
        z = _shr(minus_v, frac)
        f = tirx.bitwise_and(minus_v, _i64((1 << frac) - 1))
        y = _i64(consts.coefficients[0])
        for a in consts.coefficients[1:]:
            y = _shr(y * f, frac) + _i64(a)
        alive = tirx.And(keep(i), z <= _i64(exp_bits))
        return _where(alive, _shr(y, tirx.min(z, _i64(exp_bits))), _i64(0))

    e = te.compute(shape, exp_at, name="exp")
    k2 = te.reduce_axis((0, keys), "k2")
    total = te.compute(lead, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="row_sum")
    levels = int(np.iinfo(np.dtype(out_dtype)).max)
    out = te.compute(shape, lambda *i: tirx.floordiv(e(*i) * _i64(levels) + _shr(total(*i[:-1]), 1),
                                                     total(*i[:-1])).astype(out_dtype), name="softmax")
    return parallel_outer(te.create_prim_func([*args, out]))


def _bit_length(x: te.Tensor, name: str) -> te.Tensor:
    """`intmath.bit_length` of a non-negative int64 tensor: the same binary search, one stage per step."""
    def step(lg: te.Tensor, s: int) -> te.Tensor:  # te.compute takes no keyword arguments: bind by closure
        return te.compute(x.shape, lambda *i: lg(*i) + _where(_shr(x(*i), lg(*i) + _i64(s)) != _i64(0), _i64(s),
                                                              _i64(0)), name=f"{name}_{s}")

    lg = te.compute(x.shape, lambda *i: _i64(0), name=f"{name}_0")
    for s in (32, 16, 8, 4, 2, 1):
        lg = step(lg, s)
    return te.compute(x.shape, lambda *i: lg(*i) + _where(x(*i) != _i64(0), _i64(1), _i64(0)), name=name)


def _isqrt(n: te.Tensor) -> te.Tensor:
    """`intmath.isqrt` of int64 0 <= n < 2^62: Newton from 2^ceil(L/2), ISQRT_MAX_STEPS stages. Each holds x where
    the element is still decreasing and -x where it has stopped (x >= 1 always, so the sign is the flag)."""
    length = _bit_length(n, "isqrt_bits")
    state = te.compute(n.shape, lambda *i: _where(n(*i) > _i64(0), _i64(1), _i64(-1)) * tirx.shift_left(
        _i64(1), _shr(length(*i) + _i64(1), 1)), name="isqrt_0")

    def newton(state: te.Tensor, step: int) -> te.Tensor:
        def at(*i: Expr) -> Expr:
            x = tirx.abs(state(*i))
            y = _shr(x + tirx.floordiv(n(*i), x), 1)
            return _where(tirx.And(state(*i) > _i64(0), y < x), y, -x)

        return te.compute(n.shape, at, name=f"isqrt_{step}")

    for step in range(1, ISQRT_MAX_STEPS + 1):
        state = newton(state, step)
    return te.compute(n.shape, lambda *i: _where(n(*i) > _i64(0), tirx.abs(state(*i)), _i64(0)), name="isqrt")


def layer_norm_kernel(shape: tuple[int, ...], x_dtype: str, consts: LayerNormConstants,
                      out_dtype: str) -> tirx.PrimFunc:
    """(x, gamma mantissa int64 [N], shift int64 [N], beta int64 [N], out): `layer_norm.integer_layer_norm_int`."""
    q = te.placeholder(shape, x_dtype, name="q")
    width = shape[-1]
    gamma = te.placeholder((width,), I64, name="gamma")
    shift = te.placeholder((width,), I64, name="shift")
    beta = te.placeholder((width,), I64, name="beta")
    lead, k = shape[:-1], consts.k
    r1 = te.reduce_axis((0, width), "r1")
    total = te.compute(lead, lambda *i: te.sum(q[(*i, r1)].astype(I64), axis=r1), name="row_sum")
    d = te.compute(shape, lambda *i: _shr(_i64(width) * q(*i).astype(I64) - total(*i[:-1]) + _i64((1 << k) >> 1),
                                          k), name="centred")
    r2 = te.reduce_axis((0, width), "r2")
    squares = te.compute(lead, lambda *i: te.sum(d[(*i, r2)] * d[(*i, r2)], axis=r2), name="sum_squares")
    w = te.compute(lead, lambda *i: squares(*i) + _i64(consts.eps_int), name="w")
    w_bits = _bit_length(w, "w_bits")
    half_t = te.compute(lead, lambda *i: _shr(_i64(62) - w_bits(*i), 1), name="half_t")
    root = _isqrt(te.compute(lead, lambda *i: tirx.shift_left(w(*i), half_t(*i) * _i64(2)), name="w_normalized"))
    r = te.compute(lead, lambda *i: tirx.max(root(*i), _i64(1)), name="r")

    def at(*i: Expr) -> Expr:
        row = i[:-1]
        num = d(*i) * tirx.shift_left(_i64(1), half_t(*row) + _i64(LN_P))
        n = tirx.floordiv(num * _i64(2) + r(*row), r(*row) * _i64(2))
        step = shift[i[-1]] - _i64(LN_H)
        u = _shr(n * gamma[i[-1]] + _shr(tirx.shift_left(_i64(1), step), 1), step)
        out = _shr(u + beta[i[-1]] + _i64(1 << (LN_H - 1)), LN_H)
        return tirx.max(tirx.min(out, _i64(consts.qmax)), _i64(consts.qmin)).astype(out_dtype)

    return parallel_outer(te.create_prim_func([q, gamma, shift, beta, te.compute(shape, at, name="layer_norm")]))


def masked_mean_kernel(shape: tuple[int, int, int], x_dtype: str, frac_bits: int) -> tirx.PrimFunc:
    """(x [B, S, H], mask int64 [B, S], out int32 [B, H]): the rows whose mask is not 0, summed, times 2^F, divided
    by their count rounding half up (0 where none is)."""
    batch, seq, width = shape
    x = te.placeholder(shape, x_dtype, name="x")
    mask = te.placeholder((batch, seq), I64, name="mask")
    s1, s2 = te.reduce_axis((0, seq), "s1"), te.reduce_axis((0, seq), "s2")
    count = te.compute((batch,), lambda b: te.sum(_where(mask[b, s1] != _i64(0), _i64(1), _i64(0)), axis=s1),
                       name="count")
    total = te.compute((batch, width), lambda b, h: te.sum(
        _where(mask[b, s2] != _i64(0), x[b, s2, h].astype(I64), _i64(0)), axis=s2), name="row_sum")

    def at(b: Expr, h: Expr) -> Expr:
        num = tirx.shift_left(total[b, h], _i64(frac_bits)) * _i64(2) + count[b]
        mean = tirx.floordiv(num, tirx.max(count[b] * _i64(2), _i64(1)))
        return _where(count[b] > _i64(0), mean, _i64(0)).astype("int32")

    return parallel_outer(te.create_prim_func([x, mask, te.compute((batch, width), at, name="mean")]))


# -- converters ------------------------------------------------------------------------------------
# Each reads its inputs in the IR's order (`ctx.arg(..., nhwc=False)`: a 4-D input a quantize made NHWC comes back).

def _ir_shape(ctx: _Context, op: Op, index: int) -> tuple[int, ...]:
    return tuple(ctx.qgraph.values[op.inputs[index]].shape)


@converter("embedding")
def _embedding(ctx: _Context, op: Op) -> relax.Expr:
    rq = embedding.requantizer(op, ctx.qgraph)
    rows = op.arrays["rows"]
    func = embedding_kernel(_ir_shape(ctx, op, 0), rows.shape[0], rows.shape[1], int(rq.shift[0]), rq.qmin,
                            rq.qmax, rq.dtype)
    return ctx.call(op, func, [ctx.arg(op, nhwc=False)], [rows.astype(np.int8), op.arrays["mantissa"].astype(np.int64)],
                    ctx.shape(op.output), rq.dtype)


@converter("add_constant")
def _add_constant(ctx: _Context, op: Op) -> relax.Expr:
    rq = add_constant_requantizer(op, ctx.qgraph)
    constant = op.arrays["constant"].astype(np.int64)
    func = add_constant_kernel(_ir_shape(ctx, op, 0), ctx.dtype(op.inputs[0]), int(op.arrays["multiplier"][0]),
                               constant.shape, int(rq.shift[0]), rq.qmin, rq.qmax, rq.dtype)
    return ctx.call(op, func, [ctx.arg(op, nhwc=False)], [constant], ctx.shape(op.output), rq.dtype)


@converter("permute")
def _permute(ctx: _Context, op: Op) -> relax.Expr:
    func = transpose_kernel(_ir_shape(ctx, op, 0), ctx.dtype(op.inputs[0]), list(op.attrs["dims"]))
    return ctx.call(op, func, [ctx.arg(op, nhwc=False)], [], ctx.shape(op.output), ctx.dtype(op.output))


@converter("matmul")
def _matmul(ctx: _Context, op: Op) -> relax.Expr:
    rq = matmul.requantizer(op, ctx.qgraph)
    requant = None if rq is None else (int(rq.mantissa.reshape(-1)[0]), int(rq.shift.reshape(-1)[0]), rq.qmin,
                                       rq.qmax, rq.dtype)
    shapes, dtypes = (_ir_shape(ctx, op, 0), _ir_shape(ctx, op, 1)), (ctx.dtype(op.inputs[0]), ctx.dtype(op.inputs[1]))
    if not ctx.encoder_threads:
        func = matmul_kernel(*shapes, dtypes, requant)
        args = [ctx.arg(op, 0, nhwc=False), ctx.arg(op, 1, nhwc=False)]
        return ctx.call(op, func, args, [], ctx.shape(op.output), ctx.dtype(op.output))
    # the AVX2 kernel (the lowering allows only 8-bit operands, which it takes), through the permutes it folds
    views, args, kw = ctx.matmul_views.get(op.name, {}), [], {}
    for k in (0, 1):
        permute = views.get(k)
        if permute is None:
            args.append(ctx.arg(op, k, nhwc=False))
        else:
            args.append(ctx.arg(permute, 0, nhwc=False))
            kw["ab"[k] + "_view"] = (_ir_shape(ctx, permute, 0), tuple(permute.attrs["dims"]))
    out = views.get("out")
    if out is not None:
        kw["out_view"] = (tuple(ctx.qgraph.values[out.output].shape), tuple(out.attrs["dims"]))
    func, arrays = x86.matmul_pairs(*shapes, *dtypes, requant, ctx.encoder_threads, **kw)
    if out is None:
        return ctx.call(op, func, args, arrays, ctx.shape(op.output), ctx.dtype(op.output))
    ctx.env[out.output] = ctx.call(op, func, args, arrays, ctx.shape(out.output), ctx.dtype(out.output))
    return ctx.env[out.output]


@converter("softmax")
def _softmax(ctx: _Context, op: Op) -> relax.Expr:
    args = (_ir_shape(ctx, op, 0), ctx.dtype(op.inputs[0]), len(op.inputs) > 1, softmax.constants_of(op),
            ctx.dtype(op.output))
    func = rows.softmax_rows(*args, ctx.encoder_threads) if ctx.encoder_threads else None
    if func is None:  # portable, or the row kernel's int32 bounds fail for these constants
        func = softmax_kernel(*args)
    inputs = [ctx.arg(op, i, nhwc=False) for i in range(len(op.inputs))]
    return ctx.call(op, func, inputs, [], ctx.shape(op.output), ctx.dtype(op.output))


@converter("layer_norm")
def _layer_norm(ctx: _Context, op: Op) -> relax.Expr:
    c = layer_norm.constants_of(op)
    args = (_ir_shape(ctx, op, 0), ctx.dtype(op.inputs[0]), c, ctx.dtype(op.output))
    kernel = rows.layer_norm_rows(*args, ctx.encoder_threads) if ctx.encoder_threads else None
    if kernel is None:  # portable, or the row kernel's bounds fail for these constants
        kernel = layer_norm_kernel(*args), [np.asarray(a, dtype=np.int64) for a in (c.mantissa, c.shift, c.beta)]
    func, arrays = kernel
    return ctx.call(op, func, [ctx.arg(op, nhwc=False)], arrays, ctx.shape(op.output), ctx.dtype(op.output))


@converter("masked_mean")
def _masked_mean(ctx: _Context, op: Op) -> relax.Expr:
    func = masked_mean_kernel(_ir_shape(ctx, op, 0), ctx.dtype(op.inputs[0]), int(op.attrs["frac_bits"]))
    args = [ctx.arg(op, 0, nhwc=False), ctx.arg(op, 1, nhwc=False)]
    return ctx.call(op, func, args, [], ctx.shape(op.output), ctx.dtype(op.output))
