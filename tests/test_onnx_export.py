"""Tests for lowbit.codegen.onnx: the integer-only ONNX model (bit-exact) and the QDQ model (close)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from lowbit.codegen import export_integer, export_qdq, float_tensors_between
from lowbit.codegen.onnx import INTEGER_CONVERTERS, QDQ_CONVERTERS, qdq
from lowbit.codegen.onnx.builder import Builder
from lowbit.codegen.onnx.integer import requantize as emit_requantize
from lowbit.errors import LowbitError
from lowbit.ir import Op, QuantizedGraph, Value
from lowbit.ir.dtypes import qrange
from lowbit.ir.dyadic import requantize
from lowbit.ir.requantizer import Requantizer
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.models.small_cnn import smooth_noise
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import quantize_input, run_reference


def _session(path: Path | bytes, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if optimized is not None:
        # EXTENDED: the QDQ fusions, without the hardware-specific layout changes of ENABLE_ALL.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, qgraph: QuantizedGraph, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {qgraph.inputs[0]: x}), strict=True))


def _assert_bit_exact(session: ort.InferenceSession, qgraph: QuantizedGraph, x: np.ndarray) -> None:
    got = _run(session, qgraph, x)
    for name, want in run_reference(qgraph, x, integer_outputs=True).items():
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


# -- fixtures: small_cnn quantized once --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> Graph:
    return capture(load_program("zoo:small_cnn", None), "small_cnn")


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return get_zoo_entry("small_cnn").calibration(0)


@pytest.fixture(scope="module")
def qgraph(graph: Graph, calib: np.ndarray) -> QuantizedGraph:
    return quantize(graph, calib)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def int_path(qgraph: QuantizedGraph, out_dir: Path) -> Path:
    path = out_dir / "model.int.onnx"
    export_integer(qgraph, path)
    return path


@pytest.fixture(scope="module")
def qdq_path(qgraph: QuantizedGraph, out_dir: Path) -> Path:
    path = out_dir / "model.onnx"
    export_qdq(qgraph, path)
    return path


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """112 inputs: held-out images, white noise, and images x10 that drive every quantizer into saturation."""
    held = get_zoo_entry("small_cnn").heldout(0)
    noise = np.random.default_rng(0).standard_normal((32, *held.shape[1:])).astype(np.float32)
    return np.concatenate([held, noise, held[:16] * 10])


# -- the integer-only model ---------------------------------------------------------------------------------------

def test_integer_model_is_bit_exact(qgraph: QuantizedGraph, int_path: Path, inputs: np.ndarray) -> None:
    x_q = qgraph.values[next(o.output for o in qgraph.ops if o.op == "quantize")]
    big = quantize_input(inputs[-16:], x_q.scale, 0, x_q.dtype)
    assert big.min() == -128 and big.max() == 127  # the x10 inputs do saturate
    session = _session(int_path)
    _assert_bit_exact(session, qgraph, inputs)
    for i in (0, 70, 100, len(inputs) - 1):  # batch 1 as well: the batch dimension is symbolic
        _assert_bit_exact(session, qgraph, inputs[i:i + 1])


def test_integer_model_float_outputs_match_reference(qgraph: QuantizedGraph, int_path: Path,
                                                      inputs: np.ndarray) -> None:
    got = _run(_session(int_path), qgraph, inputs)
    for name, want in run_reference(qgraph, inputs).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_no_float_tensor_between_quantize_and_dequantize(int_path: Path, qdq_path: Path) -> None:
    model = onnx.load(int_path)
    assert float_tensors_between(model) == []
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    assert not {"Conv", "MatMul", "Gemm", "AveragePool"} & set(ops)
    assert float_tensors_between(onnx.load(qdq_path))  # the check does see float tensors where there are some


def test_models_are_valid_with_symbolic_batch(qgraph: QuantizedGraph, int_path: Path, qdq_path: Path) -> None:
    for path in (int_path, qdq_path):
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
        for vi in [*model.graph.input, *model.graph.output]:
            assert vi.type.tensor_type.shape.dim[0].dim_param == "N", vi.name
    int_outputs = [o.name for o in onnx.load(int_path).graph.output]
    assert int_outputs == qgraph.outputs + qgraph.int_outputs
    assert [o.name for o in onnx.load(qdq_path).graph.output] == qgraph.outputs


def test_export_is_deterministic(graph: Graph, calib: np.ndarray, qgraph: QuantizedGraph, int_path: Path,
                                 qdq_path: Path, out_dir: Path) -> None:
    export_integer(qgraph, out_dir / "again.int.onnx")
    export_qdq(qgraph, out_dir / "again.onnx")
    assert (out_dir / "again.int.onnx").read_bytes() == int_path.read_bytes()
    assert (out_dir / "again.onnx").read_bytes() == qdq_path.read_bytes()
    export_integer(quantize(graph, calib, QuantConfig(seed=0)), out_dir / "requantized.int.onnx")
    assert (out_dir / "requantized.int.onnx").read_bytes() == int_path.read_bytes()


# -- the QDQ model --------------------------------------------------------------------------------------------------

def test_qdq_model_agrees_with_reference(qgraph: QuantizedGraph, qdq_path: Path, out_dir: Path) -> None:
    x = get_zoo_entry("small_cnn").heldout(1)
    optimized = out_dir / "model.optimized.onnx"
    got = _run(_session(qdq_path, optimized), qgraph, x)[qgraph.outputs[0]]
    want = run_reference(qgraph, x)[qgraph.outputs[0]]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert np.abs(got - want).max() < 0.15 * want.std()
    # ORT really runs integer kernels: the QDQ pairs were fused away.
    fused = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert {"QLinearConv", "QGemm", "QLinearAdd", "QLinearConcat", "QLinearAveragePool"} <= set(fused)
    assert fused["QLinearConv"] >= 6


def test_qdq_weight_format(qgraph: QuantizedGraph, out_dir: Path) -> None:
    assert export_qdq(qgraph, out_dir / "safe.onnx", weights="safe")
    inits = {t.name: t for t in onnx.load(out_dir / "safe.onnx").graph.initializer}
    for op in qgraph.layers:
        # Weights that could saturate u8 x s8 kernels without VNNI (|w| > 64) are stored as uint8 w + 128.
        w = inits[f"{op.name}/weight"]
        big = np.abs(op.arrays["weight"]).max() > 64
        assert w.data_type == (TensorProto.UINT8 if big else TensorProto.INT8), op.name
        offset = 128 if big else 0
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(w).astype(np.int16) - offset, op.arrays["weight"])
        assert inits[f"{op.name}/bias"].data_type == TensorProto.INT32
    assert any(np.abs(op.arrays["weight"]).max() > 64 for op in qgraph.layers)  # the case above was reached
    assert not export_qdq(qgraph, out_dir / "fast.onnx", weights="int8")
    inits = {t.name: t for t in onnx.load(out_dir / "fast.onnx").graph.initializer}
    assert all(inits[f"{op.name}/weight"].data_type == TensorProto.INT8 for op in qgraph.layers)
    with pytest.raises(LowbitError, match="expected one of auto, int8, safe"):
        export_qdq(qgraph, out_dir / "bad.onnx", weights="uint8")


@pytest.mark.parametrize(("machine", "flags", "exact"), [
    ("x86_64", "fpu avx2 avx512f avx512_vnni", True),
    ("x86_64", "fpu avx2 avx_vnni", True),
    ("x86_64", "fpu avx2 avx512f", False),
    ("x86_64", None, False),  # flags unreadable: assume the worst
    ("aarch64", None, True),
])
def test_auto_onnx_weights_follow_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine: str,
                                          flags: str | None, exact: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(qdq.platform, "machine", lambda: machine)
    assert qdq.u8s8_exact_here(cpuinfo) is exact
    monkeypatch.setattr(qdq, "u8s8_exact_here", lambda: exact)
    assert qdq.saturation_safe_weights("auto") is not exact
    assert qdq.saturation_safe_weights("safe") and not qdq.saturation_safe_weights("int8")


# -- int4 weights ---------------------------------------------------------------------------------------------------

def test_int4_weights(graph: Graph, calib: np.ndarray, inputs: np.ndarray, out_dir: Path) -> None:
    qgraph4 = quantize(graph, calib, QuantConfig(), BitPlan.uniform(graph, 4))
    assert all(np.abs(op.arrays["weight"]).max() <= 7 for op in qgraph4.layers)
    export_integer(qgraph4, out_dir / "int4.int.onnx")
    _assert_bit_exact(_session(out_dir / "int4.int.onnx"), qgraph4, inputs)
    export_qdq(qgraph4, out_dir / "int4.onnx")
    model = onnx.load(out_dir / "int4.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("/weight")}
    assert all(w.dtype == np.int8 and np.abs(w).max() <= 7 for w in weights.values())  # u8 x s8 cannot saturate
    x = get_zoo_entry("small_cnn").heldout(1)
    got = _run(_session(out_dir / "int4.onnx"), qgraph4, x)[qgraph4.outputs[0]]
    want = run_reference(qgraph4, x)[qgraph4.outputs[0]]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


# -- converter coverage and edge cases ------------------------------------------------------------------------------

class _Extras(nn.Module):
    """IR cases small_cnn lacks: a standalone clamp, padded ceil-mode maxpool, padded avgpool, an int8 graph
    output, a linear layer on a 3-D tensor and a table lookup (sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.seq = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = F.max_pool2d(self.conv(x), 3, 2, 1, ceil_mode=True)
        y = torch.clamp(y, -0.5, 0.5)  # a maxpool cannot absorb it: stays a clamp op
        y = F.avg_pool2d(y, 3, 2, 1)
        return self.fc(y.flatten(1)), torch.sigmoid(self.seq(y.flatten(2))), y


@pytest.fixture(scope="module")
def extras() -> QuantizedGraph:
    shape = (3, 15, 15)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _Extras().eval()
    program = torch.export.export(module, (torch.from_numpy(smooth_noise(2, 0, shape)),))
    return quantize(capture(program, "extras"), smooth_noise(32, 1, shape))


def test_every_converter_is_exercised(qgraph: QuantizedGraph, extras: QuantizedGraph) -> None:
    used = {o.op for o in qgraph.ops} | {o.op for o in extras.ops}
    # The encoder's ops run on a tiny BERT in tests/test_bert_integer_backends.py (and in the conformance suite).
    encoder = {"embedding", "add_constant", "permute", "matmul", "softmax", "layer_norm", "masked_mean"}
    assert used | encoder == set(INTEGER_CONVERTERS) == set(QDQ_CONVERTERS)
    assert "clamp" in {o.op for o in extras.ops}
    assert any(v.dtype == "int8" for v in (extras.values[n] for n in extras.int_outputs))


def test_extra_ops_bit_exact(extras: QuantizedGraph, out_dir: Path) -> None:
    x = np.concatenate([smooth_noise(48, 2, (3, 15, 15)), smooth_noise(16, 3, (3, 15, 15)) * 10])
    export_integer(extras, out_dir / "extras.int.onnx")
    assert float_tensors_between(onnx.load(out_dir / "extras.int.onnx")) == []
    session = _session(out_dir / "extras.int.onnx")
    _assert_bit_exact(session, extras, x)
    got = _run(session, extras, x)
    for name, want in run_reference(extras, x).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    export_qdq(extras, out_dir / "extras.onnx")
    got = _run(_session(out_dir / "extras.onnx"), extras, x)
    for name, want in run_reference(extras, x).items():
        np.testing.assert_allclose(got[name], want, atol=0.05 * np.abs(want).max(), err_msg=name)


def _single_layer_ir(kind: str, in_dtype: str, weight: np.ndarray, in_shape: tuple[int, ...]) -> QuantizedGraph:
    """float input -> quantize (scale 1) -> one conv/linear with an int32 output -> dequantize."""
    out_shape = (1, weight.shape[0], *in_shape[2:]) if kind == "conv" else (1, weight.shape[0])
    values = {"x": Value("x", "float32", in_shape), "x_q": Value("x_q", in_dtype, in_shape, 1.0),
              "acc": Value("acc", "int32", out_shape, [1.0] * weight.shape[0], 0, 1),
              "y": Value("y", "float32", out_shape)}
    attrs = {"weight_bits": 8, "weight_scale": [1.0] * weight.shape[0], "input_scale": 1.0}
    if kind == "conv":
        attrs.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    arrays = {"weight": weight, "bias": np.zeros(weight.shape[0], np.int32)}
    ops = [Op("x_quantize", "quantize", ["x"], "x_q"), Op("layer", kind, ["x_q"], "acc", attrs, arrays),
           Op("y_dequantize", "dequantize", ["acc"], "y")]
    return QuantizedGraph(values, ops, ["x"], ["y"], "single")


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("in_dtype", ["uint8", "int8"])
def test_integer_kernels_exact_at_extremes(kind: str, in_dtype: str, out_dir: Path) -> None:
    """Full-range data against +-127 weights: what saturates ORT's u8 x s8 kernels on CPUs without VNNI."""
    rng = np.random.default_rng(1)
    k = 96
    shape = (1, k, 5, 5) if kind == "conv" else (1, k)
    weight = rng.choice(np.array([-127, 127], np.int8), (16, k, 3, 3) if kind == "conv" else (16, k))
    ir = _single_layer_ir(kind, in_dtype, weight, shape)
    lo, hi = qrange(in_dtype)
    x = rng.choice(np.array([lo, hi], np.float32), (8, *shape[1:]))
    path = out_dir / f"single_{kind}_{in_dtype}.int.onnx"
    export_integer(ir, path)
    _assert_bit_exact(_session(path), ir, x)


def _requantize_session(mantissa: np.ndarray, shift: np.ndarray) -> ort.InferenceSession:
    """A model of just the requantization chain, int32 (N, C) -> int32, per-channel constants, no clipping."""
    b = Builder(QuantizedGraph({}, [], [], []))
    lo, hi = qrange("int32")
    emit_requantize(b, "rq", "acc", Requantizer(mantissa, shift, lo, hi, "int32", axis=1), 2, "out")
    channels = len(shift)
    graph = helper.make_graph(b.nodes, "rq", [helper.make_tensor_value_info("acc", TensorProto.INT32, ["N", channels])],
                              [helper.make_tensor_value_info("out", TensorProto.INT32, ["N", channels])],
                              b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return _session(model.SerializeToString())


def test_requantize_chain_matches_dyadic_at_extremes() -> None:
    """The BitShift-based rounding shift against ir.dyadic, for every shift 0..62 and extreme values."""
    lo, hi = qrange("int32")
    rng = np.random.default_rng(2)
    shift = np.arange(63, dtype=np.int64)
    mantissa = rng.integers(1 << 29, 1 << 30, shift.shape)
    mantissa[:3] = [0, (1 << 30) - 1, 1 << 29]
    extremes = np.array([[-(2**31)], [2**31 - 1], [0], [1], [-1]], np.int64).repeat(len(shift), 1)
    acc = np.concatenate([extremes, rng.integers(-(2**31), 2**31, (64, len(shift)))]).astype(np.int32)
    got = _requantize_session(mantissa, shift).run(None, {"acc": acc})[0]
    np.testing.assert_array_equal(got, requantize(acc, mantissa, shift, lo, hi))
    # Exact ties (b = 1, c = 5: acc / 32 = k + 0.5) round up, towards +inf.
    ties = np.array([[48], [-48], [80], [-80]], np.int32)
    got = _requantize_session(np.array([1]), np.array([5])).run(None, {"acc": ties})[0]
    np.testing.assert_array_equal(got.ravel(), [2, -1, 3, -2])
    np.testing.assert_array_equal(got, requantize(ties, np.int64(1), np.int64(5), lo, hi))


def test_unsupported_ir_is_refused(qgraph: QuantizedGraph, out_dir: Path) -> None:
    bad = copy.deepcopy(qgraph)
    bad.ops[1].op = "hardswish"  # a float op: it lowers to `lut` and never reaches an exporter
    with pytest.raises(LowbitError, match="hardswish"):
        export_integer(bad, out_dir / "bad.int.onnx")
    with pytest.raises(LowbitError, match="hardswish"):
        export_qdq(bad, out_dir / "bad.onnx")
