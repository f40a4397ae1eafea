"""Lower lowbit's integer IR to a Relax module, one converter per op.

The module's `main` takes the graph input(s) (float32, or int64 token ids and masks)
and then one parameter per constant (pre-packed weights, bias, requantize mantissas
and shifts) and returns the float output(s), computing exactly what `model.int.onnx`
computes. Integer 4-D tensors made by convs and quantize live in NHWC between ops
(channels innermost is what the vector kernels want); the IR's NCHW order only comes
back for reshape and the outputs. A reshape to 4-D (an encoder's attention heads)
keeps the IR's order, as do the encoder's ops (`encoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from ...errors import LowbitError
from ...ir import Op, QuantizedGraph
from ...ir.ops import _layer as layer_op
from ...ir.ops import add as add_op
from ...ir.ops import check_backend
from ...ir.ops import lut as lut_op
from . import kernels
from .fusions import dense_fusions, permute_folds, residual_adds
from .kernel_api import ConvKernel, DenseKernel, Lut, Residual


@dataclass
class Lowered:
    """A Relax module and the constants its `main` takes after the inputs, in order."""

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    integer_outputs: list[str] = field(default_factory=list)  # returned after `outputs`


@dataclass
class _Context:
    qgraph: QuantizedGraph
    bb: relax.BlockBuilder
    conv2d: ConvKernel
    dense: DenseKernel
    residual_adds: dict[str, tuple[Op, int]] = field(default_factory=dict)  # conv -> (add, input index of y)
    encoder_threads: int = 0  # > 0: lowbit's x86 encoder kernels (`encoder`) with that many parallel tasks
    fused: set[str] = field(default_factory=set)  # adds computed inside their conv's kernel
    dense_fusions: dict[str, Op] = field(default_factory=dict)  # linear -> the add or lut fused into it
    # matmul -> {0 / 1: the permute its input comes from, "out": the permute of its output}, folded into it
    matmul_views: dict[str, dict[int | str, Op]] = field(default_factory=dict)
    env: dict[str, relax.Expr] = field(default_factory=dict)
    nhwc: set[str] = field(default_factory=set)  # 4-D values held as NHWC
    nchw: dict[str, relax.Expr] = field(default_factory=dict)  # NHWC values converted back, for their NCHW readers
    params: list[relax.Var] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    kernels: dict[tvm_ffi.StructuralKey, relax.GlobalVar] = field(default_factory=dict)  # one per distinct PrimFunc

    def shape(self, value: str) -> tuple[int, ...]:
        """The shape as held in the Relax module (NHWC for 4-D integer values)."""
        shape = tuple(self.qgraph.values[value].shape)
        return (shape[0], shape[2], shape[3], shape[1]) if value in self.nhwc else shape

    def dtype(self, value: str) -> str:
        return self.qgraph.values[value].dtype

    def call(self, op: Op, func: tirx.PrimFunc, args: list[relax.Expr], arrays: list[np.ndarray],
             out_shape: tuple[int, ...], out_dtype: str) -> relax.Expr:
        """Add `func` to the module and call it on `args` plus `arrays` (as new parameters of main)."""
        # Layers repeat the same kernels (weights are parameters; the x86 templates are cached per plan):
        # compile each distinct one once.
        key = tvm_ffi.StructuralKey(func.without_attr("global_symbol"))
        gv = self.kernels.get(key)
        if gv is None:
            gv = self.kernels[key] = self.bb.add_func(func.with_attr("global_symbol", _symbol(op.name)),
                                                      _symbol(op.name))
        consts = []
        for i, array in enumerate(arrays):
            name = f"{op.name}::{i}"
            var = relax.Var(_symbol(name), relax.TensorType(array.shape, str(array.dtype)))
            self.params.append(var)
            self.arrays[name] = np.ascontiguousarray(array)
            consts.append(var)
        return self.bb.emit(relax.call_tir(gv, [*args, *consts], relax.TensorType(out_shape, out_dtype)),
                            name_hint=_symbol(op.output))

    def call_flat(self, op: Op, func: tirx.PrimFunc, args: list[relax.Expr],
                  arrays: list[np.ndarray] | None = None) -> relax.Expr:
        """Call an elementwise `func` on `args` taken flat (reshapes are views) and give the result its shape."""
        numel = int(np.prod(self.shape(op.output)))
        flat = [self.bb.emit(relax.op.reshape(arg, (numel,))) for arg in args]
        out = self.call(op, func, flat, arrays or [], (numel,), self.dtype(op.output))
        return self.bb.emit(relax.op.reshape(out, self.shape(op.output)), name_hint=_symbol(op.output))

    def arg(self, op: Op, index: int = 0, nhwc: bool = True) -> relax.Expr:
        """Input `index` of `op`, converted to NHWC (or from it, with `nhwc=False`) if its layout differs."""
        value = op.inputs[index]
        if len(self.qgraph.values[value].shape) != 4 or (value in self.nhwc) == nhwc:
            return self.env[value]
        shape = tuple(self.qgraph.values[value].shape)
        if nhwc:
            raise LowbitError(f"op {op.name}: input {value} is NCHW where NHWC is expected; the TVM backend "
                              "cannot convert it back (report this model)")
        if value not in self.nchw:  # converted once, however many ops (or inputs of one op) read it
            func = kernels.to_nchw(self.shape(value), self.dtype(value))
            fake = Op(f"{value}_to_nchw", "layout", [value], f"{value}_nchw")
            self.nchw[value] = self.call(fake, func, [self.env[value]], [], shape, self.dtype(value))
        return self.nchw[value]


def _symbol(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


Converter = Callable[[_Context, Op], relax.Expr]
CONVERTERS: dict[str, Converter] = {}


def converter(*ops: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = fn
        return fn
    return register


def layer_kernel(op: Op, x_shape: tuple[int, ...], x_dtype: str, out_dtype: str, conv2d: ConvKernel,
                 dense: DenseKernel,
                 residual: Residual | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
    """The fused kernel (accumulate, bias, requantize) of one conv/linear op; `x_shape` is NHWC for a conv.

    With `residual` (a conv only; `out_dtype` is then the add's), the kernel also computes that add, or is None
    where `conv2d` cannot fuse it. Only the portable kernels take int16 inputs (`_layer` sends them to the others
    byte by byte, and int16 outputs too unless `_int16_output_fits`)."""
    a, arr = op.attrs, op.arrays
    common = dict(bias=arr["bias"], mantissa=arr.get("multiplier"), shift=arr.get("shift"), qmin=a.get("qmin", 0),
                  qmax=a.get("qmax", 0), out_dtype=out_dtype, weight_bits=int(a["weight_bits"]))
    if op.op == "linear":
        return dense(x_shape, x_dtype, arr["weight"], **common)
    if residual is not None:
        common["residual"] = residual
    ph, pw = a["padding"]
    return conv2d(x_shape, x_dtype, arr["weight"], stride=tuple(a["stride"]), padding=(ph, pw, ph, pw),
                  dilation=tuple(a["dilation"]), groups=int(a["groups"]), **common)


def kernel_shape(op_kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An IR layer input's or output's shape as its kernel takes it: NHWC for a conv, rows [N, K] for a linear
    (the dense kernels take 2-D rows: a linear on [..., K], an encoder's [B, S, H], runs on its B * S rows)."""
    if len(shape) == 4 and op_kind == "conv":
        return (shape[0], shape[2], shape[3], shape[1])
    if op_kind == "linear" and len(shape) > 2:
        return (int(np.prod(shape[:-1])), shape[-1])
    return shape


@converter("conv", "linear")
def _layer(ctx: _Context, op: Op) -> relax.Expr:
    if op.op == "conv":
        ctx.nhwc.add(op.output)
    x_shape, out_shape = ctx.shape(op.inputs[0]), ctx.shape(op.output)
    if op.op == "linear" and len(x_shape) > 2:
        x = ctx.bb.emit(relax.op.reshape(ctx.arg(op), kernel_shape("linear", x_shape)))
        x_shape, rows_shape = kernel_shape("linear", x_shape), kernel_shape("linear", out_shape)
        fused = _dense_fused(ctx, op, x, x_shape, rows_shape) if op.name in ctx.dense_fusions else None
        if fused is not None:
            return fused
        y = _layer_2d(ctx, op, x, x_shape, rows_shape)
        return ctx.bb.emit(relax.op.reshape(y, out_shape), name_hint=_symbol(op.output))
    if op.op == "linear" and op.name in ctx.dense_fusions:
        fused = _dense_fused(ctx, op, ctx.arg(op), x_shape, out_shape)
        if fused is not None:
            return fused
    return _layer_2d(ctx, op, None, x_shape, out_shape)


def _dense_fused(ctx: _Context, op: Op, x: relax.Expr, x_shape: tuple[int, ...],
                 out_shape: tuple[int, ...]) -> relax.Expr | None:
    """One x86 dense kernel for linear `op` (on rows `x`) and the add or lut reading its output
    (`dense_fusions`); None where it cannot fuse (an int16 input, an int16 output `_int16_output_fits` refuses,
    or the kernel's own bounds). Returns the fused op's result, bound to its output (the linear's own output
    has no other reader)."""
    then = ctx.dense_fusions[op.name]
    x_dtype, y_dtype = ctx.dtype(op.inputs[0]), ctx.dtype(op.output)
    if x_dtype == "int16" or (y_dtype == "int16" and not _int16_output_fits(ctx, op)):
        return None
    a, arr = op.attrs, op.arrays
    common = dict(bias=arr["bias"], mantissa=arr["multiplier"], shift=arr["shift"], qmin=a["qmin"], qmax=a["qmax"],
                  out_dtype=y_dtype, weight_bits=int(a["weight_bits"]))
    if then.op == "lut":
        lut_op.check_channels(then, ctx.qgraph)
        table = then.arrays["table"].astype(ctx.dtype(then.output))
        row = table.shape[1] if lut_op.channels(then) else 0
        lut = Lut(lut_op.index_offset(then, ctx.qgraph), row, table.size, ctx.dtype(then.output))
        kernel = ctx.dense(x_shape, x_dtype, arr["weight"], lut=(lut, table), **common)
        args = [x]
    else:
        add_op.check_channels(then, ctx.qgraph)
        k = then.inputs.index(op.output)
        skip = then.inputs[1 - k]
        if skip in ctx.nhwc:
            return None
        m = [tuple(int(v) for v in mi) if np.ndim(mi) else int(mi) for mi in add_op.input_multipliers(then)]
        rq = add_op.requantizer(then, ctx.qgraph)
        residual = Residual(ctx.dtype(skip), m[k], m[1 - k], int(rq.shift[0]), rq.qmin, rq.qmax)
        kernel = ctx.dense(x_shape, x_dtype, arr["weight"], residual=residual,
                           **{**common, "out_dtype": ctx.dtype(then.output)})
        args = [x, ctx.bb.emit(relax.op.reshape(ctx.env[skip], out_shape))]
    if kernel is None:
        return None
    func, arrays = kernel
    ctx.fused.add(then.name)
    out = ctx.call(op, func, args, arrays, out_shape, ctx.dtype(then.output))
    out = ctx.bb.emit(relax.op.reshape(out, ctx.shape(then.output)), name_hint=_symbol(then.output))
    ctx.env[then.output] = out
    return out


def _layer_2d(ctx: _Context, op: Op, x: relax.Expr | None, x_shape: tuple[int, ...],
              out_shape: tuple[int, ...]) -> relax.Expr:
    """The layer on `x` (default: its input as held) of `x_shape` (NHWC for a conv, [N, K] for a linear)."""
    if "int16" in (ctx.dtype(op.inputs[0]), ctx.dtype(op.output)) and ctx.conv2d is not kernels.conv2d_nhwc \
            and not _int16_output_fits(ctx, op):
        return _layer_by_bytes(ctx, op, ctx.arg(op) if x is None else x, x_shape, out_shape)  # bytes on x86
    if op.op == "conv":
        if op.name in ctx.residual_adds:
            fused = _conv_with_residual(ctx, op, *ctx.residual_adds[op.name])
            if fused is not None:
                return fused
    func, arrays = layer_kernel(op, x_shape, ctx.dtype(op.inputs[0]), ctx.dtype(op.output), ctx.conv2d, ctx.dense)
    return ctx.call(op, func, [ctx.arg(op) if x is None else x], arrays, out_shape, ctx.dtype(op.output))


def _int16_output_fits(ctx: _Context, op: Op) -> bool:
    """Whether the x86 dense kernel can write an 8-bit input linear's int16 output itself: its int32 accumulator
    (bias included) cannot wrap for any input (`x86.acc_bound`) and its mantissas are below 2^30 (the
    epilogue's int32 x int32 products). Else `_layer_by_bytes` requantizes the accumulator in int64."""
    from . import x86

    x_dtype = ctx.dtype(op.inputs[0])
    if op.op != "linear" or x_dtype == "int16" or "multiplier" not in op.arrays:
        return False
    bound = x86.acc_bound(op.arrays["weight"], op.arrays["bias"], x_dtype)
    return int(bound.max(initial=0)) < 1 << 31 and int(op.arrays["multiplier"].max(initial=0)) < 1 << 30


def _layer_by_bytes(ctx: _Context, op: Op, x_expr: relax.Expr, x_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> relax.Expr:
    """A layer reading int16, or writing int16 where `_int16_output_fits` fails, on the 8-bit layer kernels (x86:
    u8/s8 bytes into int32).

    An int16 input x = 256 * h + l is split into its high byte h (int8) and low byte l (uint8); the kernel runs
    on each without bias or requantizer, giving int32 sums W . h and W . l (each at most K * 255 * 127 < 2^31),
    and one elementwise kernel requantizes 256 * (W . h) + W . l + bias in int64: exact for every K (the bound is
    in `lowbit.ir.ops._layer`). An 8-bit input writing int16 runs the kernel once, then the same requantizer.
    Cost: two GEMM passes plus two elementwise ones for an int16 input, one extra pass for an int16 output."""
    x = op.inputs[0]
    rq = layer_op.requantizer(op, ctx.qgraph)  # an int16 input or output always has one
    if ctx.dtype(x) == "int16":
        numel = int(np.prod(x_shape))
        flat = ctx.bb.emit(relax.op.reshape(x_expr, (numel,)))
        parts = []
        for part, dtype in (("high", "int8"), ("low", "uint8")):
            fake = Op(f"{op.name}_{part}_byte", "split", [x], f"{x}_{part}")
            byte = ctx.call(fake, kernels.int16_byte(numel, part == "high"), [flat], [], (numel,), dtype)
            parts.append((part, dtype, ctx.bb.emit(relax.op.reshape(byte, x_shape))))
    else:
        parts = [("acc", ctx.dtype(x), x_expr)]
    no_bias = {"weight": op.arrays["weight"], "bias": np.zeros_like(op.arrays["bias"])}
    accs = []
    for part, dtype, arg in parts:
        fake = Op(f"{op.name}_{part}", op.op, [x], f"{op.output}_{part}", op.attrs, no_bias)
        func, arrays = layer_kernel(fake, x_shape, dtype, "int32", ctx.conv2d, ctx.dense)
        accs.append(ctx.call(fake, func, [arg], arrays, out_shape, "int32"))
    func = kernels.combine_requantize(out_shape, len(accs), rq.qmin, rq.qmax, rq.dtype)
    arrays = [op.arrays["bias"].astype(np.int64), rq.mantissa.astype(np.int32), rq.shift.astype(np.int32)]
    return ctx.call(op, func, accs, arrays, out_shape, rq.dtype)


def _conv_with_residual(ctx: _Context, conv: Op, add: Op, k: int) -> relax.Expr | None:
    """One kernel for `conv` and the `add` of its output (input k) and a skip tensor; None if it cannot fuse.

    Returns the add's result, bound to the add's output (the conv's own output has no other reader)."""
    skip = add.inputs[1 - k]
    if skip not in ctx.nhwc or "int16" in {ctx.dtype(v) for v in (conv.inputs[0], conv.output, skip, add.output)}:
        return None  # the fused epilogue is 8-bit only; int16 layers run byte by byte (`_layer_by_bytes`)
    m = add_op.input_mantissas(add)
    rq = add_op.requantizer(add, ctx.qgraph)
    residual = Residual(ctx.dtype(skip), m[k], m[1 - k], int(rq.shift[0]), rq.qmin, rq.qmax)
    kernel = layer_kernel(conv, ctx.shape(conv.inputs[0]), ctx.dtype(conv.inputs[0]), ctx.dtype(add.output),
                          ctx.conv2d, ctx.dense, residual)
    if kernel is None:
        return None
    func, arrays = kernel
    ctx.nhwc.add(add.output)
    ctx.fused.add(add.name)
    out = ctx.call(conv, func, [ctx.arg(conv), ctx.arg(add, 1 - k)], arrays, ctx.shape(add.output),
                   ctx.dtype(add.output))
    ctx.env[add.output] = out
    return out


def _same_layout(ctx: _Context, op: Op) -> None:
    if len(ctx.qgraph.values[op.output].shape) == 4:
        ctx.nhwc.add(op.output)


@converter("add")
def _add(ctx: _Context, op: Op) -> relax.Expr:
    _same_layout(ctx, op)
    rq = add_op.requantizer(op, ctx.qgraph)
    k = add_op.channel_input(op)
    numel, dtypes = int(np.prod(ctx.shape(op.output))), (ctx.dtype(op.inputs[0]), ctx.dtype(op.inputs[1]))
    if k is None:
        m = add_op.input_mantissas(op)
        func = kernels.add(numel, dtypes, (m[0], m[1]), int(rq.shift[0]), rq.qmin, rq.qmax, rq.dtype)
        return ctx.call_flat(op, func, [ctx.arg(op, 0), ctx.arg(op, 1)])
    _last_axis_channels(ctx, op)
    add_op.check_channels(op, ctx.qgraph)
    m = add_op.input_multipliers(op)
    func = kernels.add(numel, dtypes, (int(m[1 - k]), int(m[1 - k])), int(rq.shift[0]), rq.qmin, rq.qmax,
                       rq.dtype, (k, len(m[k])))
    return ctx.call_flat(op, func, [ctx.arg(op, 0), ctx.arg(op, 1)], [m[k]])


@converter("concat")
def _concat(ctx: _Context, op: Op) -> relax.Expr:
    _same_layout(ctx, op)
    axis = op.attrs["axis"] % len(ctx.qgraph.values[op.output].shape)
    if op.output in ctx.nhwc:
        axis = {0: 0, 1: 3, 2: 1, 3: 2}[axis]
    func = kernels.concat([ctx.shape(v) for v in op.inputs], [ctx.dtype(v) for v in op.inputs], axis,
                          [int(v) for v in op.arrays["multiplier"]], [int(v) for v in op.arrays["shift"]],
                          op.attrs["qmin"], op.attrs["qmax"], ctx.dtype(op.output))
    args = [ctx.arg(op, i) for i in range(len(op.inputs))]
    return ctx.call(op, func, args, [], ctx.shape(op.output), ctx.dtype(op.output))


@converter("avgpool")
def _avgpool(ctx: _Context, op: Op) -> relax.Expr:
    a = op.attrs
    _same_layout(ctx, op)
    out_shape = ctx.shape(op.output)
    func = kernels.avgpool_nhwc(ctx.shape(op.inputs[0]), ctx.dtype(op.inputs[0]), tuple(a["kernel"]),
                                tuple(a["stride"]), tuple(a["padding"]), out_shape[1:3],
                                int(op.arrays["multiplier"][0]), int(op.arrays["shift"][0]), a["qmin"], a["qmax"],
                                ctx.dtype(op.output))
    return ctx.call(op, func, [ctx.arg(op)], [], out_shape, ctx.dtype(op.output))


@converter("maxpool")
def _maxpool(ctx: _Context, op: Op) -> relax.Expr:
    a = op.attrs
    _same_layout(ctx, op)
    out_shape = ctx.shape(op.output)
    func = kernels.maxpool_nhwc(ctx.shape(op.inputs[0]), ctx.dtype(op.inputs[0]), tuple(a["kernel"]),
                                tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), out_shape[1:3])
    return ctx.call(op, func, [ctx.arg(op)], [], out_shape, ctx.dtype(op.output))


@converter("clamp")
def _clamp(ctx: _Context, op: Op) -> relax.Expr:
    if op.inputs[0] in ctx.nhwc:
        ctx.nhwc.add(op.output)
    func = kernels.clamp(int(np.prod(ctx.shape(op.output))), ctx.dtype(op.inputs[0]), op.attrs["qmin"],
                         op.attrs["qmax"])
    return ctx.call_flat(op, func, [ctx.env[op.inputs[0]]])


@converter("lut")
def _lut(ctx: _Context, op: Op) -> relax.Expr:
    if op.inputs[0] in ctx.nhwc:
        ctx.nhwc.add(op.output)
    table = op.arrays["table"]
    if lut_op.channels(op):
        _last_axis_channels(ctx, op)
        lut_op.check_channels(op, ctx.qgraph)
    func = kernels.lut(int(np.prod(ctx.shape(op.output))), ctx.dtype(op.inputs[0]), table.size,
                       lut_op.index_offset(op, ctx.qgraph), ctx.dtype(op.output), lut_op.channels(op))
    return ctx.call_flat(op, func, [ctx.env[op.inputs[0]]], [table.reshape(-1)])


def _last_axis_channels(ctx: _Context, op: Op) -> None:
    """A per-channel elementwise kernel takes element i's channel as i % C: the IR's last axis must be the
    innermost one in memory too, which an NHWC-converted 4-D tensor's is not."""
    if any(v in ctx.nhwc for v in (*op.inputs, op.output)):
        raise LowbitError(f"op {op.name} ({op.op}): per-channel constants over the last axis of a tensor the "
                          "TVM backend keeps as NHWC are not supported (quantize without --smooth)")


@converter("pad")
def _pad(ctx: _Context, op: Op) -> relax.Expr:
    _same_layout(ctx, op)
    func = kernels.pad_nhwc(ctx.shape(op.inputs[0]), ctx.dtype(op.inputs[0]), tuple(op.attrs["pads"]))
    return ctx.call(op, func, [ctx.arg(op)], [], ctx.shape(op.output), ctx.dtype(op.output))


@converter("reshape")
def _reshape(ctx: _Context, op: Op) -> relax.Expr:
    # A 4-D result is held in the IR's order (not NHWC): an encoder's heads [B, S, h, d], read by permute/matmul.
    shape = ctx.qgraph.values[op.output].shape
    return ctx.bb.emit(relax.op.reshape(ctx.arg(op, nhwc=False), shape), name_hint=_symbol(op.output))


@converter("quantize")
def _quantize(ctx: _Context, op: Op) -> relax.Expr:
    out = ctx.qgraph.values[op.output]
    to_nhwc = len(out.shape) == 4
    if to_nhwc:
        ctx.nhwc.add(op.output)
    func = kernels.quantize_nchw_to_nhwc(tuple(out.shape), float(out.scale), out.zero_point, out.dtype, to_nhwc)
    return ctx.call(op, func, [ctx.env[op.inputs[0]]], [], ctx.shape(op.output), out.dtype)


@converter("dequantize")
def _dequantize(ctx: _Context, op: Op) -> relax.Expr:
    v = ctx.qgraph.values[op.inputs[0]]
    func, arrays = kernels.dequantize(ctx.shape(v.name), v.dtype, v.scale, v.zero_point, v.axis, v.name in ctx.nhwc)
    return ctx.call(op, func, [ctx.env[v.name]], arrays, tuple(v.shape), "float32")


def _is_x86_dense(dense: DenseKernel) -> bool:
    """Whether `dense` is lowbit's x86 dense kernel (with its options bound), the one that fuses adds and luts."""
    from . import x86

    return getattr(dense, "func", dense) is x86.dense


def check_supported(qgraph: QuantizedGraph) -> None:
    """Fail fast, naming every op the TVM backend cannot lower, not just the first."""
    check_backend(qgraph, CONVERTERS, "TVM")


def lower(qgraph: QuantizedGraph, conv2d: ConvKernel | None = None, dense: DenseKernel | None = None,
          fuse_residuals: bool = False, integer_outputs: bool = False, encoder_threads: int = 0) -> Lowered:
    """Build the Relax module for `qgraph`; `conv2d`/`dense` pick the layer kernels (portable by default).

    `fuse_residuals`: `conv2d` takes a `residual` (see `layer_kernel`), so residual adds go into conv epilogues.
    `integer_outputs`: `main` also returns `qgraph.int_outputs`, after the float outputs.
    `encoder_threads` > 0 (an x86 target with AVX2): the encoder's matmuls, softmaxes and LayerNorms run on
    lowbit's fast kernels (`encoder`) with that many parallel tasks, where their bounds hold."""
    check_supported(qgraph)
    bb = relax.BlockBuilder()
    ctx = _Context(qgraph, bb, conv2d or kernels.conv2d_nhwc, dense or kernels.dense,
                   residual_adds(qgraph) if fuse_residuals else {}, int(encoder_threads))
    if fuse_residuals and _is_x86_dense(ctx.dense):
        ctx.dense_fusions = dense_fusions(qgraph)
    if ctx.encoder_threads:  # the x86 attention matmul reads and writes through permutes
        ctx.matmul_views = permute_folds(qgraph)
        ctx.fused.update(p.name for views in ctx.matmul_views.values() for p in views.values())
    inputs = [relax.Var(_symbol(name), relax.TensorType(tuple(qgraph.values[name].shape), qgraph.values[name].dtype))
              for name in qgraph.inputs]  # float32, or int64 (token ids, masks)
    with bb.function("main"):
        with bb.dataflow():
            ctx.env.update(zip(qgraph.inputs, inputs, strict=True))
            for op in qgraph.ops:
                if op.name not in ctx.fused:
                    ctx.env[op.output] = CONVERTERS[op.op](ctx, op)
            outputs = [ctx.env[name] for name in qgraph.outputs]
            if integer_outputs:  # the integer values under the final dequantize (NCHW), for bit-exact checks
                outputs += [ctx.arg(qgraph.producer(name), nhwc=False) for name in qgraph.outputs]
            result = bb.emit_output(outputs[0] if len(outputs) == 1 else relax.Tuple(outputs))
        bb.emit_func_output(result, params=[*inputs, *ctx.params])
    return Lowered(bb.get(), ctx.arrays, list(qgraph.inputs), list(qgraph.outputs),
                   qgraph.int_outputs if integer_outputs else [])
