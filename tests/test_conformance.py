"""The op conformance suite: every integer op of the registry, on random and saturating integers, gives the same
integers in the reference executor, in `model.int.onnx` under ONNX Runtime, and in the TVM build.

Each case is a tiny IR: quantize (scale 1, so the float inputs are the integers themselves, or saturate) -> the
op -> dequantize; an op's int64 inputs (token ids, the attention mask, scores over int32's range) are graph inputs.
A registered op without a case here, or a backend without a converter for it, fails.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lowbit.codegen.onnx import INTEGER_CONVERTERS, QDQ_CONVERTERS, export_integer
from lowbit.ir import Op, QuantizedGraph, Value
from lowbit.ir.dtypes import dtype as dtype_of
from lowbit.ir.dtypes import qrange
from lowbit.ir.dyadic import MANTISSA_BITS, dyadic, mantissa_bits_for
from lowbit.ir.ops import embedding as embedding_op
from lowbit.ir.ops import layer_norm as layer_norm_op
from lowbit.ir.ops import primitives, unlowered_ops
from lowbit.ir.ops import softmax as softmax_op
from lowbit.ir.ops._layer import int16_acc_bound, int16_output_shift
from lowbit.ir.weights import weight_range
from lowbit.quantizer.reference import run_reference

Case = Callable[[np.random.Generator, str], QuantizedGraph]
DTYPES = ("int8", "uint8", "int16")


def _graph(name: str, inputs: dict[str, tuple[tuple[int, ...], str]], op: str, attrs: dict,
           arrays: dict[str, np.ndarray], out_shape: tuple[int, ...], out_dtype: str,
           out_axis: int | None = None) -> QuantizedGraph:
    """quantize each float input (scale 1) -> `op` -> dequantize. An int64 input (token ids, a mask, wide scores)
    is read as it is, as a model's integer inputs are; `_inputs` draws its values by its name."""
    values, ops, read = {}, [], []
    for x, (shape, dtype) in inputs.items():
        if dtype == "int64":
            values[x] = Value(x, "int64", shape)
            read.append(x)
            continue
        values[x] = Value(x, "float32", shape)
        values[f"{x}_q"] = Value(f"{x}_q", dtype, shape, 1.0)
        ops.append(Op(f"{x}_quantize", "quantize", [x], f"{x}_q"))
        read.append(f"{x}_q")
    scale: float | list[float] = 1.0 if out_axis is None else [1.0] * out_shape[out_axis]
    values["y_q"] = Value("y_q", out_dtype, out_shape, scale, 0, out_axis)
    values["y"] = Value("y", "float32", out_shape)
    ops += [Op("op", op, read, "y_q", attrs, arrays), Op("y_dequantize", "dequantize", ["y_q"], "y")]
    return QuantizedGraph(values, ops, list(inputs), ["y"], f"conformance_{name}")


def _requant(rng: np.random.Generator, n: int, lo: float = 1e-3, hi: float = 0.5,
             mantissa_bits: int = MANTISSA_BITS) -> dict[str, np.ndarray]:
    mantissa, shift = dyadic(rng.uniform(lo, hi, n), mantissa_bits)
    return {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32)}


def _other(dtype: str) -> str:
    return "uint8" if dtype == "int8" else "int8"


def _layer_requant(rng: np.random.Generator, dtype: str, weight_shape: tuple[int, ...], lo: float,
                   hi: float) -> dict[str, np.ndarray]:
    """A layer's requantizer; an int16 input gets the shorter mantissa its wider accumulator needs."""
    bits = mantissa_bits_for(int16_acc_bound(int(np.prod(weight_shape[1:])))) if dtype == "int16" else MANTISSA_BITS
    return _requant(rng, weight_shape[0], lo, hi, bits)


def _int32_output(dtype: str, weight_shape: tuple[int, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """A graph-output layer's (attrs, arrays): none for the raw int32 accumulator of an 8-bit input; for int16,
    the rounding acc / 2^s into int32 that lowering gives it (its accumulator may pass 2^31)."""
    if dtype != "int16":
        return {}, {}
    k = int(np.prod(weight_shape[1:]))
    mantissa, shift = dyadic(np.full(weight_shape[0], 2.0**-int16_output_shift(k)),
                             mantissa_bits_for(int16_acc_bound(k)))
    lo, hi = qrange("int32")
    return {"qmin": lo, "qmax": hi}, {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32)}


def _layer_arrays(rng: np.random.Generator, weight_shape: tuple[int, ...], bits: int) -> dict[str, np.ndarray]:
    lo, hi = weight_range(bits)
    return {"weight": rng.integers(lo, hi + 1, weight_shape).astype(np.int8),
            "bias": rng.integers(-5000, 5000, weight_shape[0]).astype(np.int32)}


def _conv(rng: np.random.Generator, dtype: str, bits: int = 8, requantize: bool = True) -> QuantizedGraph:
    attrs = {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "weight_bits": bits,
             "weight_scale": [1.0] * 8, "input_scale": 1.0}
    arrays = _layer_arrays(rng, (8, 5, 3, 3), bits)
    if not requantize:
        more_attrs, more_arrays = _int32_output(dtype, (8, 5, 3, 3))
        return _graph("conv", {"x": ((1, 5, 9, 8), dtype)}, "conv", {**attrs, **more_attrs}, {**arrays, **more_arrays},
                      (1, 8, 5, 4), "int32", 1)
    lo, hi = qrange(dtype)
    return _graph("conv", {"x": ((1, 5, 9, 8), dtype)}, "conv", {**attrs, "qmin": lo + 3, "qmax": hi},
                  {**arrays, **_layer_requant(rng, dtype, (8, 5, 3, 3), 1e-4, 2e-2)}, (1, 8, 5, 4), dtype)


def _linear_to_int16(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    """An 8-bit input (int8 for the int16 run) and an int16 output, as MiniLM's FFN-down and attention output
    layers: x86 requantizes in the dense kernel's epilogue, over the whole int16 range."""
    x_dtype = "int8" if dtype == "int16" else dtype
    attrs = {"weight_bits": 8, "weight_scale": [1.0] * 12, "input_scale": 1.0, "qmin": -32768, "qmax": 32767}
    return _graph("linear", {"x": ((1, 40), x_dtype)}, "linear", attrs,
                  {**_layer_arrays(rng, (12, 40), 8), **_requant(rng, 12, 0.05, 0.8)}, (1, 12), "int16")


def _linear(rng: np.random.Generator, dtype: str, bits: int = 8, requantize: bool = True) -> QuantizedGraph:
    attrs = {"weight_bits": bits, "weight_scale": [1.0] * 6, "input_scale": 1.0}
    arrays = _layer_arrays(rng, (6, 20), bits)
    if not requantize:
        more_attrs, more_arrays = _int32_output(dtype, (6, 20))
        return _graph("linear", {"x": ((1, 20), dtype)}, "linear", {**attrs, **more_attrs}, {**arrays, **more_arrays},
                      (1, 6), "int32", 1)
    lo, hi = qrange(_other(dtype))
    # int16 in, int8 out: the scales differ by 2^8, so the multipliers are 2^8 smaller
    scale = 2.0**-8 if dtype == "int16" else 1.0
    return _graph("linear", {"x": ((1, 20), dtype)}, "linear", {**attrs, "qmin": lo, "qmax": hi},
                  {**arrays, **_layer_requant(rng, dtype, (6, 20), 1e-3 * scale, 5e-2 * scale)}, (1, 6),
                  _other(dtype))


def _add(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    shape = (1, 4, 5, 6)
    ratios = rng.uniform(0.3, 1.5, 2)
    _, shift = dyadic(ratios.max())
    mantissas = np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32)
    lo, hi = qrange(dtype)
    return _graph("add", {"a": (shape, dtype), "b": (shape, _other(dtype))}, "add", {"qmin": lo, "qmax": hi},
                  {"multiplier": mantissas, "shift": shift.astype(np.int32)}, shape, dtype)


def _channel_add(rng: np.random.Generator, dtype: str, k: int) -> QuantizedGraph:
    """Input k multiplied per channel of the last axis (SmoothQuant's rescale of a residual add's input)."""
    shape = (1, 4, 7)
    ratios = rng.uniform(0.3, 1.5, 1 + shape[-1])  # the other input's, then input k's per channel
    ratios[1] = 1.5  # the largest: it sets the shared shift, the other channels get shorter mantissas
    _, shift = dyadic(ratios.max())
    mantissas = np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32)
    lo, hi = qrange(dtype)
    return _graph("channel_add", {"a": (shape, dtype), "b": (shape, _other(dtype))}, "add",
                  {"qmin": lo, "qmax": hi, "channel_input": k},
                  {"multiplier": mantissas[:1], "channel_multiplier": mantissas[1:], "shift": shift.astype(np.int32)},
                  shape, dtype)


def _concat(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    lo, hi = qrange(dtype)
    return _graph("concat", {"a": ((1, 3, 4, 5), dtype), "b": ((1, 2, 4, 5), _other(dtype))}, "concat",
                  {"axis": 1, "qmin": lo, "qmax": hi}, _requant(rng, 2, 0.2, 1.9), (1, 5, 4, 5), dtype)


def _avgpool(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    lo, hi = qrange(dtype)
    attrs = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "qmin": lo, "qmax": hi}
    return _graph("avgpool", {"x": ((1, 4, 7, 6), dtype)}, "avgpool", attrs, _requant(rng, 1, 0.05, 0.2),
                  (1, 4, 4, 3), dtype)


def _maxpool(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    attrs = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "ceil_mode": False}
    return _graph("maxpool", {"x": ((1, 4, 7, 6), dtype)}, "maxpool", attrs, {}, (1, 4, 4, 3), dtype)


def _clamp(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    lo, hi = qrange(dtype)
    return _graph("clamp", {"x": ((1, 3, 4, 5), dtype)}, "clamp", {"qmin": lo + 20, "qmax": hi - 30}, {},
                  (1, 3, 4, 5), dtype)


def _pad(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    return _graph("pad", {"x": ((1, 3, 4, 5), dtype)}, "pad", {"pads": [1, 2, 0, 3]}, {}, (1, 3, 7, 8), dtype)


def _reshape(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    return _graph("reshape", {"x": ((1, 3, 4, 5), dtype)}, "reshape", {"shape": [60]}, {}, (1, 60), dtype)


def _lut(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    # A table cannot read int16 (65536 entries); it can write it: int8 in, int16 out.
    x_dtype, out_dtype = ("int8", "int16") if dtype == "int16" else (dtype, _other(dtype))
    lo, hi = qrange(out_dtype)
    table = rng.integers(lo, hi + 1, 256).astype(np.dtype(out_dtype))
    return _graph("lut", {"x": ((1, 3, 4, 5), x_dtype)}, "lut", {"qmin": lo, "qmax": hi}, {"table": table},
                  (1, 3, 4, 5), out_dtype)


def _channel_lut(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    """One table per channel of the last axis, [C, 256] (gelu(x) / s_j after SmoothQuant)."""
    x_dtype, out_dtype = ("int8", "int16") if dtype == "int16" else (dtype, _other(dtype))
    lo, hi = qrange(out_dtype)
    table = rng.integers(lo, hi + 1, (5, 256)).astype(np.dtype(out_dtype))
    return _graph("channel_lut", {"x": ((1, 4, 5), x_dtype)}, "lut", {"qmin": lo, "qmax": hi}, {"table": table},
                  (1, 4, 5), out_dtype)


def _quantize(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    return _clamp(rng, dtype)  # quantize (and dequantize) begin and end every case; this one adds nothing else


# -- the encoder's ops -------------------------------------------------------------------------------------------

def _embedding(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    """Rows of magnitudes over 5 decades (so the per-row mantissas span their range), two of them at +-127."""
    table = rng.normal(size=(40, 6)) * np.exp(rng.uniform(-8, 3, (40, 1)))
    rows, row_scale, out_scale = embedding_op.quantize_rows(table)
    rows[0], rows[1] = 127, -127
    ratios = row_scale / out_scale
    _, shift = dyadic(ratios.max())
    mantissa = np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32)
    return _graph("embedding", {"ids": ((1, 7), "int64")}, "embedding", {"vocab": 40},
                  {"rows": rows, "mantissa": mantissa, "shift": shift.astype(np.int32)}, (1, 7, 6), "int16")


def _add_constant(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    """x * m + C with |C| up to 1.5 x the output range: sums that saturate at both ends."""
    mantissa, shift = dyadic(rng.uniform(0.2, 3.0))
    lo, hi = qrange(dtype)
    constant = np.round(rng.uniform(-1.5, 1.5, (5, 6)) * hi * np.exp2(float(shift[0]))).astype(np.int64)
    return _graph("add_constant", {"x": ((1, 5, 6), dtype)}, "add_constant", {"qmin": lo + 3, "qmax": hi},
                  {"multiplier": mantissa.astype(np.int32), "shift": shift.astype(np.int32), "constant": constant},
                  (1, 5, 6), dtype)


def _permute(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    return _graph("permute", {"x": ((1, 3, 4, 5), dtype)}, "permute", {"dims": [0, 2, 3, 1]}, {}, (1, 4, 5, 3), dtype)


_MATMUL_OPERANDS = {"int8": ("int8", "int8"), "uint8": ("uint8", "int8"), "int16": ("uint8", "uint8")}


def _matmul(rng: np.random.Generator, dtype: str, requantize: bool,
            mkn: tuple[int, int, int] = (5, 16, 3)) -> QuantizedGraph:
    """8-bit x 8-bit (int16 is not an operand type: that run takes u8 x u8), raw int32 or requantized. The x86
    kernel's paths: (13, 37, 20) has whole and partial 8-column blocks, a row-tile tail and an odd K."""
    a, b = _MATMUL_OPERANDS[dtype]
    m, k, n = mkn
    inputs = {"a": ((1, 2, m, k), a), "b": ((1, 2, k, n), b)}
    if not requantize:
        return _graph("matmul", inputs, "matmul", {}, {}, (1, 2, m, n), "int32")
    return _graph("matmul", inputs, "matmul", {"qmin": -128, "qmax": 127}, _requant(rng, 1, 1e-4, 2e-2),
                  (1, 2, m, n), "int8")


def _softmax_attrs(scale: float) -> tuple[dict, dict[str, np.ndarray]]:
    c = softmax_op.softmax_constants(scale)
    return ({"mantissa": c.mantissa, "shift": c.shift, "exp_rel_error": c.exp_rel_error},
            {"coefficients": np.asarray(c.coefficients, dtype=np.int64)})


def _softmax_of_scores(rng: np.random.Generator, dtype: str, keys: int = 7) -> QuantizedGraph:
    """As in an encoder: the raw int32 scores of an int8 x int8 matmul, masked by the attention mask."""
    a, b = _MATMUL_OPERANDS[dtype]
    qgraph = _graph("softmax", {"a": ((1, 2, 5, 16), a), "b": ((1, 2, 16, keys), b), "mask": ((1, keys), "int64")},
                    "softmax", *_softmax_attrs(rng.uniform(2e-5, 1e-4)), (1, 2, 5, keys), "uint8")
    qgraph.values["scores"] = Value("scores", "int32", (1, 2, 5, keys), 1.0)
    softmax = qgraph.op("op")
    qgraph.ops.insert(qgraph.ops.index(softmax), Op("scores_op", "matmul", softmax.inputs[:2], "scores"))
    softmax.inputs = ["scores", "mask"]
    return qgraph


def _softmax(rng: np.random.Generator, dtype: str, masked: bool, scale: tuple[float, float] = (2e-9, 1e-8),
             keys: int = 7) -> QuantizedGraph:
    """Scores over int32's whole range (an int64 input): rows from -2^31 to 2^31 - 1, with or without a mask. Scales
    of 1e-4 keep x86's int32 row kernel (its clamp at the row max - 2^17 or so, and at INT32_MIN); 1e-8 do not."""
    inputs = {"scores": ((1, 2, 5, keys), "int64"), **({"mask": ((1, keys), "int64")} if masked else {})}
    return _graph("softmax", inputs, "softmax", *_softmax_attrs(rng.uniform(*scale)), (1, 2, 5, keys), "uint8")


def _layer_norm(rng: np.random.Generator, dtype: str, width: int = 12, eps: float = 1e-5) -> QuantizedGraph:
    """int8 or int16 rows (int16 for the uint8 run: LayerNorm reads signed inputs), signed gamma with a zero, int8
    out. eps = 0 makes the constant rows of the saturating samples divide by r = 1; width 1000 of int16 needs the
    centring shift k > 0."""
    x_dtype = "int8" if dtype == "int8" else "int16"
    gamma = rng.uniform(-2, 2, width)
    gamma[0] = 0.0
    in_scale = 0.05 if x_dtype == "int8" else 1e-3
    c = layer_norm_op.layer_norm_constants(width, 16 if x_dtype == "int16" else 8, gamma, rng.uniform(-3, 3, width),
                                           eps, in_scale, 5.0 / 127)
    assert (c.k > 0) == (x_dtype == "int16" and width >= 1000)
    return _graph("layer_norm", {"x": ((1, 3, width), x_dtype)}, "layer_norm",
                  {"k": c.k, "eps_int": c.eps_int, "qmin": c.qmin, "qmax": c.qmax},
                  {"multiplier": c.mantissa, "shift": c.shift, "beta": c.beta}, (1, 3, width), "int8")


def _masked_mean(rng: np.random.Generator, dtype: str) -> QuantizedGraph:
    return _graph("masked_mean", {"x": ((1, 6, 5), dtype), "mask": ((1, 6), "int64")}, "masked_mean",
                  {"frac_bits": 31 - dtype_of(dtype).bits}, {}, (1, 5), "int32")


CASES: dict[str, list[Case]] = {
    "conv": [_conv, lambda rng, d: _conv(rng, d, bits=4), lambda rng, d: _conv(rng, d, requantize=False)],
    "linear": [_linear, lambda rng, d: _linear(rng, d, bits=4), lambda rng, d: _linear(rng, d, requantize=False),
               _linear_to_int16],
    "add": [_add, lambda rng, d: _channel_add(rng, d, 0), lambda rng, d: _channel_add(rng, d, 1)],
    "concat": [_concat], "avgpool": [_avgpool], "maxpool": [_maxpool], "clamp": [_clamp], "pad": [_pad],
    "reshape": [_reshape], "lut": [_lut, _channel_lut], "quantize": [_quantize], "dequantize": [_quantize],
    "embedding": [_embedding], "add_constant": [_add_constant], "permute": [_permute],
    "matmul": [lambda rng, d: _matmul(rng, d, False), lambda rng, d: _matmul(rng, d, True),
               lambda rng, d: _matmul(rng, d, False, (13, 37, 20)), lambda rng, d: _matmul(rng, d, True, (13, 37, 20))],
    "softmax": [_softmax_of_scores, lambda rng, d: _softmax(rng, d, True), lambda rng, d: _softmax(rng, d, False),
                lambda rng, d: _softmax_of_scores(rng, d, 20),
                lambda rng, d: _softmax(rng, d, True, (5e-5, 2e-4), 20)],
    "layer_norm": [_layer_norm, lambda rng, d: _layer_norm(rng, d, eps=0.0), lambda rng, d: _layer_norm(rng, d, 1000)],
    "masked_mean": [_masked_mean],
}
PARAMS = [pytest.param(op, i, dtype, id=f"{op}-{i}-{dtype}")
          for op in sorted(CASES) for i in range(len(CASES[op])) for dtype in DTYPES]


def _inputs(qgraph: QuantizedGraph, rng: np.random.Generator, samples: int = 6) -> dict[str, np.ndarray]:
    """Random integers over each input's whole range, with its extremes, and values beyond them that saturate."""
    found = {}
    for name in qgraph.inputs:
        if qgraph.values[name].dtype == "int64":
            found[name] = _int64_input(qgraph, name, rng, (samples, *qgraph.values[name].shape[1:]))
            continue
        q = next(o.output for o in qgraph.ops if o.op == "quantize" and o.inputs[0] == name)
        lo, hi = qrange(qgraph.values[q].dtype)
        shape = (samples, *qgraph.values[name].shape[1:])
        x = rng.integers(lo, hi + 1, shape).astype(np.float32)
        x[0], x[1] = lo, hi
        x[2] = rng.choice(np.array([lo - 1000, hi + 1000], np.float32), shape[1:])
        found[name] = x
    return found


def _int64_input(qgraph: QuantizedGraph, name: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Token ids (each in [0, vocab), all 0, all the last), a mask (random 0/1, none kept, all kept, nonzero values
    other than 1), or scores over int32's range (random, all at either end, a mix of both ends)."""
    if name == "ids":
        vocab = next(o for o in qgraph.ops if o.op == "embedding").attrs["vocab"]
        x = rng.integers(0, vocab, shape)
        x[0], x[1] = 0, vocab - 1
    elif name == "mask":
        x = rng.integers(0, 2, shape)
        x[0], x[1] = 0, 1
        x[2] = rng.choice(np.array([0, 3, -1]), shape[1:])
    elif name == "scores":
        lo, hi = qrange("int32")
        x = rng.integers(lo, hi + 1, shape)
        x[0], x[1] = lo, hi
        x[2] = rng.choice(np.array([lo, hi]), shape[1:])
    else:
        raise AssertionError(f"no generator for the int64 input {name!r}")
    return x.astype(np.int64)


def test_every_registered_integer_op_has_a_case_and_every_backend_supports_it() -> None:
    from lowbit.codegen.tvm.lower import CONVERTERS as TVM_CONVERTERS

    assert set(CASES) == set(primitives()), "add a conformance case for each new integer op"
    for backend, converters in (("model.int.onnx", INTEGER_CONVERTERS), ("model.onnx", QDQ_CONVERTERS),
                                ("TVM", TVM_CONVERTERS)):
        missing = sorted(set(primitives()) - set(converters))
        assert not missing, f"the {backend} backend lacks {missing}"
    # Float-only ops lower to primitives; they never reach a backend. Every op lowers now.
    assert unlowered_ops() == ()


def _ort_integers(qgraph: QuantizedGraph, x: dict[str, np.ndarray], path: Path) -> list[np.ndarray]:
    export_integer(qgraph, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.concatenate([session.run(qgraph.int_outputs, {k: v[i:i + 1] for k, v in x.items()})[j]
                            for i in range(len(next(iter(x.values()))))]) for j in range(len(qgraph.int_outputs))]


@pytest.mark.parametrize(("op", "index", "dtype"), PARAMS)
def test_op_is_bit_exact_in_every_backend(op: str, index: int, dtype: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{op}-{index}-{dtype}".encode()))
    qgraph = CASES[op][index](rng, dtype)
    x = _inputs(qgraph, rng)
    reference = run_reference(qgraph, x, integer_outputs=True)
    expected = [reference[name] for name in qgraph.int_outputs]
    for got, want in zip(_ort_integers(qgraph, x, tmp_path / "m.int.onnx"), expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg="model.int.onnx in ONNX Runtime")
    for got, want in zip(_tvm_integers(qgraph, x), expected, strict=True):
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg="TVM")
        assert got.dtype == want.dtype


def _tvm_integers(qgraph: QuantizedGraph, x: dict[str, np.ndarray], portable: bool = False) -> list[np.ndarray]:
    """The integers TVM computes, with this CPU's best layer kernels (or the portable ones)."""
    tvm = pytest.importorskip("tvm")
    from lowbit.codegen.tvm.compile import layer_kernels
    from lowbit.codegen.tvm.lower import lower
    from lowbit.codegen.tvm.target import DEFAULT_TARGET, parse_target

    target = parse_target(DEFAULT_TARGET)
    conv2d, dense, kernels = (None, None, "portable") if portable else layer_kernels(target)
    lowered = lower(qgraph, conv2d, dense, fuse_residuals=kernels != "portable", integer_outputs=True,
                    encoder_threads=0 if kernels == "portable" else 2)
    vm = tvm.relax.VirtualMachine(tvm.compile(lowered.mod, target=tvm.target.Target(target)), tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in lowered.params.values()]
    samples, first = len(next(iter(x.values()))), len(lowered.outputs)  # the integers follow the float outputs
    outs = [vm["main"](*[tvm.runtime.tensor(x[name][i:i + 1]) for name in qgraph.inputs], *params)
            for i in range(samples)]
    return [np.concatenate([o[first + j].numpy() for o in outs]) for j in range(len(lowered.integer_outputs))]


def _exact_layer(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, padding: int) -> np.ndarray:
    """bias + sum x * w in Python integers (no overflow at any size): the oracle of the accumulator bound tests.
    A conv (4-D x, stride 1, zero `padding`) or a linear layer (2-D x)."""
    w = weight.astype(object)
    if x.ndim == 2:
        return x.astype(object) @ w.T + bias.astype(object)
    xp = np.pad(x.astype(object), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = weight.shape[2:]
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    acc = np.zeros((x.shape[0], weight.shape[0], oh, ow), dtype=object)
    for i in range(kh):
        for j in range(kw):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + oh, j:j + ow], w[:, :, i, j])
    return acc + bias.astype(object).reshape(1, -1, 1, 1)


def _exact_requantize(acc: np.ndarray, mantissa: np.ndarray, shift: np.ndarray, axis: int, lo: int,
                      hi: int) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[axis] = -1
    m, c = mantissa.astype(object).reshape(shape), shift.astype(object).reshape(shape)
    return np.clip((acc * m + ((1 << c) >> 1)) >> c, lo, hi).astype(np.int64)


def _edge_layer(op: str, requantize: bool) -> tuple[QuantizedGraph, dict[str, np.ndarray], np.ndarray]:
    """A layer with int16 inputs at the edge of the accumulator bound: K past 515 (K = 1280 linear, 64 x 3 x 3 conv),
    channels of all +127 and all -127 weights with int32-extreme biases against them, and inputs at +-2^15, so
    |acc| reaches K * 127 * 2^15 + 2^31 ~ 2^32.8; the requantizer's mantissas are as long as the bound allows."""
    rng = np.random.default_rng(16)
    weight_shape = (4, 1280) if op == "linear" else (4, 64, 3, 3)
    weight = rng.integers(-127, 128, weight_shape).astype(np.int8)
    weight[0], weight[1] = 127, -127
    bias = np.array([-(2**31), 2**31 - 1, 2**31 - 1, -(2**31)], np.int32)
    k = int(np.prod(weight_shape[1:]))
    attrs = {"weight_bits": 8, "weight_scale": [1.0] * 4, "input_scale": 1.0}
    if op == "conv":
        attrs.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    in_shape, out_shape = ((1, 1280), (1, 4)) if op == "linear" else ((1, 64, 4, 4), (1, 4, 4, 4))
    arrays = {"weight": weight, "bias": bias}
    bound = int16_acc_bound(k)
    lo, hi = qrange("int16" if requantize else "int32")
    if requantize:
        arrays.update(_requant(rng, 4, 20000 / bound, 32000 / bound, mantissa_bits_for(bound)))
        attrs.update(qmin=lo, qmax=hi)
    else:  # a graph output: rounded into int32, as lowering does
        more_attrs, more_arrays = _int32_output("int16", weight_shape)
        attrs.update(more_attrs)
        arrays.update(more_arrays)
    qgraph = _graph(f"{op}_edge", {"x": (in_shape, "int16")}, op, attrs, arrays, out_shape,
                    "int16" if requantize else "int32", None if requantize else 1)
    x = rng.integers(-32768, 32768, (6, *in_shape[1:])).astype(np.float32)
    x[0], x[1], x[2] = -32768, 32767, 1e9  # saturating: the quantize clips it to 32767
    x[3] = np.where(rng.random(in_shape[1:]) < 0.5, -32768, 32767)
    acc = _exact_layer(np.clip(x, -32768, 32767).astype(np.int64), weight, bias, 1)
    assert max(abs(int(v)) for v in acc.ravel()) > 2**32, "the case must pass int32's range"
    return qgraph, {"x": x}, _exact_requantize(acc, arrays["multiplier"], arrays["shift"], 1, lo, hi)


@pytest.mark.parametrize("requantize", [True, False], ids=["requantized", "int32-output"])
@pytest.mark.parametrize("op", ["conv", "linear"])
def test_int16_accumulators_past_int32_are_exact_in_every_backend(op: str, requantize: bool, tmp_path: Path) -> None:
    """The bound of `lowbit.ir.ops._layer` at its edge: every executor equals the exact integers where an int32
    accumulator would wrap (checked: the portable TVM kernels accumulating in int32 fail all four cases). TVM runs
    with this CPU's best kernels (bytes of the input on x86) and with the portable ones (int16 directly)."""
    qgraph, x, exact = _edge_layer(op, requantize)
    reference = run_reference(qgraph, x, integer_outputs=True)["y_q"]
    np.testing.assert_array_equal(reference, exact, err_msg="reference executor")
    np.testing.assert_array_equal(_ort_integers(qgraph, x, tmp_path / "m.int.onnx")[0], exact,
                                  err_msg="model.int.onnx in ONNX Runtime")
    np.testing.assert_array_equal(_tvm_integers(qgraph, x)[0], exact, err_msg="TVM")
    np.testing.assert_array_equal(_tvm_integers(qgraph, x, portable=True)[0], exact, err_msg="TVM, portable")


def test_int16_layers_refuse_mantissas_longer_than_their_bound_allows() -> None:
    from lowbit.errors import LowbitError

    for k in (45, 515, 516, 1280, 4096):
        bound = int16_acc_bound(k)
        bits = mantissa_bits_for(bound)
        assert bound * ((1 << bits) - 1) < 2**61  # no int64 overflow, and room for the rounding term
        assert bits == MANTISSA_BITS or bound * (1 << bits) >= 2**60  # and not needlessly short
    assert int16_acc_bound(515) < 2**32 <= int16_acc_bound(1280)
    qgraph, _, _ = _edge_layer("linear", True)
    qgraph.validate("edge")
    qgraph.op("op").arrays["multiplier"][0] = (1 << MANTISSA_BITS) - 1  # one bit too long for K = 1280
    with pytest.raises(LowbitError, match="op op .linear. has an invalid requantizer.*mantissas below 2"):
        qgraph.validate("edge")


class _Activations(torch.nn.Module):
    """Float-only ops (lowered to `lut`) between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.hardswish(self.conv1(x))
        return torch.sigmoid(self.conv2(y))


def test_float_activations_lower_to_tables_that_every_backend_runs_exactly(tmp_path: Path) -> None:
    from lowbit.quantizer.capture import capture
    from lowbit.quantizer.config import QuantConfig
    from lowbit.quantizer.quantize import quantize

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(16, 3, 6, 7)).astype(np.float32)
    model = _Activations().eval()
    program = torch.export.export(model, (torch.from_numpy(calib[:1]),))
    graph = capture(program, "activations")
    assert [n.op for n in graph.nodes] == ["input", "conv", "hardswish", "conv", "sigmoid"]
    qgraph = quantize(graph, calib, QuantConfig(rounding="nearest"))
    assert [o.op for o in qgraph.ops] == ["quantize", "conv", "lut", "conv", "lut", "dequantize"]
    x = {"x": rng.normal(size=(4, 3, 6, 7)).astype(np.float32) * 3}
    expected = run_reference(qgraph, x, integer_outputs=True)[qgraph.int_outputs[0]]
    np.testing.assert_array_equal(_ort_integers(qgraph, x, tmp_path / "m.int.onnx")[0], expected)
    np.testing.assert_array_equal(_tvm_integers(qgraph, x)[0], expected)
    # The tables are the float functions on the integer grid: on calibration data, a few output steps from FP32.
    with torch.no_grad():
        fp32 = model(torch.from_numpy(calib)).numpy()
    step = qgraph.values[qgraph.int_outputs[0]].scale
    assert np.abs(run_reference(qgraph, calib)["sigmoid"] - fp32).max() < 4 * step


def test_loading_an_ir_with_an_unknown_op_or_a_bad_requantizer_is_refused(tmp_path: Path) -> None:
    import json

    from lowbit.errors import LowbitError

    qgraph = _conv(np.random.default_rng(0), "int8")
    qgraph.save(tmp_path)
    assert QuantizedGraph.load(tmp_path).requantizers(qgraph.op("op"))[0].axis == 1
    meta = json.loads((tmp_path / "ir.json").read_text())
    meta["ops"][1]["attrs"]["qmax"] = 300  # beyond int8
    (tmp_path / "ir.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="op op .conv. has an invalid requantizer"):
        QuantizedGraph.load(tmp_path)
    meta["ops"][1]["op"] = "gelu"  # a float op: it lowers to `lut`, never reaches the IR
    (tmp_path / "ir.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="unknown integer ops gelu"):
        QuantizedGraph.load(tmp_path)


def test_the_ir_documentation_is_generated_from_the_registry() -> None:
    from lowbit.ir.ops import ir_spec

    doc = Path(__file__).resolve().parents[1] / "docs" / "IR.md"
    assert doc.read_text() == ir_spec(), "regenerate it: python -m lowbit.ir.ops > docs/IR.md"
