"""The real MobileNetV2 and MNIST ResNet end to end through the CLI (slow: run by .ci/run, -m "slow or not slow")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lowbit.cli.main import lowbit
from lowbit.codegen import float_tensors_between
from lowbit.ir import QuantizedGraph
from lowbit.models import get_zoo_entry
from lowbit.pipeline.artifact import verify_manifest
from lowbit.quantizer.reference import run_reference


@pytest.mark.slow
def test_mobilenet_v2_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "mnv2"
    result = CliRunner().invoke(lowbit, ["quantize", "zoo:mobilenet_v2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert verify_manifest(out) == []

    report = json.loads((out / "report.json").read_text())
    # Regression floors on the real model and real held-out photos; the measured figures are in
    # BENCHMARKS.md's MobileNetV2 section (benchmarks/bench_mobilenet_v2.py).
    assert report["fidelity"]["top1_agreement"] >= 0.80
    assert report["labelled"]["top1_int8"] >= report["labelled"]["top1_fp32"] - 0.05

    # The integer-only ONNX equals the reference executor bit for bit, with no float inside.
    model = onnx.load(out / "model.int.onnx")
    assert float_tensors_between(model) == []
    qgraph = QuantizedGraph.load(out / "ir")
    x = get_zoo_entry("mobilenet_v2").heldout(0)[:24]
    session = ort.InferenceSession(str(out / "model.int.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {qgraph.inputs[0]: x}), strict=True))
    for name, expected in run_reference(qgraph, x, integer_outputs=True).items():
        np.testing.assert_array_equal(got[name], expected)

    # quantize itself checked ORT and TVM on the integers, on every held-out input plus random and saturating ones.
    for check in (report["onnxruntime"]["model.int.onnx"], report["tvm"]):
        assert check["bit_exact"] and check["inputs"]["heldout"] == report["heldout"]["samples"] >= 100
        assert check["inputs"]["saturating"] > 0


@pytest.mark.slow
def test_mobilenet_v2_mixed_int4_int8_compiles_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from lowbit.codegen.tvm import compile_to
    from lowbit.models.loading import load_program
    from lowbit.quantizer.capture import capture
    from lowbit.quantizer.config import BitPlan, QuantConfig
    from lowbit.quantizer.quantize import quantize
    from lowbit.runtime import load

    entry = get_zoo_entry("mobilenet_v2")
    graph = capture(load_program("zoo:mobilenet_v2", None), "mobilenet_v2")
    # Pointwise and depthwise layers alternate between 4 and 8 bits; first and last stay at 8.
    plan = BitPlan({n.name: 4 if 0 < i < len(graph.layers) - 1 and i % 2 else 8 for i, n in enumerate(graph.layers)})
    qgraph = quantize(graph, entry.calibration(0)[:16], QuantConfig(rounding="nearest"), plan)
    compile_to(qgraph, tmp_path, "llvm -mcpu=native")
    x = entry.heldout(0)[:100]
    np.testing.assert_array_equal(load(tmp_path, verify=False).run(x), run_reference(qgraph, x)[qgraph.outputs[0]])


@pytest.mark.slow
def test_mobilenet_v2_sensitivity(tmp_path: Path) -> None:
    out = tmp_path / "sens"
    result = CliRunner().invoke(lowbit, ["sensitivity", "zoo:mobilenet_v2", "-o", str(out), "--check-configs", "12"])
    assert result.exit_code == 0, result.output
    sens = json.loads((out / "sensitivity.json").read_text())
    # Each layer's weights at 4 and 8 bits, and each of the 64 tensors that may be 16-bit at 8 and 16 bits.
    assert len(sens["layers"]) == 53 and len(sens["keys"]) == 53 * 2 + 64 * 2
    # Traces converge: with the exact head classes every 95% interval ends within a few percent.
    assert max(layer["trace_half_width"] / layer["trace"] for layer in sens["layers"]) <= 0.15
    # The quadratic model ranks real loss increases well (measured 0.95 on 30 plans; 12 here).
    assert sens["check"]["spearman"]["cross"] >= 0.8


@pytest.mark.slow
def test_mnist_cnn_end_to_end(tmp_path: Path) -> None:
    # A second trained family (dense 3x3 convs, max pool, projection shortcuts), scored against true labels.
    out = tmp_path / "mnist"
    result = CliRunner().invoke(lowbit, ["quantize", "zoo:mnist_cnn", "-o", str(out), "--target", "none"])
    assert result.exit_code == 0, result.output
    assert verify_manifest(out) == []
    report = json.loads((out / "report.json").read_text())
    # Measured: 100% agreement on 256 held-out digits, 99.15% labelled top-1 for both FP32 and INT8
    # (2000 test digits). The floors leave room for recipe changes, not for a broken model.
    assert report["fidelity"]["top1_agreement"] >= 0.98
    labelled = report["labelled"]
    assert labelled["samples"] == 2000 and labelled["top1_fp32"] >= 0.985
    assert labelled["top1_int8"] >= labelled["top1_fp32"] - 0.005
    check = report["onnxruntime"]["model.int.onnx"]
    assert check["bit_exact"] and check["inputs"]["heldout"] == 256 and check["inputs"]["saturating"] > 0
    assert report["integer_only"]
