"""Checks on an exported integer model: no float tensor between its quantize and dequantize."""

from __future__ import annotations

import onnx
from onnx import ModelProto, TensorProto

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def float_tensors_between(model: ModelProto) -> list[str]:
    """Names of float tensors that are neither graph inputs nor graph outputs.

    Scales read by QuantizeLinear/DequantizeLinear are parameters, not data, and
    are not counted. A tensor whose type shape inference cannot tell is counted,
    since it cannot be shown to be an integer.
    """
    graph = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    boundary = {vi.name for vi in [*graph.input, *graph.output]}
    found: list[str] = []
    for node in graph.node:
        for index, name in enumerate([*node.input, *node.output]):
            is_scale = node.op_type in ("QuantizeLinear", "DequantizeLinear") and index == 1
            if not name or is_scale or name in boundary or name in found:
                continue
            if types.get(name, TensorProto.UNDEFINED) in _FLOAT_TYPES | {TensorProto.UNDEFINED}:
                found.append(name)
    return found
