"""The checks `lowbit quantize` refuses on: float tensors in the integer ONNX model, and integer differences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lowbit.codegen.onnx.check import FLOAT_TYPES, float_tensors_between
from lowbit.metrics import first_difference
from lowbit.pipeline.checks import CHECK_INPUTS, check_inputs


def _model(nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """x (float) -> QuantizeLinear -> q (uint8), then `nodes`; scale/zero point as initializers."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]), *nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], outputs,
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5]),
         helper.make_tensor("zp", TensorProto.UINT8, [], [0]), *initializers])
    # Opset 23: the first where Cast takes float4.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _dequantized(name: str = "y") -> tuple[onnx.NodeProto, onnx.ValueInfoProto]:
    return (helper.make_node("DequantizeLinear", ["q", "scale", "zp"], [name]),
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]))


def test_the_float_interface_is_allowed() -> None:
    dq, y = _dequantized()
    q_out = helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4])
    assert float_tensors_between(_model([dq], [y, q_out])) == []


def test_a_float_tensor_between_integer_ops_is_found() -> None:
    dq, _ = _dequantized("f")
    relu = helper.make_node("Relu", ["f"], ["g"])
    back = helper.make_node("QuantizeLinear", ["g", "scale", "zp"], ["q2"])
    out = helper.make_tensor_value_info("q2", TensorProto.UINT8, [1, 4])
    assert float_tensors_between(_model([dq, relu, back], [out])) == ["f", "g"]


def test_a_float_graph_output_not_made_by_dequantize_is_found() -> None:
    dq, y = _dequantized()
    cast = helper.make_node("Cast", ["q"], ["leak"], to=TensorProto.FLOAT)
    leak = helper.make_tensor_value_info("leak", TensorProto.FLOAT, [1, 4])
    assert float_tensors_between(_model([dq, cast], [y, leak])) == ["leak"]


def test_a_dequantized_output_read_again_is_found() -> None:
    dq, y = _dequantized()
    again = helper.make_node("Relu", ["y"], ["z"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    assert float_tensors_between(_model([dq, again], [y, z])) == ["y", "z"]


@pytest.mark.parametrize("dtype", ["FLOAT16", "BFLOAT16", "DOUBLE", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT8E4M3FNUZ",
                                   "FLOAT8E5M2FNUZ", "FLOAT4E2M1"])
def test_every_float_type_is_found(dtype: str) -> None:
    elem = getattr(TensorProto, dtype)
    assert elem in FLOAT_TYPES
    dq, y = _dequantized()
    cast = helper.make_node("Cast", ["q"], ["narrow"], to=elem)
    back = helper.make_node("Cast", ["narrow"], ["wide"], to=TensorProto.INT32)
    wide = helper.make_tensor_value_info("wide", TensorProto.INT32, [1, 4])
    assert float_tensors_between(_model([dq, cast, back], [y, wide])) == ["narrow"]


def test_a_float_tensor_inside_an_if_branch_is_found() -> None:
    def branch(name: str, float_inside: bool) -> onnx.GraphProto:
        if float_inside:  # integer in, integer out, but a float in between
            nodes = [helper.make_node("Cast", ["q"], [f"{name}_f"], to=TensorProto.FLOAT),
                     helper.make_node("Cast", [f"{name}_f"], [f"{name}_out"], to=TensorProto.INT32)]
        else:
            nodes = [helper.make_node("Cast", ["q"], [f"{name}_out"], to=TensorProto.INT32)]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT32,
                                                                                  [1, 4])])

    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    branches = helper.make_node("If", ["cond"], ["r"], name="choose", then_branch=branch("then", True),
                                else_branch=branch("else", False))
    dq, y = _dequantized()
    r = helper.make_tensor_value_info("r", TensorProto.INT32, [1, 4])
    assert float_tensors_between(_model([dq, branches], [y, r], [cond])) == ["choose/then_branch/then_f"]


def test_integer_differences_above_2_to_the_24_are_seen() -> None:
    """float32 cannot tell 2^24 from 2^24 + 1; the integer comparison can."""
    want = {"logits_q": np.array([[1, 2], [2**24 + 1, 5]], dtype=np.int32)}
    got = {"logits_q": np.array([[1, 2], [2**24, 5]], dtype=np.int32)}
    assert np.array_equal(got["logits_q"].astype(np.float32), want["logits_q"].astype(np.float32))
    difference = first_difference(got, want)
    assert difference is not None
    assert (difference.output, difference.sample, difference.element) == ("logits_q", 1, (0,))
    assert (difference.got, difference.want, difference.differing) == (2**24, 2**24 + 1, 1)
    assert "sample 1, element [0]: TVM gives 16777216, the reference 16777217" in difference.describe(
        "TVM", "the reference")
    assert first_difference(want, want) is None


def test_check_inputs_include_random_and_saturating_ones() -> None:
    data = np.random.default_rng(1).uniform(-2, 2, (10, 3, 4, 4)).astype(np.float32)
    inputs = check_inputs((1, 3, 4, 4), data)
    assert len(inputs.x) == CHECK_INPUTS and inputs.x.dtype == np.float32
    assert (inputs.heldout, inputs.random, inputs.saturating) == (10, 27, 27)
    np.testing.assert_array_equal(inputs.x[:10], data)
    saturating = inputs.x[-inputs.saturating:]
    assert np.abs(saturating).min() >= 100 * np.abs(data).max()  # far beyond the data's range
    many = check_inputs((1, 3, 4, 4), np.zeros((100, 3, 4, 4), np.float32))
    assert (many.heldout, many.random, many.saturating) == (100, 8, 8)  # random inputs even with plenty of data
