"""What conv and linear share: weights per output channel, an int32 accumulator, bias, a requantizer.

Reference semantics: acc = bias + sum(x * w) exactly (int32 accumulation), then the
op's requantizer, or for a graph output the raw int32 accumulator. The sums run in
torch floating point on integer-valued tensors: when every product and partial sum
is an integer below 2^24 (float32) or 2^53 (float64) the float result is exact
whatever the summation order, and much faster than int64 loops. Each layer picks
float32 only when its worst-case partial sum (max |x| times the largest
per-channel sum of |w|) stays below 2^24.

int16 inputs, and the accumulator bound (checked by `int16_acc_bound`, tested in
tests/test_int16.py). With |x| <= 2^15, |w| <= 2^(bits-1) - 1 <= 127 and an int32
bias, a layer of reduction length K has

    |acc| <= A = (2^31 - 1) + K * 127 * 2^15,

which passes 2^31 once K > 515 (MobileNetV2's K reaches 1280, and biases at the
finer int16 scale are large). So the IR defines a layer's accumulator as the exact
integer sum, whatever its size, and every backend computes it exactly:
- the reference in float64: |acc| <= A < 2^53 for K < 2^21, so the sums are exact;
- `model.int.onnx` as 256 * (W . h) + W . l with x = 256h + l, h in [-128, 127],
  l in [0, 255]: each 8-bit product sum is an int32 of at most K * 127 * 255 < 2^31
  (K < 66000), and the two are combined in int64;
- TVM in int32 where the layer's own bound (its real weights and bias,
  `x86.acc_bound`) is below 2^31, else in int64.
The requantizer then multiplies an accumulator of up to A by a mantissa b: the
lowering gives int16 layers b < 2^mantissa_bits_for(A) (`lowbit.ir.dyadic`), so
|acc * b| < 2^61 as for 8-bit layers. A graph-output layer reading int16 cannot
keep its raw accumulator as an int32 output: it is rounded to int32 instead,
acc / 2^s with s = bitlength(A) - 31 (2 or 3 bits for K up to 1280), a requantizer
of multiplier 2^-s and the int32 range, so its logits stay 2^(8-s) times finer
than an 8-bit layer's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..dtypes import qrange
from ..dyadic import MANTISSA_BITS, dyadic, mantissa_bits_for
from ..requantizer import Requantizer
from ..weights import PerChannelWeights

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ...quantizer.quantize import Lowering
    from ..graph import Op, QuantizedGraph

LAYER_WEIGHTS = ("weight", "bias")


def f32(x: float) -> float:
    """Scales are float32 in every backend; keep the IR's copy exactly representable."""
    return float(np.float32(x))


def channel_axis(op_kind: str, ndim: int) -> int:
    """The output-channel axis of a layer's output: 1 for conv (NCHW), the last for linear."""
    return 1 if op_kind == "conv" else ndim - 1


def weights_of(op: Op) -> PerChannelWeights:
    """The layer's weight format."""
    return PerChannelWeights(op.arrays["weight"], np.asarray(op.attrs["weight_scale"], np.float32),
                             int(op.attrs["weight_bits"]))


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer | None:
    """The layer's per-channel requantizer, or None for an int32 (accumulator) output."""
    wide = qgraph.values[op.inputs[0]].dtype == "int16"
    if "multiplier" not in op.arrays:
        if wide:
            raise ValueError("an int16 input's accumulator can pass int32's range: it needs a requantizer")
        return None
    out = qgraph.values[op.output]
    mantissa = op.arrays["multiplier"].astype(np.int64)
    if wide:  # keep |acc * mantissa| < 2^61 (module docstring)
        bits = mantissa_bits_for(int16_acc_bound(int(np.prod(op.arrays["weight"].shape[1:]))))
        if mantissa.max(initial=0) >= 1 << bits:
            raise ValueError(f"an int16 input's accumulator needs mantissas below 2^{bits}: {mantissa.max()}")
    return Requantizer(mantissa, op.arrays["shift"].astype(np.int64),
                       op.attrs["qmin"], op.attrs["qmax"], out.dtype, channel_axis(op.op, len(out.shape)))


def requantizers(op: Op, qgraph: QuantizedGraph) -> list[Requantizer]:
    rq = requantizer(op, qgraph)
    return [] if rq is None else [rq]


def int16_acc_bound(reduction: int) -> int:
    """A: the largest |bias + sum_k x w| of a layer with `reduction` terms, int16 inputs, 8-bit weights and an
    int32 bias (module docstring)."""
    return (2**31 - 1) + reduction * 127 * 2**15


def int16_output_shift(reduction: int) -> int:
    """s: an int16-input graph-output layer's accumulator is rounded to acc / 2^s, which fits int32."""
    return max(0, int16_acc_bound(reduction).bit_length() - 31)


def integer_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """A float bias as int32 at the accumulator's scale (input scale x per-channel weight scale)."""
    acc_scale = np.float64(input_scale) * weight_scale.astype(np.float64)
    return np.clip(np.round(bias.astype(np.float64) / acc_scale), *qrange("int32")).astype(np.int32)


def lower_layer(lw: Lowering, node: Node, attr_names: tuple[str, ...]) -> None:
    """Weights to per-channel symmetric integers, bias to int32 at the accumulator's scale, then a
    requantizer to the output's grid (with a following clamp folded in), or int32 for a graph output."""
    x = lw.input_value(node)
    bits = lw.plan.bits[node.name]
    w_int, w_scale = lw.round_weight(node, bits)
    acc_scale = np.float64(x.scale) * w_scale.astype(np.float64)
    bias = integer_bias(lw.graph.bias(node.name).numpy(), x.scale, w_scale)
    attrs: dict[str, Any] = {k: node.attrs[k] for k in attr_names}
    attrs.update(weight_bits=bits, weight_scale=w_scale.tolist(), input_scale=x.scale)
    arrays = {"weight": w_int, "bias": bias}
    clamp = lw.fused.get(node.name)
    axis = channel_axis(node.op, len(node.shape))
    wide = x.dtype == "int16"  # its accumulator may pass 2^31 (module docstring)
    mantissa_bits = mantissa_bits_for(int16_acc_bound(int(np.prod(w_int.shape[1:])))) if wide else MANTISSA_BITS
    if clamp is None and node.name in lw.graph.outputs and not wide:
        # A graph output keeps the int32 accumulator: no requantization error on logits.
        out = lw.accumulator(node, [f32(s) for s in acc_scale], axis)
    elif clamp is None and node.name in lw.graph.outputs:
        # ... but an int16 input's may pass 2^31: rounded by 2^s into int32 (module docstring).
        s = int16_output_shift(int(np.prod(w_int.shape[1:])))
        out = lw.accumulator(node, [f32(c * 2.0**s) for c in acc_scale], axis)
        mantissa, shift = dyadic(np.full(acc_scale.shape, 2.0**-s), mantissa_bits)
        arrays.update(multiplier=mantissa.astype(np.int32), shift=shift.astype(np.int32))
        attrs.update(qmin=qrange("int32")[0], qmax=qrange("int32")[1])
    else:
        out, qmin, qmax = lw.activation(clamp.name if clamp else node.name, node.shape, clamp)
        mantissa, shift = dyadic(acc_scale / out.scale, mantissa_bits)
        arrays.update(multiplier=mantissa.astype(np.int32), shift=shift.astype(np.int32))
        attrs.update(qmin=qmin, qmax=qmax)
    lw.emit(node.name, node.op, [x], out, attrs, arrays)


def exact_float(weight: np.ndarray, input_range: int) -> type:
    """The narrowest float type in which this layer's integer sums are exact."""
    worst = int(np.abs(weight.astype(np.int64)).reshape(weight.shape[0], -1).sum(1).max()) * input_range
    if worst >= 2**53:
        raise ValueError(f"a layer's partial sums can reach {worst}, beyond float64's exact integers")
    return np.float32 if worst < 2**24 else np.float64


def as_float(x: np.ndarray, dtype: type) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=dtype))


def to_int(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


def finish(op: Op, acc: np.ndarray, qgraph: QuantizedGraph) -> np.ndarray:
    """acc (bias included) -> the requantized output, or acc itself for an int32 output."""
    rq = requantizer(op, qgraph)
    return acc if rq is None else rq.apply(acc)
