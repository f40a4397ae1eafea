"""int16 activations chosen by the bit plan: the plan file, its validation, and whole models bit-exact in every
backend (the per-op cases and the accumulator bound are in test_conformance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lowbit.codegen.onnx import export_integer
from lowbit.errors import LowbitError
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import PLAN_FORMAT, BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference
from lowbit.quantizer.simulate import dequantized_params, fake_quantizers, simulate

# small_cnn's tensors kept at 16 bits below, and what reads them: the input (quantize), relu -> pad -> a conv
# with padding, hardtanh -> a depthwise conv and the residual add, add -> maxpool -> a grouped conv, relu_3 ->
# global avgpool and maxpool -> reshape, cat_1 -> fc1 (a linear), relu_4 -> fc2 (a graph output: its int32 logits
# are rounded from a wider accumulator).
INT16_TENSORS = ("x", "relu", "hardtanh", "add", "relu_3", "cat_1", "relu_4")
FIXED = QuantConfig(calib_method="minmax", rounding="nearest")  # no recipe choice: both plans get one threshold


@pytest.fixture(scope="module")
def small_cnn() -> tuple[Graph, np.ndarray]:
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    return graph, get_zoo_entry("small_cnn").calibration(0)[:32]


def _plan(graph: Graph, tensors: tuple[str, ...]) -> BitPlan:
    return BitPlan({n.name: 8 for n in graph.layers}, dict.fromkeys(tensors, 16))


def test_plan_files_keep_activation_bits_and_old_ones_still_load(tmp_path: Path) -> None:
    plan = BitPlan({"a": 4, "b": 8}, {"relu": 16})
    plan.save(tmp_path / "plan.json", model="m")
    loaded = BitPlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.activation("relu") == 16 and loaded.activation("other") == 8
    (tmp_path / "old.json").write_text(json.dumps({"format": PLAN_FORMAT, "bits": {"a": 4}}))
    assert BitPlan.load(tmp_path / "old.json") == BitPlan({"a": 4})
    BitPlan({"a": 4}).save(tmp_path / "uniform.json")  # an all-8-bit plan writes no activation_bits
    assert "activation_bits" not in json.loads((tmp_path / "uniform.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({"format": PLAN_FORMAT, "bits": {}, "activation_bits": [1]}))
    with pytest.raises(LowbitError, match="activation_bits"):
        BitPlan.load(tmp_path / "bad.json")


def test_the_plan_names_every_tensor_that_cannot_be_int16(small_cnn: tuple[Graph, np.ndarray]) -> None:
    graph, _ = small_cnn
    plan = BitPlan({n.name: 8 for n in graph.layers},
                   {"nope": 16, "pad": 16, "stem.0": 16, "fc2": 16, "relu": 24, "add": 16})
    with pytest.raises(LowbitError) as error:
        plan.validate(graph)
    message = str(error.value)
    assert "nope: no such tensor" in message
    assert "pad: it has no scale of its own" in message and "stem.0: it has no scale of its own" in message
    assert "fc2: a graph output of a layer" in message
    assert "relu=24: supported activation bit-widths are 8 and 16" in message
    assert "add:" not in message  # a valid choice is not blamed


class _TableAfterPool(torch.nn.Module):
    """conv -> maxpool -> hardswish: the maxpool passes its input's grid on, to a table lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.hardswish(torch.nn.functional.max_pool2d(self.conv(x), 2))


def test_table_lookups_refuse_int16_inputs_even_behind_scale_preserving_ops() -> None:
    x = torch.zeros(1, 3, 8, 8)
    graph = capture(torch.export.export(_TableAfterPool().eval(), (x,)), "table")
    conv = graph.layers[0].name
    with pytest.raises(LowbitError, match=rf"{conv}: read by \S+ \(hardswish\), and hardswish cannot take int16: "
                                          "it lowers to a 256-entry table lookup"):
        BitPlan({conv: 8}, {conv: 16}).validate(graph)
    table = next(n.name for n in graph.nodes if n.op == "hardswish")
    BitPlan({conv: 8}, {table: 16}).validate(graph)  # a table may write int16


def test_small_cnn_with_int16_tensors_is_bit_exact_in_every_backend(small_cnn: tuple[Graph, np.ndarray],
                                                                    tmp_path: Path) -> None:
    tvm = pytest.importorskip("tvm")
    from lowbit.codegen.tvm.compile import build
    from lowbit.codegen.tvm.target import DEFAULT_TARGET, parse_target

    graph, calib = small_cnn
    qgraph = quantize(graph, calib, FIXED, _plan(graph, INT16_TENSORS))
    int16 = sorted(v.name for v in qgraph.values.values() if v.dtype == "int16")
    assert int16 == ["add", "cat_1", "hardtanh", "max_pool2d", "max_pool2d_1", "pad", "relu", "relu_3", "relu_4",
                     "view", "x_q"]
    x = get_zoo_entry("small_cnn").heldout(0)[:6]
    x = np.concatenate([x, 40 * x])  # the second half saturates
    want = run_reference(qgraph, x, integer_outputs=True)[qgraph.int_outputs[0]]
    export_integer(qgraph, tmp_path / "m.int.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.int.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(qgraph.int_outputs, {"x": x})[0], want, err_msg="ONNX Runtime")
    executable, lowered, _ = build(qgraph, parse_target(DEFAULT_TARGET), integer_outputs=True)
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in lowered.params.values()]
    got = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1]), *params)[1].numpy() for i in range(len(x))])
    np.testing.assert_array_equal(got, want, err_msg="TVM")


def test_int16_tensors_are_simulated_on_their_grid(small_cnn: tuple[Graph, np.ndarray]) -> None:
    graph, calib = small_cnn
    wide = quantize(graph, calib, FIXED, _plan(graph, ("relu",)))
    narrow = quantize(graph, calib, FIXED, _plan(graph, ()))
    fq16, fq8 = fake_quantizers(wide)["relu"], fake_quantizers(narrow)["relu"]
    assert (fq16.qmin, fq16.qmax, fq8.qmin, fq8.qmax) == (0, 32767, 0, 255)  # ReLU: a signed int16, clamped at 0
    assert fq16.scale == pytest.approx(fq8.scale * 255 / 32767, rel=1e-6)  # one threshold, 128 times finer steps
    x = torch.from_numpy(get_zoo_entry("small_cnn").heldout(0)[:16])
    seen, quantizers = {}, fake_quantizers(wide)

    def round_and_record(name: str, t: torch.Tensor) -> torch.Tensor:  # simulate's rounding, kept for a look
        seen[name] = quantizers[name](t) if name in quantizers else t
        return seen[name]

    run_graph(graph, x, round_and_record, *dequantized_params(wide))
    relu = seen["relu"].numpy() / fq16.scale
    assert np.abs(relu - np.round(relu)).max() < 1e-2 and 255 < relu.max() <= 32767  # int16 steps, not uint8's
    # The simulation differs from the integer reference only in requantization rounding.
    sim, reference = simulate(graph, wide, x)["fc2"].numpy(), run_reference(wide, x.numpy())["fc2"]
    assert np.abs(sim - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.slow
def test_small_cnn_pipeline_with_two_int16_tensors_checks_itself_bit_exact(tmp_path: Path) -> None:
    from lowbit.pipeline.quantize import quantize as quantize_model

    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    artifact = quantize_model("zoo:small_cnn", plan=_plan(graph, ("relu", "cat_1")))
    report = artifact.save(tmp_path / "out", target="llvm -mcpu=native")
    assert report["mismatches"] == [] and report["integer_only"]
    for check in (report["onnxruntime"]["model.int.onnx"], report["tvm"]):
        assert check["bit_exact"] and check["inputs"]["saturating"] > 0
    # The report and the manifest say which tensors were kept at 16 bits.
    assert report["activation_bits"] == {"relu": 16, "cat_1": 16}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["activation_bits"] == {"relu": 16, "cat_1": 16}
    assert "16-bit for 2 tensors: `cat_1`, `relu`" in (tmp_path / "out" / "report.md").read_text()
