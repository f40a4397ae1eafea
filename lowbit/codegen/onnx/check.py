"""Checks on an exported ONNX model: is `model.int.onnx` really integer-only?"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from ...errors import LowbitError

# Every floating-point element type ONNX has, the 8- and 4-bit ones included, derived from the enum so
# that a float type added by a later onnx release is caught too. Complex numbers are floats as well.
FLOAT_TYPES = frozenset(value for name, value in TensorProto.DataType.items()
                        if name.startswith(("FLOAT", "BFLOAT", "DOUBLE", "COMPLEX")))
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _is_scale(node: NodeProto, index: int) -> bool:
    """Input 1 of QuantizeLinear/DequantizeLinear is its scale: a parameter, not data."""
    return node.op_type in _QDQ and index == 1


def _subgraphs(node: NodeProto) -> list[tuple[str, GraphProto]]:
    """The bodies of an If/Loop/Scan (or any op with graph attributes), named for messages."""
    found = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == AttributeProto.GRAPHS:
            found += [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs)]
    return found


def _element_types(graph: GraphProto, types: dict[str, int]) -> None:
    """Record the element type of every tensor the graph and its subgraphs declare."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for t in graph.initializer:
        types.setdefault(t.name, t.data_type)
    for node in graph.node:
        for _, body in _subgraphs(node):
            _element_types(body, types)


def _is_float(name: str, types: dict[str, int]) -> bool:
    return types.get(name, TensorProto.UNDEFINED) in FLOAT_TYPES | {TensorProto.UNDEFINED}


def float_tensors_between(model: ModelProto) -> list[str]:
    """Float tensors in an integer-only model, besides its float interface; [] when there are none.

    Allowed: the main graph's float inputs when only QuantizeLinear reads them, the main graph's
    outputs made by a final DequantizeLinear (read by nothing else), and Q/DQ scales. Everything
    else counts: graph outputs of any other kind, every float element type (float8/float4
    included), and tensors inside If/Loop/Scan bodies, named `node/attribute/tensor`. A tensor
    whose type shape inference cannot tell is counted too, since it cannot be shown to be an integer.
    """
    try:
        graph = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True).graph
    except onnx.shape_inference.InferenceError as e:
        raise LowbitError(f"the integer ONNX model fails ONNX shape inference, so its tensor types cannot be "
                          f"checked: {e}") from e
    types: dict[str, int] = {}
    _element_types(graph, types)
    readers: dict[str, list[tuple[NodeProto, int]]] = {}
    producer: dict[str, NodeProto] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
        for name in node.output:
            producer[name] = node
    inputs = {vi.name for vi in graph.input}
    outputs = {vi.name for vi in graph.output}

    def float_interface(name: str) -> bool:
        if name in inputs:
            return name not in outputs and all(n.op_type == "QuantizeLinear" and i == 0
                                               for n, i in readers.get(name, []))
        made_by = producer.get(name)
        return (name in outputs and made_by is not None and made_by.op_type == "DequantizeLinear"
                and not readers.get(name))

    candidates = [vi.name for vi in [*graph.input, *graph.output]]
    for node in graph.node:
        candidates += [name for index, name in enumerate(node.input) if not _is_scale(node, index)]
        candidates += list(node.output)
    found: list[str] = []
    for name in candidates:
        if name and name not in found and not float_interface(name) and _is_float(name, types):
            found.append(name)
    for node in graph.node:
        _check_subgraphs(node, "", types, found)
    return found


def _check_subgraphs(node: NodeProto, prefix: str, types: dict[str, int], found: list[str]) -> None:
    """Inside a subgraph nothing is interface: every float tensor it declares, reads or makes counts."""
    for attr_name, body in _subgraphs(node):
        where = f"{prefix}{node.name or node.op_type}/{attr_name}/"
        names = [vi.name for vi in [*body.input, *body.output]]
        for inner in body.node:
            names += [n for i, n in enumerate(inner.input) if not _is_scale(inner, i)]
            names += list(inner.output)
        for name in names:
            if name and f"{where}{name}" not in found and _is_float(name, types):
                found.append(f"{where}{name}")
        for inner in body.node:
            _check_subgraphs(inner, where, types, found)
