"""The reference executor: a plain interpreter of the integer IR, and the ground truth.

Elementwise integer math is numpy int64. Convolutions, matmuls and window sums
run in torch floating point on integer-valued tensors: when every product and
partial sum is an integer below 2^24 (float32) or 2^53 (float64), the float
result is exact whatever the summation order, and much faster than int64 loops.
Each layer picks float32 only when its worst-case partial sum
(max |x| times the largest per-channel sum of |w|) stays below 2^24.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .dyadic import requantize
from .ir import DTYPE_RANGES, Op, QuantizedGraph

_NP_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """float32 -> int, as ONNX QuantizeLinear: x / scale in float32, round half to even, saturate."""
    lo, hi = DTYPE_RANGES[dtype]
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, lo, hi).astype(np.int64)


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _f64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def _exact_float(weight: np.ndarray, input_range: int) -> np.dtype:
    """The narrowest float type in which this layer's integer sums are exact."""
    worst = int(np.abs(weight.astype(np.int64)).reshape(weight.shape[0], -1).sum(1).max()) * input_range
    return np.float32 if worst < 2**24 else np.float64


def _as(x: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=dtype))


def _to_int(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


def _requantize_layer(op: Op, acc: np.ndarray) -> np.ndarray:
    if "multiplier" not in op.arrays:  # int32 output: the accumulator itself
        return acc
    shape = _channel_shape(acc.ndim, 1 if op.op == "conv" else acc.ndim - 1)
    m = op.arrays["multiplier"].astype(np.int64).reshape(shape)
    c = op.arrays["shift"].astype(np.int64).reshape(shape)
    return requantize(acc, m, c, op.attrs["qmin"], op.attrs["qmax"])


def run_op(op: Op, args: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    if op.op in ("conv", "linear"):
        w = op.arrays["weight"]
        dtype = _exact_float(w, int(np.abs(args[0]).max(initial=0)))
        x, w = _as(args[0], dtype), _as(w, dtype)
        if op.op == "conv":
            acc = _to_int(F.conv2d(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]))
            acc += op.arrays["bias"].astype(np.int64).reshape(1, -1, 1, 1)
        else:
            acc = _to_int(x @ w.T) + op.arrays["bias"].astype(np.int64)
        return _requantize_layer(op, acc)
    if op.op == "add":
        m = op.arrays["multiplier"].astype(np.int64)
        acc = args[0] * m[0] + args[1] * m[1]
        return requantize(acc, np.int64(1), op.arrays["shift"].astype(np.int64)[0], a["qmin"], a["qmax"])
    if op.op == "concat":
        m, c = op.arrays["multiplier"].astype(np.int64), op.arrays["shift"].astype(np.int64)
        parts = [requantize(x, m[i], c[i], a["qmin"], a["qmax"]) for i, x in enumerate(args)]
        return np.concatenate(parts, axis=a["axis"])
    if op.op == "avgpool":
        sums = F.avg_pool2d(_f64(args[0]), a["kernel"], a["stride"], a["padding"], divisor_override=1)
        m, c = op.arrays["multiplier"].astype(np.int64), op.arrays["shift"].astype(np.int64)
        return requantize(_to_int(sums), m[0], c[0], a["qmin"], a["qmax"])
    if op.op == "maxpool":
        out = F.max_pool2d(_f64(args[0]), a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
        return _to_int(out)
    if op.op == "clamp":
        return np.clip(args[0], a["qmin"], a["qmax"])
    if op.op == "pad":
        left, right, top, bottom = a["pads"]
        return np.pad(args[0], ((0, 0), (0, 0), (top, bottom), (left, right)))
    if op.op == "reshape":
        return args[0].reshape(args[0].shape[0], *a["shape"])
    raise ValueError(f"op {op.name}: the reference executor has no rule for {op.op!r}")


def run_reference(qgraph: QuantizedGraph, inputs: dict[str, np.ndarray] | np.ndarray,
                  integer_outputs: bool = False) -> dict[str, np.ndarray]:
    """Execute the IR. Returns the float outputs, or with `integer_outputs` the int values before dequantize."""
    if isinstance(inputs, np.ndarray):
        inputs = {qgraph.inputs[0]: inputs}
    env: dict[str, np.ndarray] = {}
    for op in qgraph.ops:
        out_value = qgraph.values[op.output]
        if op.op == "quantize":
            x = inputs[op.inputs[0]]
            env[op.output] = quantize_input(x, out_value.scale, out_value.zero_point, out_value.dtype)
        elif op.op == "dequantize":
            v = qgraph.values[op.inputs[0]]
            scale = np.asarray(v.scale, dtype=np.float32)
            q = env[op.inputs[0]]
            if v.axis is not None:
                scale = scale.reshape(_channel_shape(q.ndim, v.axis))
            env[op.output] = (q - v.zero_point).astype(np.float32) * scale
        else:
            env[op.output] = run_op(op, [env[i] for i in op.inputs])
    if integer_outputs:
        return {name: env[name].astype(_NP_DTYPES[qgraph.values[name].dtype]) for name in qgraph.int_outputs}
    return {name: env[name] for name in qgraph.outputs}
