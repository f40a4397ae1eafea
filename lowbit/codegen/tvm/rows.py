"""Row-fused, vectorized TIR kernels for the encoder's softmax and LayerNorm, bit-exact with their references.

The generic kernels (`encoder.softmax_kernel`, `encoder.layer_norm_kernel`) compute every stage in int64 over
the whole tensor, with an int64 division per element. These do one row per step of a parallel loop, keep the
row in cache, compute in int32 wherever the bounds below allow, and replace each per-element division by a
float64 one that is provably exact (or followed by an exact integer correction). Each builder returns None
where its bounds do not hold for the op's constants; the caller then keeps the generic kernel.

float64 division, the argument used twice: for integers 0 <= n < 2^53 and 0 < t < 2^53 (both exact in float64),
floor(fl(n / t)) = floor(n / t). fl rounds to nearest, so it is monotone and keeps the integer k = floor(n / t):
fl(n / t) >= k. And n / t <= k + 1 - 1/t, while fl(n / t) <= (n / t)(1 + 2^-53) <= n / t + n 2^-53 / t
< n / t + 1/t <= k + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ...ir.intmath import ISQRT_MAX_STEPS
from ...ir.ops.layer_norm import LN_H, LN_P, LayerNormConstants
from ...ir.ops.softmax import SOFTMAX_EXP_BITS, SOFTMAX_FRAC_BITS, SoftmaxConstants
from .x86.packing import cdiv

LANES = 8  # int32 lanes of a ymm register: the inner vectorized loops
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# -- softmax -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftmaxRowPlan:
    """The integer facts that make the int32 row kernel equal `softmax.integer_softmax_int` (all checked by
    `softmax_row_plan` for the op's constants, key count and output width):

    - x_min: the least x = q - max(q) whose key can get a non-zero e (its z <= G). v is monotone in x, so every
      x < x_min gives z > G and e = 0, as x_min - 1 does: clamping x to [x_min - 1, 0] changes no e. The clamp is
      done in int32 as min(max(q, lo), max) - max with lo = max(max + x_min - 1, INT32_MIN) (a row scalar,
      computed in int64): x then lies in [x_min - 1, 0] (when lo is clipped, q - max >= INT32_MIN - max >
      x_min - 1), which needs x_min - 1 >= INT32_MIN;
    - the product x m (|x| <= 2^31, 0 < m < 2^31) is an int32 x int32 product in int64, and -v, for x in
      [x_min - 1, 0], lies in [0, neg_v_max] with neg_v_max < 2^31, so z and f are int32;
    - y_max: the largest Horner result over every f in [0, 2^F), enumerated: every partial result is an int32
      and every result is in [0, y_max], so e = y >> z is too. Horner runs in int32 lanes: with y = yh 2^F + yl
      (yh = y >> F, 0 <= yl < 2^F), (y f) >> F = yh f + ((yl f) >> F) exactly, |yh f| < 2^31 and yl f < 2^30
      (no int64 products, whose arithmetic shifts AVX2 lacks: 11% faster rows);
    - the row sum is below keys y_max and num = L e + sum // 2 below 2^53, so the division is a float64 one
      (module docstring; the row's max key has e = y(0) > 0, so the sum is positive)."""

    x_min: int
    neg_v_max: int
    y_max: int


def _v(x: int, c: SoftmaxConstants) -> int:
    return (x * c.mantissa + ((1 << c.shift) >> 1)) >> c.shift


def softmax_row_plan(consts: SoftmaxConstants, keys: int, levels: int) -> SoftmaxRowPlan | None:
    """The plan of `softmax_rows` for these constants, or None where one of its bounds fails."""
    m, s, frac, g = consts.mantissa, consts.shift, SOFTMAX_FRAC_BITS, SOFTMAX_EXP_BITS
    if not (0 < m < 1 << 31 and 0 <= s <= 62):
        return None
    # z <= G  <=>  -v < (G + 1) 2^F  <=>  v >= v0  <=>  x m + rnd >= v0 2^s  <=>  x >= ceil((v0 2^s - rnd) / m)
    v0 = 1 - ((g + 1) << frac)
    x_min = -((((1 << s) >> 1) - v0 * (1 << s)) // m)
    if x_min - 1 < INT32_MIN or x_min > 0:
        return None
    neg_v_max = -_v(x_min - 1, consts)
    if not 0 <= neg_v_max < 1 << 31 or _v(0, consts) != 0:
        return None
    f = np.arange(1 << frac, dtype=np.int64)
    y = np.full(f.shape, consts.coefficients[0], np.int64)
    lo, hi = int(y.min()), int(y.max())
    for a in consts.coefficients[1:]:
        y = ((y * f) >> frac) + a
        lo, hi = min(lo, int(y.min())), max(hi, int(y.max()))
    y_max = int(y.max())
    if lo < INT32_MIN or hi > INT32_MAX or int(y.min()) < 0:
        return None
    if keys * y_max >= 1 << 53 or levels * y_max + keys * y_max // 2 >= 1 << 53:
        return None
    return SoftmaxRowPlan(int(x_min), int(neg_v_max), y_max)


def softmax_rows(shape: tuple[int, ...], scores_dtype: str, masked: bool, consts: SoftmaxConstants, out_dtype: str,
                 num_threads: int) -> tirx.PrimFunc | None:
    """(scores int32, [mask int64 [B, S]], out): `softmax.integer_softmax_int` over the last axis, one row per
    step (max, exp into a row buffer with the row sum, then the division), or None (see `SoftmaxRowPlan`)."""
    levels = int(np.iinfo(np.dtype(out_dtype)).max)
    keys = int(shape[-1])
    plan = softmax_row_plan(consts, keys, levels)
    if plan is None:
        return None
    batch = int(shape[0])
    per_batch = int(np.prod(shape[1:-1], dtype=np.int64))
    rows = batch * per_batch
    chunk = cdiv(rows, num_threads)
    full, tail = keys // LANES, keys % LANES
    frac, g = SOFTMAX_FRAC_BITS, SOFTMAX_EXP_BITS
    m64, rnd, sh = T.int64(consts.mantissa), T.int64((1 << consts.shift) >> 1), T.int64(consts.shift)
    coefficients = consts.coefficients

    def exp_of(q, lo, mx, keep):
        """e of score q (int32) in a row of max mx and clamp lo (int32): 0 for a key not kept."""
        x = T.min(T.max(q, lo), mx) - mx
        neg_v = T.Cast("int32", -T.shift_right(T.Cast("int64", x) * m64 + rnd, sh))
        z = T.shift_right(neg_v, frac)
        f = T.bitwise_and(neg_v, (1 << frac) - 1)
        y = T.int32(coefficients[0])
        for a in coefficients[1:]:
            # (y f) >> F in int32: y = yh 2^F + yl, |yh f| < 2^31, yl f < 2^30
            y = T.shift_right(y, frac) * f + T.shift_right(T.bitwise_and(y, (1 << frac) - 1) * f, frac) + a
        return T.Select(T.And(keep, z <= g), T.shift_right(y, T.min(z, g)), 0)

    def kept_score(QF, KEEP, row, b, k):
        """Score k of the row as int32, or INT32_MIN for a key not kept (for the row max)."""
        return T.Select(KEEP[b, k] != 0, T.Cast("int32", QF[row, k]), T.int32(INT32_MIN))

    def exp_at(QF, KEEP, R, row, b, k):
        return exp_of(T.Cast("int32", QF[row, k]), T.Cast("int32", R[1]), T.Cast("int32", R[0]), KEEP[b, k] != 0)

    def prob(e, R):
        """floor((L e + sum // 2) / sum), every operand an integer below 2^53 in float64: exact (docstring)."""
        num = T.Cast("float64", e) * T.float64(levels) + T.Cast("float64", T.shift_right(R[2], T.int64(1)))
        return T.Cast(out_dtype, T.Cast("int32", T.floor(num / T.Cast("float64", R[2]))))

    @T.macro
    def body(Q, MASK, OUT):
        QF = T.decl_buffer((rows, keys), scores_dtype, data=Q.data)
        OF = T.decl_buffer((rows, keys), out_dtype, data=OUT.data)
        KEEP = T.alloc_buffer((batch, keys), "int32")
        if masked:
            ANY = T.alloc_buffer((batch,), "int32")
            for b in T.serial(batch):
                ANY[b] = 0
                for k in T.serial(keys):
                    ANY[b] = T.max(ANY[b], T.Cast("int32", MASK[b, k] != T.int64(0)))
            for b in T.serial(batch):
                for k in T.serial(keys):
                    # a row with every key masked keeps them all (the float op adds the same bias to every key)
                    KEEP[b, k] = T.Cast("int32", T.Or(MASK[b, k] != T.int64(0), ANY[b] == 0))
        else:
            for b in T.serial(batch):
                for k in T.serial(keys):
                    KEEP[b, k] = 1
        for task in T.parallel(num_threads):
            E = T.alloc_buffer((keys,), "int32")
            MX = T.alloc_buffer((LANES,), "int32", scope="local")
            SUM = T.alloc_buffer((LANES,), "int64", scope="local")
            R = T.alloc_buffer((3,), "int64", scope="local")  # row max, clamp, sum
            for i in T.serial(chunk):
                if task * chunk + i < rows:
                    row = T.meta_var(task * chunk + i)
                    b = T.meta_var(row // per_batch)
                    for ln in T.vectorized(LANES):
                        MX[ln] = T.int32(INT32_MIN)
                        SUM[ln] = T.int64(0)
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            MX[ln] = T.max(MX[ln], kept_score(QF, KEEP, row, b, j * LANES + ln))
                    R[0] = T.int64(INT32_MIN)
                    for ln in T.serial(LANES):
                        R[0] = T.max(R[0], T.Cast("int64", MX[ln]))
                    for ln in T.serial(tail):
                        R[0] = T.max(R[0], T.Cast("int64", kept_score(QF, KEEP, row, b, full * LANES + ln)))
                    R[1] = T.max(R[0] + T.int64(plan.x_min - 1), T.int64(INT32_MIN))
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            E[j * LANES + ln] = exp_at(QF, KEEP, R, row, b, j * LANES + ln)
                            SUM[ln] = SUM[ln] + T.Cast("int64", E[j * LANES + ln])
                    R[2] = T.int64(0)
                    for ln in T.serial(LANES):
                        R[2] = R[2] + SUM[ln]
                    for ln in T.serial(tail):
                        E[full * LANES + ln] = exp_at(QF, KEEP, R, row, b, full * LANES + ln)
                        R[2] = R[2] + T.Cast("int64", E[full * LANES + ln])
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            OF[row, j * LANES + ln] = prob(E[j * LANES + ln], R)
                    for ln in T.serial(tail):
                        OF[row, full * LANES + ln] = prob(E[full * LANES + ln], R)

    if masked:

        @T.prim_func(private=True)
        def func(Q: T.Buffer(shape, scores_dtype), MASK: T.Buffer((batch, keys), "int64"),
                 OUT: T.Buffer(shape, out_dtype)):
            T.func_attr({"tirx.noalias": True})
            body(Q, MASK, OUT)

    else:

        @T.prim_func(private=True)
        def func(Q: T.Buffer(shape, scores_dtype), OUT: T.Buffer(shape, out_dtype)):
            T.func_attr({"tirx.noalias": True})
            body(Q, None, OUT)

    return func


# -- LayerNorm -----------------------------------------------------------------------------------------------------

def layer_norm_row_arrays(consts: LayerNormConstants) -> list[np.ndarray] | None:
    """The per-channel constants of `layer_norm_rows` (b_j int32; rnd_j + 2^62, step_j, 2^(62 - step_j),
    beta_j + 2^(H-1), all int64), or None where a bound of its docstring fails."""
    b = np.asarray(consts.mantissa, np.int64)
    step = np.asarray(consts.shift, np.int64) - LN_H
    if b.size and (np.abs(b).max() >= 1 << 30 or step.min() < 1 or step.max() > 62):
        return None
    one = np.int64(1)
    rounded = ((one << step) >> 1) + (one << 62)
    beta = np.asarray(consts.beta, np.int64) + (1 << (LN_H - 1))
    return [b.astype(np.int32), rounded, step, one << (62 - step), beta]


def layer_norm_rows(shape: tuple[int, ...], x_dtype: str, consts: LayerNormConstants, out_dtype: str,
                    num_threads: int) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
    """(x, b, rnd, step, c, beta, out): `layer_norm.integer_layer_norm_int` one row per step, or None where its
    bounds fail. Per row of N int8/int16 values (bits w):
    - sum(q) and d = (N q - sum + rnd_k) >> k in int32: |N q - sum| <= N 2^w < 2^31 (checked);
    - W = sum(d^2) + E in int64 (int32 x int32 products), then bit_length, t and the integer square root r as
      scalars, exactly as the reference (`intmath`);
    - n = floor((2 num + r) / (2 r)), num = d << (t/2 + P): first n0 = floor(fl(fl(d 2^(t/2+P)) / r) + 1/2) in
      float64 (|n| <= 2^30 + 2, so each rounding moves the quotient by at most 2^-22: n0 is n - 1, n or n + 1),
      then corrected by the exact int64 remainder 2 num + r - 2 r n0 (|r n0| < 2^62);
    - u = (n b_j + rnd_j) >> step_j as a logical shift of the value biased by 2^62 (|n b_j| < 2^61), minus
      2^(62 - step_j); o = clip((u + beta_j + 2^(H-1)) >> H)."""
    width = int(shape[-1])
    bits = 8 * np.dtype(x_dtype).itemsize
    arrays = layer_norm_row_arrays(consts)
    if arrays is None or x_dtype not in ("int8", "int16") or width << bits >= 1 << 31:
        return None
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    chunk = cdiv(rows, num_threads)
    full, tail = width // LANES, width % LANES
    k, eps, qmin, qmax = consts.k, consts.eps_int, consts.qmin, consts.qmax
    rnd_k = (1 << k) >> 1

    def centred(q, total):
        return T.shift_right(T.Cast("int32", q) * width - total + rnd_k, k)

    def normalized(d, s, factor, r):
        """n = floor((2 (d << s) + r) / (2 r)) for r < 2^31, exactly: the float64 estimate d fl(2^s / r) + 1/2
        (three roundings, each moving it by at most 2^-22), corrected once either way."""
        n0 = T.Cast("int32", T.floor(T.Cast("float64", d) * factor + T.float64(0.5)))
        r64 = T.Cast("int64", r)
        rem = T.shift_left(T.Cast("int64", d), s) * 2 + r64 - T.Cast("int64", n0) * r64 * 2
        return T.Select(rem < T.int64(0), n0 - 1, T.Select(rem >= r64 * 2, n0 + 1, n0))

    def output(n, b, rounded, step, c, beta):
        u = T.Cast("int64", T.shift_right(T.Cast("uint64", T.Cast("int64", n) * T.Cast("int64", b) + rounded),
                                          T.Cast("uint64", step))) - c
        o = T.shift_right(u + beta, T.int64(LN_H))
        return T.Cast(out_dtype, T.max(T.min(o, T.int64(qmax)), T.int64(qmin)))

    @T.macro
    def bit_length(R, src, dst):
        """R[dst] = the bit length of R[src] >= 0: `intmath.bit_length`'s binary search (every shift below 64)."""
        R[dst] = T.int64(0)
        for s in T.unroll(6):
            if T.shift_right(R[src], R[dst] + T.shift_right(T.int64(32), T.Cast("int64", s))) != T.int64(0):
                R[dst] = R[dst] + T.shift_right(T.int64(32), T.Cast("int64", s))
        R[dst] = R[dst] + T.Cast("int64", R[src] != T.int64(0))

    @T.prim_func(private=True)
    def func(X: T.Buffer(shape, x_dtype), B: T.Buffer((width,), "int32"), RND: T.Buffer((width,), "int64"),
             STEP: T.Buffer((width,), "int64"), C: T.Buffer((width,), "int64"), BETA: T.Buffer((width,), "int64"),
             OUT: T.Buffer(shape, out_dtype)):
        T.func_attr({"tirx.noalias": True})
        XF = T.decl_buffer((rows, width), x_dtype, data=X.data)
        OF = T.decl_buffer((rows, width), out_dtype, data=OUT.data)
        for task in T.parallel(num_threads):
            D = T.alloc_buffer((width,), "int32")
            S32 = T.alloc_buffer((LANES,), "int32", scope="local")
            S64 = T.alloc_buffer((LANES,), "int64", scope="local")
            # row scalars: sum, W, bit length, half t, Newton state x, its next value, r
            R = T.alloc_buffer((8,), "int64", scope="local")
            F = T.alloc_buffer((1,), "float64", scope="local")  # 2^(t/2 + P) / r, rounded
            for i in T.serial(chunk):
                if task * chunk + i < rows:
                    row = T.meta_var(task * chunk + i)
                    for ln in T.vectorized(LANES):
                        S32[ln] = 0
                        S64[ln] = T.int64(0)
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            S32[ln] = S32[ln] + T.Cast("int32", XF[row, j * LANES + ln])
                    R[0] = T.int64(0)
                    for ln in T.serial(LANES):
                        R[0] = R[0] + T.Cast("int64", S32[ln])
                    for ln in T.serial(tail):
                        R[0] = R[0] + T.Cast("int64", XF[row, full * LANES + ln])
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            D[j * LANES + ln] = centred(XF[row, j * LANES + ln], T.Cast("int32", R[0]))
                            S64[ln] = S64[ln] + T.Cast("int64", D[j * LANES + ln]) * T.Cast("int64", D[j * LANES + ln])
                    R[1] = T.int64(eps)
                    for ln in T.serial(LANES):
                        R[1] = R[1] + S64[ln]
                    for ln in T.serial(tail):
                        D[full * LANES + ln] = centred(XF[row, full * LANES + ln], T.Cast("int32", R[0]))
                        R[1] = R[1] + T.Cast("int64", D[full * LANES + ln]) * T.Cast("int64", D[full * LANES + ln])
                    # bit_length(W), then t / 2 = (62 - L) >> 1 (intmath.bit_length, layer_norm's reference)
                    bit_length(R, 1, 2)
                    R[3] = T.shift_right(T.int64(62) - R[2], T.int64(1))
                    # isqrt(W << t): Newton from 2^ceil(L'/2) while it decreases (intmath.isqrt), then max(r, 1)
                    R[4] = T.shift_left(R[1], R[3] * 2)  # n
                    bit_length(R, 4, 5)
                    R[5] = T.shift_left(T.int64(1), T.shift_right(R[5] + 1, T.int64(1)))  # x0
                    R[6] = T.int64(1)  # still decreasing
                    for _s in T.serial(ISQRT_MAX_STEPS):
                        if R[6] != T.int64(0) and R[4] > T.int64(0):
                            R[7] = T.shift_right(R[5] + T.floordiv(R[4], R[5]), T.int64(1))
                            if R[7] < R[5]:
                                R[5] = R[7]
                            else:
                                R[6] = T.int64(0)
                    R[5] = T.max(T.Select(R[4] > T.int64(0), R[5], T.int64(0)), T.int64(1))  # r
                    F[0] = T.Cast("float64", T.shift_left(T.int64(1), R[3] + LN_P)) / T.Cast("float64", R[5])
                    for j in T.serial(full):
                        for ln in T.vectorized(LANES):
                            OF[row, j * LANES + ln] = output(
                                normalized(D[j * LANES + ln], R[3] + LN_P, F[0], T.Cast("int32", R[5])),
                                B[j * LANES + ln], RND[j * LANES + ln], STEP[j * LANES + ln], C[j * LANES + ln],
                                BETA[j * LANES + ln])
                    for ln in T.serial(tail):
                        OF[row, full * LANES + ln] = output(
                            normalized(D[full * LANES + ln], R[3] + LN_P, F[0], T.Cast("int32", R[5])),
                            B[full * LANES + ln], RND[full * LANES + ln], STEP[full * LANES + ln], C[full * LANES + ln],
                            BETA[full * LANES + ln])

    return func, arrays
