"""What both ONNX exporters share: a name-checked graph builder, a converter registry per exporter, and the
layout helpers of ops whose ONNX form is the same in both models.

Each exporter is a registry of small converters, one per IR op, in its own module
(`integer.py`, `qdq.py`). Before converting anything, an exporter checks that it has
a converter for every op of the graph (`lowbit.ir.ops.check_backend`) and lists
all that are missing. Tensor and node names derive from IR names only, so the same
IR always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, ValueInfoProto, helper, numpy_helper

from ... import __version__
from ...errors import LowbitError
from ...ir import Op, QuantizedGraph, Value
from ...ir.dtypes import dtype
from ...ir.ops import check_backend

OPSET = 21
ONNX_IR_VERSION = 10  # the ONNX IR version of opset 21, which ONNX Runtime accepts
BATCH_DIM = "N"


def onnx_type(name: str) -> int:
    """The ONNX element type of an IR dtype."""
    return dtype(name).onnx


def numpy_type(name: str) -> type:
    return dtype(name).numpy


class Builder:
    """Accumulates the nodes and initializers of one ONNX graph built from `qgraph`.

    Every name is given by the caller (IR names plus a fixed suffix), and a name used
    twice is an error: it would be a converter bug, and silent renaming could make
    the output depend on conversion order.
    """

    def __init__(self, qgraph: QuantizedGraph):
        self.qgraph = qgraph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set(qgraph.inputs)

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise AssertionError(f"ONNX export: tensor name {name!r} used twice")
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray | np.generic) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), self._claim(name)))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        """Add a node with one output; the node is named after that output."""
        self.nodes.append(helper.make_node(op_type, inputs, [self._claim(output)], name=output, **attrs))
        return output

    def value(self, name: str) -> Value:
        return self.qgraph.values[name]


B = TypeVar("B", bound=Builder)
F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, Callable]) -> Callable[..., Callable[[F], F]]:
    """A decorator factory: `@register("conv", ...)` puts a converter in `table` under those IR op names."""
    def register(*ops: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            for name in ops:
                table[name] = fn
            return fn
        return add
    return register


def value_info(name: str, dtype: str, shape: tuple[int, ...]) -> ValueInfoProto:
    """A graph input/output with a symbolic batch dimension."""
    return helper.make_tensor_value_info(name, onnx_type(dtype), [BATCH_DIM, *shape[1:]])


def check_ir(qgraph: QuantizedGraph, converters: dict[str, Callable], what: str) -> None:
    check_backend(qgraph, converters, what)
    # Converters rely on the IR's symmetric quantization: padding inserts 0, no zero-point terms.
    nonzero = sorted(v.name for v in qgraph.values.values() if v.zero_point != 0)
    if nonzero:
        raise LowbitError(f"{what} export: values {', '.join(nonzero)} have non-zero zero points; the IR is symmetric")


def build(builder: B, converters: dict[str, Callable[[B, Op], None]], outputs: list[ValueInfoProto],
           doc: str) -> ModelProto:
    """Run the converters over the IR in order and wrap the result in a checked model."""
    qgraph = builder.qgraph
    for op in qgraph.ops:
        converters[op.op](builder, op)
    inputs = [value_info(n, qgraph.values[n].dtype, qgraph.values[n].shape) for n in qgraph.inputs]  # float32, int64
    graph = helper.make_graph(builder.nodes, qgraph.name, inputs, outputs, builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ONNX_IR_VERSION,
                              producer_name="lowbit", producer_version=__version__, doc_string=doc)
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


# -- attributes and structural ops shared by both exporters --------------------------------------------------------

def pads(padding: list[int]) -> list[int]:
    """IR [pad_h, pad_w] -> ONNX [top, left, bottom, right]."""
    return [padding[0], padding[1], padding[0], padding[1]]


def conv_attrs(op: Op) -> dict[str, object]:
    a = op.attrs
    return {"kernel_shape": list(op.arrays["weight"].shape[2:]), "strides": a["stride"], "pads": pads(a["padding"]),
            "dilations": a["dilation"], "group": a["groups"]}


def is_global_pool(b: Builder, op: Op) -> bool:
    """A window covering the whole (unpadded) feature map: a plain sum over H and W."""
    height, width = b.value(op.inputs[0]).shape[2:]
    return list(op.attrs["kernel"]) == [height, width] and not any(op.attrs["padding"])


def maxpool(b: Builder, op: Op, x: str, out: str) -> str:
    a = op.attrs
    # ONNX MaxPool pads with -inf like torch, and uses torch's ceil_mode rule.
    return b.node("MaxPool", [x], out, kernel_shape=a["kernel"], strides=a["stride"], pads=pads(a["padding"]),
                  dilations=a["dilation"], ceil_mode=int(a["ceil_mode"]))


def pad(b: Builder, op: Op, x: str, out: str) -> str:
    left, right, top, bottom = op.attrs["pads"]
    pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
    return b.node("Pad", [x, b.const(f"{op.name}/pads", pads)], out, mode="constant")  # constant_value: 0


def reshape(b: Builder, op: Op, x: str, out: str) -> str:
    # 0 copies the batch dimension (allowzero=0), so the symbolic batch survives.
    shape = np.array([0, *op.attrs["shape"]], np.int64)
    return b.node("Reshape", [x, b.const(f"{op.name}/shape", shape)], out)


