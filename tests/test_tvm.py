"""The TVM backend: every kernel bit-exact with the reference executor, the runtime, and the CLI commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.cli.main import lowbit  # noqa: E402
from lowbit.codegen.tvm import compile_to, lower, parse_target  # noqa: E402
from lowbit.codegen.tvm.compile import layer_kernels, x86_layer_kernels  # noqa: E402
from lowbit.codegen.tvm.latency import measure_layers  # noqa: E402
from lowbit.codegen.tvm.x86.isa import PMADDUBSW  # noqa: E402
from lowbit.codegen.tvm.x86.requant import _acc_window, acc_bound, f64_requant_is_exact  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.ir import Op, QuantizedGraph, Value  # noqa: E402
from lowbit.ir.dtypes import qrange  # noqa: E402
from lowbit.ir.dyadic import dyadic  # noqa: E402
from lowbit.ir.weights import u8s8_pairs_exact, weight_range  # noqa: E402
from lowbit.models import get_zoo_entry  # noqa: E402
from lowbit.models.loading import load_program  # noqa: E402
from lowbit.models.small_cnn import smooth_noise  # noqa: E402
from lowbit.quantizer.capture import capture  # noqa: E402
from lowbit.quantizer.config import BitPlan, QuantConfig  # noqa: E402
from lowbit.quantizer.quantize import int16_candidates, integer_readers, quantize  # noqa: E402
from lowbit.quantizer.reference import run_reference  # noqa: E402
from lowbit.runtime import load  # noqa: E402
from lowbit.runtime import loader as runtime_loader  # noqa: E402

TARGET = "llvm -mcpu=native"
INPUT_STEP = 1 / 16  # float inputs are integers times this, so the input quantize recovers them exactly


BEST_KERNELS = layer_kernels(parse_target(TARGET))[2]
KERNEL_SETS = [
    pytest.param("x86-avx2", marks=pytest.mark.skipif(BEST_KERNELS == "portable", reason="this CPU has no AVX2")),
    pytest.param("x86-vnni", marks=pytest.mark.skipif(BEST_KERNELS != "x86-vnni",
                                                      reason="this CPU has no VNNI (AVX-512 VNNI or AVX-VNNI)")),
    "portable",
]


def _run_compiled(qgraph: QuantizedGraph, x: np.ndarray, kernels: str | None = None) -> np.ndarray:
    """Compile for this CPU with its best kernels (`kernels` None or that set's name) or the named one, and run."""
    if kernels == "portable":
        conv2d, dense = None, None
    elif kernels == "x86-avx2":  # AVX2 only: no VNNI, no AVX-512 rounding conversions
        conv2d, dense, _ = x86_layer_kernels(parse_target(TARGET), vnni=False)
    else:
        conv2d, dense, _ = layer_kernels(parse_target(TARGET))
    lowered = lower(qgraph, conv2d, dense, fuse_residuals=kernels != "portable")
    executable = tvm.compile(lowered.mod, target=tvm.target.Target(parse_target(TARGET)))
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in lowered.params.values()]
    batch = qgraph.values[qgraph.inputs[0]].shape[0]
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + batch]), *params).numpy()
                           for i in range(0, len(x), batch)])


def _random_ints(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    lo, hi = qrange(dtype)
    return rng.integers(lo, hi + 1, shape)


def _one_layer(op: str, x_shape: tuple[int, ...], x_dtype: str, weight_shape: tuple[int, ...], out_shape: tuple,
               attrs: dict, bits: int, requantize: bool, out_dtype: str, rng: np.random.Generator,
               ratios: tuple[float, float] = (2e-4, 5e-3), max_bias: int = 3000) -> QuantizedGraph:
    """quantize -> one conv/linear with random integer weights -> dequantize (`ratios`: requantize multipliers)."""
    lo, hi = weight_range(bits)
    cout = weight_shape[0]
    arrays = {"weight": rng.integers(lo, hi + 1, weight_shape).astype(np.int8),
              "bias": rng.integers(-max_bias, max_bias, cout).astype(np.int32)}
    if requantize:
        arrays["multiplier"], arrays["shift"] = dyadic(rng.uniform(*ratios, cout))
        qmin, qmax = qrange(out_dtype)
        y_q = Value("y_q", out_dtype, out_shape, 0.05)
    else:
        qmin, qmax = 0, 0
        out_dtype = "int32"
        y_q = Value("y_q", "int32", out_shape, list(rng.uniform(1e-4, 1e-3, cout)), axis=1)
    values = {"x": Value("x", "float32", x_shape), "x_q": Value("x_q", x_dtype, x_shape, INPUT_STEP),
              "y_q": y_q, "y": Value("y", "float32", out_shape)}
    ops = [Op("x_quantize", "quantize", ["x"], "x_q"),
           Op("layer", op, ["x_q"], "y_q", {**attrs, "weight_bits": bits, "qmin": qmin, "qmax": qmax}, arrays),
           Op("y_dequantize", "dequantize", ["y_q"], "y")]
    return QuantizedGraph(values, ops, ["x"], ["y"], f"one_{op}")


CONV_CASES = {
    # name: (N, C, H, W, OC, kernel, stride, padding, dilation, groups, bits, input dtype, requantize)
    "odd_shapes_stride2": (1, 3, 17, 13, 7, 3, 2, 1, 1, 1, 8, "uint8", True),
    "depthwise_batch2": (2, 8, 9, 9, 8, 3, 1, 1, 1, 8, 8, "int8", True),
    "depthwise_stride2_int4": (1, 16, 12, 11, 16, 3, 2, 1, 1, 16, 4, "uint8", True),
    "depthwise_5x5_stride2_24ch": (1, 24, 11, 10, 24, 5, 2, 2, 1, 24, 8, "uint8", True),
    # channels that fill whole vectors: read in place, bounds-checked at the borders
    "depthwise_in_place_dilated": (1, 32, 10, 9, 32, 3, 1, 2, 2, 32, 8, "int8", True),
    "depthwise_in_place_no_interior": (1, 16, 2, 3, 16, 3, 1, 1, 1, 16, 8, "uint8", True),
    # VNNI: 32 channels at a time, four taps per vpdpbusd; channel counts that are not a multiple of 32 overlap
    "depthwise_quads_48ch_stride2": (1, 48, 11, 10, 48, 3, 2, 1, 1, 48, 8, "int8", True),
    "depthwise_quads_5x5_40ch": (1, 40, 9, 12, 40, 5, 1, 2, 1, 40, 8, "uint8", True),
    "depthwise_quads_int32_output": (2, 32, 6, 7, 32, 3, 1, 1, 1, 32, 8, "uint8", False),
    # an RGB input at least 16 pixels wide is quantized 16 pixels at a time and interleaved into NHWC
    "rgb_input_wide": (1, 3, 9, 37, 8, 3, 2, 1, 1, 1, 8, "int8", True),
    "grouped": (1, 6, 10, 10, 9, 3, 1, 0, 1, 3, 8, "int8", True),
    "grouped_padded_dilated": (1, 6, 9, 9, 9, 3, 1, 1, 2, 3, 8, "int8", True),  # byte-wise im2col from the padded copy
    "pointwise_int4_odd_channels": (1, 13, 8, 7, 11, 1, 1, 0, 1, 1, 4, "uint8", True),
    "int4_int32_output": (1, 5, 7, 7, 3, 3, 1, 1, 1, 1, 4, "int8", False),
    "dilated_5x5": (1, 4, 15, 15, 6, 5, 1, 2, 2, 1, 8, "int8", True),
    "pointwise_wide": (1, 96, 14, 14, 40, 1, 1, 0, 1, 1, 8, "int8", True),
    # more weights than activations: column tiles outer, the input packed in its own pass
    "pointwise_columns_outer": (1, 24, 5, 6, 48, 1, 1, 0, 1, 1, 8, "int8", True),
    # 7-bit weights: on AVX2, u8 x s8 byte pairs (vpmaddubsw) on the VNNI layout, word-row im2col included
    "pointwise_int7": (1, 96, 6, 7, 24, 1, 1, 0, 1, 1, 7, "int8", True),
    "int7_3x3_stride2": (1, 8, 11, 9, 20, 3, 2, 1, 1, 1, 7, "uint8", True),
}


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_kernels_match_the_reference(case: str, kernels: str) -> None:
    n, c, h, w, oc, k, s, p, d, g, bits, x_dtype, requantize = CONV_CASES[case]
    rng = np.random.default_rng(len(case))
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    attrs = {"stride": [s, s], "padding": [p, p], "dilation": [d, d], "groups": g}
    out_dtype = "uint8" if x_dtype == "uint8" else "int8"
    qgraph = _one_layer("conv", (n, c, h, w), x_dtype, (oc, c // g, k, k), (n, oc, oh, ow), attrs, bits, requantize,
                        out_dtype, rng)
    x = (_random_ints(rng, (3 * n, c, h, w), x_dtype) * INPUT_STEP).astype(np.float32)
    np.testing.assert_array_equal(_run_compiled(qgraph, x, kernels), run_reference(qgraph, x)["y"])


def _conv_then_add(channels: int, y_first: bool, skip_dtype: str, out_dtype: str,
                   rng: np.random.Generator) -> QuantizedGraph:
    """quantize -> pointwise conv -> add(conv output, the conv's input) -> dequantize, with random integers."""
    shape = (1, channels, 7, 9)
    lo, hi = weight_range(8)
    conv = {"weight": rng.integers(lo, hi + 1, (channels, channels, 1, 1)).astype(np.int8),
            "bias": rng.integers(-3000, 3000, channels).astype(np.int32)}
    conv["multiplier"], conv["shift"] = dyadic(rng.uniform(2e-4, 5e-3, channels))
    ratios = rng.uniform(0.3, 1.5, 2)
    _, shift = dyadic(ratios.max())
    add = {"multiplier": np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32), "shift": shift.astype(np.int32)}
    values = {"x": Value("x", "float32", shape), "x_q": Value("x_q", skip_dtype, shape, INPUT_STEP),
              "y_q": Value("y_q", "int8", shape, 0.05), "z_q": Value("z_q", out_dtype, shape, 0.05),
              "z": Value("z", "float32", shape)}
    qmin, qmax = qrange(out_dtype)
    ops = [Op("x_quantize", "quantize", ["x"], "x_q"),
           Op("conv", "conv", ["x_q"], "y_q", {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                                               "weight_bits": 8, "qmin": -128, "qmax": 127}, conv),
           Op("add", "add", ["y_q", "x_q"] if y_first else ["x_q", "y_q"], "z_q", {"qmin": qmin, "qmax": qmax}, add),
           Op("z_dequantize", "dequantize", ["z_q"], "z")]
    return QuantizedGraph(values, ops, ["x"], ["z"], "conv_add")


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize(("channels", "y_first", "skip_dtype", "out_dtype"),
                         [(16, True, "int8", "int8"), (24, False, "uint8", "uint8"), (12, True, "int8", "int8")])
def test_residual_add_fused_into_the_conv_matches_the_reference(channels: int, y_first: bool, skip_dtype: str,
                                                                out_dtype: str, kernels: str) -> None:
    rng = np.random.default_rng(channels)
    qgraph = _conv_then_add(channels, y_first, skip_dtype, out_dtype, rng)
    x = (_random_ints(rng, (3, *qgraph.values["x"].shape[1:]), skip_dtype) * INPUT_STEP).astype(np.float32)
    np.testing.assert_array_equal(_run_compiled(qgraph, x, kernels), run_reference(qgraph, x)["z"])
    # lowbit's x86 kernels compute the add in the conv's epilogue where its channels fill whole vectors of 8
    conv2d = None if kernels == "portable" else layer_kernels(parse_target(TARGET))[0]
    functions = {gv.name_hint for gv in lower(qgraph, conv2d, fuse_residuals=conv2d is not None).mod.functions}
    assert ("add" not in functions) == (kernels != "portable" and channels % 8 == 0), functions


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize(("n", "k", "out", "bits", "requantize"), [(1, 37, 11, 4, True), (3, 64, 10, 8, False),
                                                                   (1, 1280, 1000, 8, False)])
def test_dense_kernels_match_the_reference(n: int, k: int, out: int, bits: int, requantize: bool,
                                           kernels: str) -> None:
    rng = np.random.default_rng(k)
    qgraph = _one_layer("linear", (n, k), "uint8", (out, k), (n, out), {}, bits, requantize, "int8", rng)
    x = (_random_ints(rng, (2 * n, k), "uint8") * INPUT_STEP).astype(np.float32)
    np.testing.assert_array_equal(_run_compiled(qgraph, x, kernels), run_reference(qgraph, x)["y"])


@pytest.mark.parametrize("kernels", KERNEL_SETS)
def test_byte_pair_gemm_is_exact_at_its_bound(kernels: str) -> None:
    """Weights of +-64 against int8 inputs of -128 and 127 (bytes 0 and 255): u8 x s8 pair sums reach
    +-255 * 128, the most the byte-pair path admits, and must not saturate."""
    rng = np.random.default_rng(7)
    qgraph = _one_layer("linear", (5, 72), "int8", (24, 72), (5, 24), {}, 7, False, "int8", rng)
    weight = qgraph.op("layer").arrays["weight"]
    weight[:] = rng.choice(np.array([-64, 64], np.int8), weight.shape)
    assert u8s8_pairs_exact(weight) and not u8s8_pairs_exact(np.append(weight, np.int8(65)))
    x = rng.choice(np.array([-128, 127]), (10, 72)) * INPUT_STEP
    np.testing.assert_array_equal(_run_compiled(qgraph, x.astype(np.float32), kernels), run_reference(qgraph, x)["y"])
    if kernels == "x86-avx2":  # the path under test ran
        _, dense, _ = x86_layer_kernels(parse_target(TARGET), vnni=False)
        assert PMADDUBSW in lower(qgraph, None, dense).mod.script()


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize(("ratios", "max_bias", "float64_path"), [((2e-5, 1e-4), 3000, True),
                                                                    ((1e-7, 3e-7), 300_000_000, False)])
def test_both_requantize_paths_match_the_reference(ratios: tuple[float, float], max_bias: int, float64_path: bool,
                                                   kernels: str) -> None:
    """The x86 kernels requantize in float64 where that is exact, else with int64 arithmetic."""
    rng = np.random.default_rng(5)
    qgraph = _one_layer("linear", (2, 300), "uint8", (24, 300), (2, 24), {}, 8, True, "int8", rng, ratios, max_bias)
    op = qgraph.op("layer")
    assert f64_requant_is_exact(op.arrays["multiplier"], op.arrays["shift"], -128, 127) == float64_path
    x = (_random_ints(rng, (8, 300), "uint8") * INPUT_STEP).astype(np.float32)
    expected = run_reference(qgraph, x)["y"]
    assert np.unique(expected).size > 10  # the outputs are not all clipped or zero
    np.testing.assert_array_equal(_run_compiled(qgraph, x, kernels), expected)


def test_float64_requantize_exactness_bound() -> None:
    """Where f64_requant_is_exact says so, clip(floor(acc * m/2^s + 1/2)) in float64 equals the integer rule for
    every int32 acc: inside the clamp window, at its edges, and far outside it (no clamp of acc needed)."""
    rng = np.random.default_rng(0)
    checked = 0
    for ratio in np.exp(rng.uniform(np.log(1e-9), np.log(10.0), 300)):
        (m,), (s,) = dyadic(np.array([ratio]))
        m, s = int(m), int(s)
        if not f64_requant_is_exact(np.array([m]), np.array([s]), -128, 127):
            continue
        lo, hi = _acc_window(m, s, -128, 127)
        acc = np.concatenate([  # mostly inside the window, plus both edges and the whole int32 range
            rng.integers(max(lo - 1000, -(1 << 31)), min(hi + 1000, (1 << 31) - 1), 2000, dtype=np.int64),
            rng.integers(-(1 << 31), 1 << 31, 200, dtype=np.int64), np.array([-(1 << 31), (1 << 31) - 1])])
        exact = np.clip((acc * m + ((1 << s) >> 1)) >> s, -128, 127)  # |acc * m| < 2^61: no int64 overflow
        approx = np.clip(np.floor(acc.astype(np.float64) * np.ldexp(float(m), -s) + 0.5), -128, 127)
        np.testing.assert_array_equal(approx, exact)
        checked += 1
    assert checked > 100


def test_float64_requantize_counts_only_reachable_accumulators() -> None:
    """A tiny multiplier has a huge clamp window; what the weights, bias and input can reach decides instead."""
    weight = np.full((2, 3, 3, 3), 127, np.int8)
    bias = np.array([1000, -1000], np.int32)
    bound = acc_bound(weight, bias, "int8")
    np.testing.assert_array_equal(bound, 1000 + 27 * 127 * 128)
    m, s = np.array([804361747, 804361747]), np.array([46, 46])  # from MobileNetV2's first conv: window ~2^24
    assert not f64_requant_is_exact(m, s, -128, 127)
    assert f64_requant_is_exact(m, s, -128, 127, bound)
    acc = np.arange(-int(bound[0]), int(bound[0]) + 1, dtype=np.int64)
    exact = np.clip((acc * int(m[0]) + (1 << 45)) >> 46, -128, 127)
    approx = np.clip(np.floor(acc.astype(np.float64) * np.ldexp(float(m[0]), -46) + 0.5), -128, 127)
    np.testing.assert_array_equal(approx, exact)


# -- whole models ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cnn() -> tuple:
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    return graph, get_zoo_entry("small_cnn").calibration(0)


def test_small_cnn_int8_is_bit_exact_on_100_inputs(small_cnn: tuple) -> None:
    """Every op kind (conv, depthwise, grouped, pad, add, max/avg pool, concat, reshape, linear) in one model."""
    graph, calib = small_cnn
    qgraph = quantize(graph, calib)
    x = smooth_noise(100, 7)
    np.testing.assert_array_equal(_run_compiled(qgraph, x), run_reference(qgraph, x)[qgraph.outputs[0]])


def test_small_cnn_mixed_int4_int8_is_bit_exact_on_100_inputs(small_cnn: tuple) -> None:
    graph, calib = small_cnn
    plan = BitPlan({node.name: 4 if i % 2 else 8 for i, node in enumerate(graph.layers)})
    qgraph = quantize(graph, calib, QuantConfig(rounding="nearest"), plan)
    assert sorted(set(qgraph.bit_plan().values())) == [4, 8]
    x = smooth_noise(100, 8)
    np.testing.assert_array_equal(_run_compiled(qgraph, x), run_reference(qgraph, x)[qgraph.outputs[0]])


def test_an_avx2_build_points_int8_layers_to_7_bit_weights(small_cnn: tuple, tmp_path: Path) -> None:
    # Haswell: AVX2 without VNNI, whatever CPU builds it. Its int8 layers get a note, 7-bit ones (byte pairs) none.
    graph, calib = small_cnn
    notes: list[str] = []
    for bits in (8, 7):
        qgraph = quantize(graph, calib, QuantConfig(rounding="nearest", bits=bits), BitPlan.uniform(graph, bits))
        (tmp_path / str(bits)).mkdir()
        messages: list[str] = []
        meta = compile_to(qgraph, tmp_path / str(bits), "llvm -mcpu=haswell", log=messages.append)
        assert meta["kernels"] == "x86-avx2"
        notes.append(" ".join(m for m in messages if m.startswith("note: no VNNI")))
    assert "--bits 7" in notes[0] and not notes[1]


def test_unsupported_ops_are_listed_at_once(small_cnn: tuple) -> None:
    graph, calib = small_cnn
    qgraph = quantize(graph, calib)
    qgraph.ops[2].op = "hardswish"  # float ops: they lower to `lut` and never reach a backend
    qgraph.ops[5].op = "gelu"
    with pytest.raises(LowbitError, match=r"2 op\(s\).*\(hardswish\).*\(gelu\)"):
        lower(qgraph)


def test_target_parsing() -> None:
    target = parse_target("llvm -mcpu=native -num-cores=2")
    assert target["kind"] == "llvm" and target["mcpu"] != "native" and target["num-cores"] == 2
    for bad in ("x86", "llvm mcpu", "llvm -mcpu=notacpu", "cuda"):
        with pytest.raises(LowbitError, match="--target"):
            parse_target(bad)


def test_per_layer_latency_table(small_cnn: tuple) -> None:
    graph, calib = small_cnn
    uniform = {b: quantize(graph, calib, QuantConfig(rounding="nearest"), BitPlan.uniform(graph, b)) for b in (4, 8)}
    wide = {t: 16 for t in int16_candidates(graph)}
    wide_input = quantize(graph, calib, QuantConfig(rounding="nearest"), BitPlan(BitPlan.uniform(graph, 8).bits, wide))
    table = measure_layers(uniform, repeats=2, min_ms=1, wide_input=wide_input)
    assert sorted(table.ms) == sorted(n.name for n in graph.layers)
    assert all(set(row) == {4, 8} and all(v > 0 for v in row.values()) for row in table.ms.values())
    assert table.source.startswith("tvm")
    # Every layer that reads a 16-bit tensor is timed on it too. Not asserted: that the time is positive, a
    # timing that noise on a shared machine can flip on layers this small.
    readers = {layer for t in wide for layer in integer_readers(graph, t)}
    assert set(table.wide_input_ms) == readers and readers
    assert all(np.isfinite(table.wide_input_extra(layer)) for layer in readers)


# -- artifact, runtime and CLI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tvm") / "sc"
    result = CliRunner().invoke(lowbit, ["quantize", "zoo:small_cnn", "-o", str(out), "--target", TARGET])
    assert result.exit_code == 0, result.output
    return out


def test_quantize_compiles_and_checks_bit_exactness(artifact: Path) -> None:
    report = json.loads((artifact / "report.json").read_text())
    assert report["tvm"]["bit_exact"] and report["tvm"]["inputs"] == {"total": 80, "heldout": 64, "random": 8,
                                                                       "saturating": 8}
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert {"tvm/model.so", "tvm/params.npz", "tvm/tvm.json"} <= set(manifest["files"])
    meta = json.loads((artifact / "tvm" / "tvm.json").read_text())
    assert meta["target_string"] == manifest["tvm"]["target"] and "avx2" in meta["required_features"]


def test_runtime_matches_onnxruntime_on_the_integer_model(artifact: Path) -> None:
    import onnxruntime as ort

    x = smooth_noise(5, 11)
    session = ort.InferenceSession(str(artifact / "model.int.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    model = load(artifact)
    np.testing.assert_array_equal(model.run(x), want)
    stats = model.benchmark(repeats=5, warmup=1)
    assert 0 < stats["min_ms"] <= stats["median_ms"]
    with pytest.raises(LowbitError, match="expected shape"):
        model.run(x[:, :2])


@pytest.mark.skipif(runtime_loader._USER_THREADS is not None, reason="TVM_NUM_THREADS is set by the user")
def test_runtime_uses_the_targets_cores(artifact: Path) -> None:
    """TVM alone would take half the logical CPUs; the runtime gives its pool the target's cores."""
    model = load(artifact)
    want = min(int(model.meta["target"]["num-cores"]), runtime_loader.available_cpus())
    assert tvm.get_global_func("runtime.NumThreads")() == want


def test_runtime_refuses_modified_files(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with open(copy / "tvm" / "params.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(LowbitError, match="params.npz: sha256"):
        load(copy)


def test_runtime_refuses_a_cpu_without_the_targets_features(artifact: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    meta = json.loads((artifact / "tvm" / "tvm.json").read_text())
    meta["required_features"] = [*meta["required_features"], "avx512vnni"]
    monkeypatch.setattr(runtime_loader, "host_features", lambda: ["sse4.2", "avx", "avx2", "fma"])
    with pytest.raises(LowbitError, match="avx512vnni.*recompile"):
        runtime_loader._check_device(meta)


def test_cli_compile_run_and_bench(artifact: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(lowbit, ["compile", str(artifact)])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(lowbit, ["compile", str(artifact), "--force"])
    assert result.exit_code == 0, result.output
    assert "bit-exact with the reference" in result.output

    x = smooth_noise(3, 12)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(lowbit, ["run", str(artifact), "--input", str(tmp_path / "x.npy"),
                                    "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), load(artifact).run(x))

    result = runner.invoke(lowbit, ["bench", str(artifact), "--repeats", "3", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)
    assert set(bench["latency_ms"]) == {"tvm", "onnxruntime:model.onnx", "onnxruntime:model.int.onnx"}
    assert bench["ratios"]["tvm / onnxruntime:model.onnx"] > 0


def test_tuning_records_are_reused_and_tuned_kernels_are_exact(small_cnn: tuple, tmp_path: Path) -> None:
    """A record in the cache (here: the portable schedule's trace) is found again and gives exact kernels."""
    from tvm.s_tir import meta_schedule as ms

    from lowbit.codegen.tvm import kernels, tune

    graph, calib = small_cnn
    qgraph = quantize(graph, calib)
    target = parse_target(TARGET)
    directory = tune.database_dir(tmp_path, target)
    database = tune.open_database(directory)
    for mod in tune.layer_workloads(qgraph).values():
        sch = tvm.s_tir.Schedule(mod)
        kernels.schedule_reduction(sch)
        record = ms.database.TuningRecord(sch.trace, database.commit_workload(mod), [1e-4],
                                          tvm.target.Target(target), ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        database.commit_tuning_record(record)

    reopened = tune.open_database(directory)  # records persist on disk
    conv2d, dense, _ = layer_kernels(target)
    tuned = tune.TunedKernels(reopened, target, conv2d, dense, min_speedup=0.0)
    lowered = lower(qgraph, tuned.conv2d, tuned.dense)
    assert [c["kernel"] for c in tuned.choices] == ["tuned"] * len(graph.layers)
    executable = tvm.compile(lowered.mod, target=tvm.target.Target(target))
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in lowered.params.values()]
    x = smooth_noise(8, 9)
    got = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1]), *params).numpy() for i in range(len(x))])
    np.testing.assert_array_equal(got, run_reference(qgraph, x)[qgraph.outputs[0]])
