"""TE definitions of the integer IR's ops, NHWC, with the requantize epilogue fused in.

Every kernel follows the rules of `lowbit.ir.dyadic` exactly: int32
accumulation, then `(int64(acc) * b + 2^(c-1)) >> c`, saturate, cast. Each builder
returns a scheduled `PrimFunc` with parameters `(inputs..., constants..., output)`
plus the constant arrays the caller passes in that order.

The layer kernels here (`conv2d_nhwc`, `dense`) are the portable path;
`x86` (lowbit/codegen/tvm/x86) replaces them on x86 CPUs with register-blocked AVX2 kernels.
Layers that read or write int16 activations either take the portable path, which
accumulates int16 x int8 in int32 where the layer's bound allows and in int64 where
it does not (`accumulator_dtype`; the bound is in `lowbit.ir.ops._layer`), or, with
the x86 kernels, run those on the input's bytes (`int16_byte`) and combine and
requantize the int32 byte sums in int64 (`combine_requantize`; see `lower`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import te, tirx, topi
from tvm.s_tir.schedule import ScheduleError
from tvm.script import tirx as T

from ...ir.dtypes import qrange
from ...ir.dyadic import rounding_term

Expr = tvm.ir.expr.Expr


def _const(value: int | float, dtype: str) -> Expr:
    return tirx.const(value, dtype)


def requantize_expr(acc: Expr, mantissa: Expr | int, shift: Expr | int, qmin: int, qmax: int, dtype: str) -> Expr:
    """clip((int64(acc) * b + 2^(c-1)) >> c, qmin, qmax) as `dtype`; b and c are scalars or per-channel loads."""
    if isinstance(shift, int):
        rounding: Expr | int = _const(int(rounding_term(np.int64(shift))), "int64")
        shift = _const(shift, "int64")
    else:
        shift = shift.astype("int64")
        rounding = tirx.shift_right(tirx.shift_left(_const(1, "int64"), shift), _const(1, "int64"))
    mantissa = _const(mantissa, "int64") if isinstance(mantissa, int) else mantissa.astype("int64")
    scaled = tirx.shift_right(acc.astype("int64") * mantissa + rounding, shift)
    return tirx.max(tirx.min(scaled, _const(qmax, "int64")), _const(qmin, "int64")).astype(dtype)


# -- scheduling -----------------------------------------------------------------------------------

def schedule_elementwise(func: tirx.PrimFunc, vector: int = 16) -> tirx.PrimFunc:
    """Inline every intermediate stage, then run the output block parallel and vectorized."""
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:  # a reduction stays where it is
            pass
    out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    loops = sch.get_loops(out)
    if sch.get(out).reads and len(loops) > 0:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = int(sch.get(fused).extent)
        if extent >= 4 * vector:
            outer, inner = sch.split(fused, [None, vector])
            sch.parallel(outer)
            sch.vectorize(inner)
        elif extent > 1:
            sch.parallel(fused)
    return sch.mod["main"]


def schedule_reduction(sch: tvm.s_tir.Schedule, block: str = "acc") -> None:
    """Portable schedule of a window/layer reduction: padding inlined, parallel over the outer spatial
    loops (all but the last two), the epilogue computed under the same parallel loop."""
    try:
        sch.compute_inline(sch.get_sblock("pad"))
    except ScheduleError:  # no padding stage
        pass
    acc = sch.get_sblock(block)
    try:
        epilogue = sch.get_sblock("requantize")
    except ScheduleError:
        epilogue = None
    spatial = sum(int(iv.iter_type) == 0 for iv in sch.get(acc).iter_vars)  # 0: data-parallel
    loops = sch.get_loops(acc)
    sch.parallel(sch.fuse(*loops[: max(1, spatial - 2)]))
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, sch.get_loops(acc)[0])


def _schedule_reduction(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    schedule_reduction(sch)
    return sch.mod["main"]


# -- layers: portable path ------------------------------------------------------------------------

def accumulator_dtype(weight: np.ndarray, bias: np.ndarray, x_dtype: str) -> str:
    """int32 where no input of `x_dtype` can take bias + sum x * w (the layer's real weights) past int32, else
    int64 (only int16 inputs: 8-bit ones stay below 2^31 for any reduction under 66000)."""
    from .x86.requant import acc_bound  # no TVM there

    return "int32" if int(acc_bound(weight, bias, x_dtype).max(initial=0)) < 2**31 else "int64"


def _epilogue(acc: te.Tensor, bias: te.Tensor, mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int,
              qmax: int, out_dtype: str) -> tuple[te.Tensor, list[te.Tensor], list[np.ndarray]]:
    """acc + bias (in the accumulator's type), then requantized per output channel (the last axis), or cast to
    `out_dtype` (int32 or int64) without a mantissa."""
    if mantissa is None:
        return te.compute(acc.shape, lambda *i: (acc(*i) + bias[i[-1]].astype(acc.dtype)).astype(out_dtype),
                          name="requantize"), [], []
    channels = acc.shape[-1]
    m = te.placeholder((channels,), "int32", name="mantissa")
    c = te.placeholder((channels,), "int32", name="shift")
    out = te.compute(acc.shape, lambda *i: requantize_expr(acc(*i) + bias[i[-1]].astype(acc.dtype), m[i[-1]],
                                                           c[i[-1]], qmin, qmax, out_dtype), name="requantize")
    return out, [m, c], [mantissa.astype(np.int32), shift.astype(np.int32)]


def conv2d_nhwc(x_shape: tuple[int, int, int, int], x_dtype: str, weight: np.ndarray, stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, bias: np.ndarray,
                mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
                weight_bits: int, schedule: bool = True) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    """Grouped conv of int8/uint8/int16 NHWC activations, weights [OC, IC/groups, KH, KW] as int8, epilogue fused.

    `schedule=False` returns the plain loop nest, for MetaSchedule to tune.
    """
    n, h, w, cin = x_shape
    cout, cin_g, kh, kw = weight.shape
    top, left, bottom, right = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cout_g = cout // groups
    acc_dtype = accumulator_dtype(weight, bias, x_dtype)
    x = te.placeholder(x_shape, x_dtype, name="x")
    wt = te.placeholder((kh, kw, cin_g, cout), "int8", name="w")  # HWIO: output channels innermost
    b = te.placeholder((cout,), "int32", name="bias")
    padded = topi.nn.pad(x, [0, top, left, 0], [0, bottom, right, 0], name="pad")
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, cin_g), "rc")
    acc = te.compute(
        (n, oh, ow, cout),
        lambda i, y, z, o: te.sum(
            padded[i, y * stride[0] + rh * dilation[0], z * stride[1] + rw * dilation[1], (o // cout_g) * cin_g + rc]
            .astype(acc_dtype) * wt[rh, rw, rc, o].astype(acc_dtype), axis=[rh, rw, rc]),
        name="acc")
    out, requant_args, requant_arrays = _epilogue(acc, b, mantissa, shift, qmin, qmax, out_dtype)
    func = te.create_prim_func([x, wt, b, *requant_args, out])
    arrays = [np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).astype(np.int8), bias.astype(np.int32)]
    return (_schedule_reduction(func) if schedule else func), arrays + requant_arrays


def dense(x_shape: tuple[int, int], x_dtype: str, weight: np.ndarray, bias: np.ndarray,
          mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
          weight_bits: int, schedule: bool = True) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    """Matmul x @ W^T + bias of int8/uint8/int16 x, weights [OUT, IN], epilogue fused (`schedule=False`: the plain
    loop nest)."""
    n, k = x_shape
    acc_dtype = accumulator_dtype(weight, bias, x_dtype)
    cout = weight.shape[0]
    x = te.placeholder(x_shape, x_dtype, name="x")
    wt = te.placeholder((k, cout), "int8", name="w")
    b = te.placeholder((cout,), "int32", name="bias")
    r = te.reduce_axis((0, k), "r")
    acc = te.compute((n, cout), lambda i, o: te.sum(x[i, r].astype(acc_dtype) * wt[r, o].astype(acc_dtype), axis=r),
                     name="acc")
    out, requant_args, requant_arrays = _epilogue(acc, b, mantissa, shift, qmin, qmax, out_dtype)
    func = te.create_prim_func([x, wt, b, *requant_args, out])
    arrays = [np.ascontiguousarray(weight.T).astype(np.int8), bias.astype(np.int32)]
    return (_schedule_reduction(func) if schedule else func), arrays + requant_arrays


# -- int16 activations on byte kernels ---------------------------------------------------------------

def int16_byte(numel: int, high: bool) -> tirx.PrimFunc:
    """One byte of int16 x taken flat: the high byte h = x >> 8 (arithmetic: in [-128, 127], int8) or the low
    byte l = x & 255 (uint8), so that x = 256 * h + l, and x = 0 gives h = l = 0 (zero padding stays exact)."""
    x = te.placeholder((numel,), "int16", name="x")
    if high:
        out = te.compute((numel,), lambda i: tirx.shift_right(x[i], _const(8, "int16")).astype("int8"), name="high")
    else:
        out = te.compute((numel,), lambda i: tirx.bitwise_and(x[i], _const(255, "int16")).astype("uint8"),
                         name="low")
    return schedule_elementwise(te.create_prim_func([x, out]))


def combine_requantize(shape: tuple[int, ...], parts: int, qmin: int, qmax: int,
                       out_dtype: str) -> tirx.PrimFunc:
    """requantize(256 * high + low + bias[c]) per channel c (the last axis), in int64, from the int32 byte
    accumulators of an int16 input (`parts` 2), or requantize(acc + bias[c]) from one (`parts` 1). Parameters:
    (accumulators..., bias int64, mantissa int32, shift int32, out)."""
    accs = [te.placeholder(shape, "int32", name=f"acc{k}") for k in range(parts)]
    channels = shape[-1]
    bias = te.placeholder((channels,), "int64", name="bias")
    m = te.placeholder((channels,), "int32", name="mantissa")
    c = te.placeholder((channels,), "int32", name="shift")

    def total(*i: Expr) -> Expr:
        if parts == 1:
            return accs[0](*i).astype("int64") + bias[i[-1]]
        return accs[0](*i).astype("int64") * _const(256, "int64") + accs[1](*i).astype("int64") + bias[i[-1]]

    out = te.compute(shape, lambda *i: requantize_expr(total(*i), m[i[-1]], c[i[-1]], qmin, qmax, out_dtype),
                     name="requantize")
    return schedule_elementwise(te.create_prim_func([*accs, bias, m, c, out]))


# -- the other ops ---------------------------------------------------------------------------------

def quantize_nchw_to_nhwc(shape: tuple[int, ...], scale: float, zero_point: int, dtype: str,
                          to_nhwc: bool) -> tirx.PrimFunc:
    """float32 -> int as ONNX QuantizeLinear (x / scale, round half to even, saturate); 4-D goes NCHW -> NHWC."""
    lo, hi = qrange(dtype)

    def q(v: Expr, lanes: int = 1) -> Expr:
        def const(c: float) -> Expr:
            return _const(c, "float32") if lanes == 1 else tirx.Broadcast(_const(c, "float32"), lanes)

        v = tirx.nearbyint(v / const(scale)) + const(float(zero_point))
        return tirx.max(tirx.min(v, const(hi)), const(lo)).astype(dtype if lanes == 1 else f"{dtype}x{lanes}")

    if to_nhwc and shape[1] <= _INTERLEAVE_MAX_CHANNELS and shape[3] >= _QUANTIZE_VECTOR:
        return _quantize_interleaved(shape, q, dtype)
    x = te.placeholder(shape, "float32", name="x")
    if to_nhwc:
        n, c, h, w = shape
        out = te.compute((n, h, w, c), lambda i, y, z, ch: q(x[i, ch, y, z]), name="quantize")
    else:
        out = te.compute(shape, lambda *i: q(x(*i)), name="quantize")
    return schedule_elementwise(te.create_prim_func([x, out]))


_QUANTIZE_VECTOR = 16  # pixels per step
_INTERLEAVE_MAX_CHANNELS = 4  # images: the channel vectors are interleaved with one shuffle


def _quantize_interleaved(shape: tuple[int, ...], q: Callable[[Expr, int], Expr], dtype: str) -> tirx.PrimFunc:
    """NCHW float -> NHWC int for few channels: each channel's 16 pixels are read and quantized as one
    vector, and the channel vectors are interleaved into 16 NHWC pixels with one shuffle (a TE schedule
    would vectorize the strided stores one byte at a time)."""
    n, c, h, w = shape
    vec = _QUANTIZE_VECTOR
    blocks = w // vec
    interleave = [ch * vec + i for i in range(vec) for ch in range(c)]

    def pixels(x: tirx.Buffer, image: Expr, row: Expr, col: Expr) -> Expr:
        return tirx.Shuffle([q(x[image, ch, row, tirx.Ramp(col, 1, vec)], vec) for ch in range(c)], interleave)

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((n, c, h, w), "float32"), out: T.Buffer((n, h, w, c), dtype)):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # Relax's reshape analysis expects a root block
            flat = T.decl_buffer((n * h * w * c,), dtype, data=out.data)
            for nh in T.parallel(n * h):
                for b in T.serial(blocks):
                    flat[T.ramp((nh * w + b * vec) * c, 1, vec * c)] = pixels(x, nh // h, nh % h, b * vec)
                for col in T.serial(w - blocks * vec):
                    for ch in T.serial(c):
                        out[nh // h, nh % h, blocks * vec + col, ch] = q(x[nh // h, ch, nh % h, blocks * vec + col])

    return func


def dequantize(shape: tuple[int, ...], dtype: str, scale: float | list[float], zero_point: int,
               axis: int | None, from_nhwc: bool) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    """int -> float32: (q - zero_point) * scale, per tensor or per channel; NHWC input returns NCHW."""
    out_shape = shape
    if from_nhwc:
        n, h, w, c = shape
        out_shape = (n, c, h, w)
    q = te.placeholder(shape, dtype, name="q")

    def load(*i: Expr) -> Expr:
        return q(i[0], i[2], i[3], i[1]) if from_nhwc else q(*i)

    args, arrays = [q], []
    if axis is None:
        s = _const(float(np.float32(scale)), "float32")
        out = te.compute(out_shape, lambda *i: (load(*i).astype("float32") - _const(zero_point, "float32")) * s,
                         name="dequantize")
    else:
        per_channel = te.placeholder((out_shape[axis],), "float32", name="scale")
        args.append(per_channel)
        arrays.append(np.asarray(scale, dtype=np.float32))
        out = te.compute(out_shape, lambda *i: (load(*i).astype("float32") - _const(zero_point, "float32"))
                         * per_channel[i[axis]], name="dequantize")
    return schedule_elementwise(te.create_prim_func([*args, out])), arrays


def add(numel: int, dtypes: tuple[str, str], mantissas: tuple[int, int], shift: int, qmin: int, qmax: int,
        out_dtype: str, channels: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """Rescaled add of two tensors taken flat (`numel` elements): contiguous vector loads, whatever the shape.

    `channels` = (k, C): input k's mantissa is a vector over the last axis (C channels, element i's channel is
    i % C), read from a third argument; `mantissas[k]` is then unused."""
    a = te.placeholder((numel,), dtypes[0], name="a")
    b = te.placeholder((numel,), dtypes[1], name="b")
    m = [_const(int(x), "int64") for x in mantissas]
    args = [a, b]
    per_channel = None
    if channels is not None:
        per_channel = te.placeholder((channels[1],), "int64", name="channel_mantissa")
        args.append(per_channel)

    def mantissa(k: int, i: Expr) -> Expr:
        if channels is not None and channels[0] == k:
            return per_channel[tirx.floormod(i, channels[1])]
        return m[k]

    out = te.compute((numel,), lambda i: requantize_expr(a[i].astype("int64") * mantissa(0, i)
                                                         + b[i].astype("int64") * mantissa(1, i),
                                                         1, shift, qmin, qmax, out_dtype), name="add")
    return schedule_elementwise(te.create_prim_func([*args, out]))


def concat(shapes: list[tuple[int, ...]], dtypes: list[str], axis: int, mantissas: list[int], shifts: list[int],
           qmin: int, qmax: int, out_dtype: str) -> tirx.PrimFunc:
    """Each input requantized to the output scale, then joined along `axis`."""
    inputs = [te.placeholder(s, d, name=f"x{i}") for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))]

    def requantized(k: int) -> te.Tensor:
        x, m, c = inputs[k], mantissas[k], shifts[k]
        return te.compute(shapes[k], lambda *i: requantize_expr(x(*i), m, c, qmin, qmax, out_dtype),
                          name=f"requantize{k}")

    parts = [requantized(k) for k in range(len(inputs))]
    out = topi.concatenate(parts, axis)
    return schedule_elementwise(te.create_prim_func([*inputs, out]))


def avgpool_nhwc(shape: tuple[int, int, int, int], dtype: str, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], out_hw: tuple[int, int], mantissa: int, shift: int, qmin: int, qmax: int,
                 out_dtype: str) -> tirx.PrimFunc:
    """Integer window sum (zero padding counts) and a dyadic divide."""
    n, _, _, c = shape
    if max(abs(v) for v in qrange(dtype)) * kernel[0] * kernel[1] >= 2**31:
        raise ValueError(f"avgpool window {kernel} of {dtype} can overflow its int32 sums")
    x = te.placeholder(shape, dtype, name="x")
    padded = topi.nn.pad(x, [0, padding[0], padding[1], 0], name="pad")
    rh, rw = te.reduce_axis((0, kernel[0]), "rh"), te.reduce_axis((0, kernel[1]), "rw")
    sums = te.compute((n, *out_hw, c), lambda i, y, z, ch: te.sum(
        padded[i, y * stride[0] + rh, z * stride[1] + rw, ch].astype("int32"), axis=[rh, rw]), name="acc")
    out = te.compute(sums.shape, lambda *i: requantize_expr(sums(*i), mantissa, shift, qmin, qmax, out_dtype),
                     name="requantize")
    return _schedule_reduction(te.create_prim_func([x, out]))


def maxpool_nhwc(shape: tuple[int, int, int, int], dtype: str, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int]) -> tirx.PrimFunc:
    """Max over the window's positions inside the input (padding never wins, as in torch)."""
    n, h, w, c = shape
    x = te.placeholder(shape, dtype, name="x")
    rh, rw = te.reduce_axis((0, kernel[0]), "rh"), te.reduce_axis((0, kernel[1]), "rw")

    def at(i: Expr, y: Expr, z: Expr, ch: Expr) -> Expr:
        hy = y * stride[0] - padding[0] + rh * dilation[0]
        wz = z * stride[1] - padding[1] + rw * dilation[1]
        inside = tirx.all(hy >= 0, hy < h, wz >= 0, wz < w)
        return te.max(x[i, tirx.max(tirx.min(hy, h - 1), 0), tirx.max(tirx.min(wz, w - 1), 0), ch],
                      axis=[rh, rw], where=inside)

    out = te.compute((n, *out_hw, c), at, name="acc")
    return _schedule_reduction(te.create_prim_func([x, out]))


def clamp(numel: int, dtype: str, qmin: int, qmax: int) -> tirx.PrimFunc:
    """Saturate a tensor taken flat (`numel` elements) to [qmin, qmax]."""
    x = te.placeholder((numel,), dtype, name="x")
    out = te.compute((numel,), lambda i: tirx.max(tirx.min(x[i], _const(qmax, dtype)), _const(qmin, dtype)),
                     name="clamp")
    return schedule_elementwise(te.create_prim_func([x, out]))


def lut(numel: int, dtype: str, table_size: int, offset: int, out_dtype: str, channels: int = 0) -> tirx.PrimFunc:
    """Table lookup on a tensor taken flat: out[i] = table[x[i] + offset] (the table is the kernel's constant).
    With `channels` = C, the table holds C tables of table_size / C entries, one per channel of the last axis
    (element i's is channel i % C)."""
    x = te.placeholder((numel,), dtype, name="x")
    table = te.placeholder((table_size,), out_dtype, name="table")
    if channels:
        row = table_size // channels
        out = te.compute((numel,), lambda i: table[x[i].astype("int32") + offset
                                                   + tirx.floormod(i, channels).astype("int32") * row], name="lut")
    else:
        out = te.compute((numel,), lambda i: table[x[i].astype("int32") + offset], name="lut")
    return schedule_elementwise(te.create_prim_func([x, table, out]))


def pad_nhwc(shape: tuple[int, int, int, int], dtype: str, pads: tuple[int, int, int, int]) -> tirx.PrimFunc:
    """Zero padding (the zero point); `pads` is (left, right, top, bottom) as in the IR."""
    left, right, top, bottom = pads
    x = te.placeholder(shape, dtype, name="x")
    out = topi.nn.pad(x, [0, top, left, 0], [0, bottom, right, 0], name="padded")
    return schedule_elementwise(te.create_prim_func([x, out]))


def to_nchw(shape: tuple[int, int, int, int], dtype: str) -> tirx.PrimFunc:
    """NHWC -> NCHW, for the ops whose meaning depends on the IR's NCHW memory order (reshape)."""
    x = te.placeholder(shape, dtype, name="x")
    out = topi.transpose(x, (0, 3, 1, 2))
    return schedule_elementwise(te.create_prim_func([x, out]))
