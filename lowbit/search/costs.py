"""The cost model: per layer and weight bit-width, size in bytes, BOPs, and latency.

Size and BOPs follow from the shapes. Latency is a table measured on the target,
pluggable: anything that maps (layer, bits) to milliseconds. `measure_onnxruntime`
times each layer alone, as a QDQ model in ONNX Runtime; a compiler backend
measures its own kernels and fills the same `LatencyTable`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from ..ir import Op, QuantizedGraph, Value
from ..ir.weights import PerChannelWeights
from ..quantizer.graph import Graph
from ..runtime.loader import median_ms

ACTIVATION_BITS = 8
FLOAT_BITS = 32


@dataclass
class LatencyTable:
    """Milliseconds per (layer, weight bits), measured on `target` by `source`; `wide_input_ms`: per layer, what
    a 16-bit input adds to its time (empty when 16-bit activations were not measured)."""

    target: str
    source: str
    ms: dict[str, dict[int, float]]
    meta: dict[str, Any] = field(default_factory=dict)
    wide_input_ms: dict[str, float] = field(default_factory=dict)

    def get(self, layer: str, bits: int) -> float:
        try:
            return self.ms[layer][bits]
        except KeyError:
            raise LowbitError(f"latency table ({self.source}, {self.target}) has no entry for layer {layer!r} at "
                              f"{bits} bits; measure it again for this model and bit set") from None

    def wide_input_extra(self, layer: str) -> float:
        """What a 16-bit input adds to `layer`'s time."""
        if layer not in self.wide_input_ms:
            raise LowbitError(f"latency table ({self.source}, {self.target}) has no 16-bit-input time for layer "
                              f"{layer!r}; measure it again with 16-bit activations")
        return self.wide_input_ms[layer]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "source": self.source, "meta": self.meta,
                "ms": {layer: {str(b): v for b, v in row.items()} for layer, row in self.ms.items()},
                "wide_input_ms": self.wide_input_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "latency table") -> LatencyTable:
        try:
            ms = {layer: {int(b): float(v) for b, v in row.items()} for layer, row in data["ms"].items()}
            wide = {layer: float(v) for layer, v in data.get("wide_input_ms", {}).items()}
            return cls(str(data["target"]), str(data["source"]), ms, dict(data.get("meta", {})), wide)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LowbitError(f"{where}: not a latency table ({e}); expected "
                              '{"target": ..., "source": ..., "ms": {layer: {bits: ms}}}') from e

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as e:
            raise LowbitError(f"{path}: cannot read the latency table: {e}") from e


@dataclass
class CostModel:
    """Cost of each layer at each weight bit-width, for the ILP's constraints."""

    size_bytes: dict[str, dict[int, float]]
    bops: dict[str, dict[int, float]]
    latency: LatencyTable | None = None
    readers: dict[str, list[str]] = field(default_factory=dict)  # tensor -> layers that read its integers
    macs: dict[str, int] = field(default_factory=dict)  # layer -> MACs

    def cost(self, metric: str, layer: str, bits: int) -> float:
        if metric == "size":
            return self.size_bytes[layer][bits]
        if metric == "bops":
            return self.bops[layer][bits]
        if metric == "latency":
            if self.latency is None:
                raise LowbitError("a latency budget needs a latency table: measure one (--latency-source "
                                  "onnxruntime) or pass --latency-table FILE")
            return self.latency.get(layer, bits)
        raise ValueError(f"unknown cost metric {metric!r}")

    def activation_cost(self, metric: str, tensor: str, bits: int) -> float:
        """What keeping `tensor` at `bits` (8 or 16) adds to `metric`, against 8 bits.

        A 16-bit input runs each layer that reads it as two 8-bit passes (`lowbit.ir.dtypes.activation_dtype`),
        so it adds one pass's BOPs (MACs x 8 x 8, whatever the weights' width) and the measured extra time."""
        if bits == 8 or metric == "size":
            return 0.0
        if metric == "bops":
            return float(sum(self.macs[layer] * 8 * ACTIVATION_BITS for layer in self.readers[tensor]))
        if metric == "latency":
            if self.latency is None:
                raise LowbitError("a latency budget needs a latency table: measure one (--latency-source "
                                  "tvm) or pass --latency-table FILE")
            return sum(self.latency.wide_input_extra(layer) for layer in self.readers[tensor])
        raise ValueError(f"unknown cost metric {metric!r}")

    def total(self, metric: str, plan: dict[str, int]) -> float:
        return float(sum(self.cost(metric, layer, bits) for layer, bits in plan.items()))


def layer_costs(graph: Graph, bits: Iterable[int], latency: LatencyTable | None = None) -> CostModel:
    """Size (weights at `bits`, int32 bias) and BOPs (MACs x weight bits x 8-bit activations) per layer, and
    what 16-bit activations add (`CostModel.activation_cost`)."""
    from ..quantizer.quantize import int16_candidates, integer_readers

    size: dict[str, dict[int, float]] = {}
    bops: dict[str, dict[int, float]] = {}
    for node in graph.layers:
        shape = tuple(graph.weight(node.name).shape)
        size[node.name] = {b: PerChannelWeights.bytes_for(shape, b) for b in bits}
        bops[node.name] = {b: float(node.macs * b * ACTIVATION_BITS) for b in bits}
    readers = {t: integer_readers(graph, t) for t in int16_candidates(graph)}
    return CostModel(size, bops, latency, readers, {n.name: n.macs for n in graph.layers})


def single_layer_graph(qgraph: QuantizedGraph, layer: str) -> QuantizedGraph:
    """One quantized layer alone, float in and float out, as an IR the exporters take."""
    op = qgraph.op(layer)
    x_q = qgraph.values[op.inputs[0]]
    out = qgraph.values[op.output]
    values = {
        "x": Value("x", "float32", x_q.shape),
        "x_q": Value("x_q", x_q.dtype, x_q.shape, x_q.scale, x_q.zero_point),
        "y_q": Value("y_q", out.dtype, out.shape, out.scale, out.zero_point, out.axis),
        "y": Value("y", "float32", out.shape),
    }
    ops = [Op("x_quantize", "quantize", ["x"], "x_q"),
           Op(op.name, op.op, ["x_q"], "y_q", dict(op.attrs), dict(op.arrays)),
           Op("y_dequantize", "dequantize", ["y_q"], "y")]
    return QuantizedGraph(values, ops, ["x"], ["y"], f"{qgraph.name}_{layer}")


def measure_onnxruntime(qgraphs: dict[int, QuantizedGraph], repeats: int = 30, threads: int = 2,
                        log: Callable[[str], None] = lambda _: None) -> LatencyTable:
    """Median ms of each layer alone in ONNX Runtime (QDQ, batch 1), per weight bit-width.

    `qgraphs` holds one uniform quantization of the model per bit-width. ONNX Runtime
    has no int4 convolution, so 4-bit weights run the int8 kernels: expect equal times.
    """
    import tempfile

    import onnxruntime as ort

    from ..codegen.onnx import export_qdq

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    ms: dict[str, dict[int, float]] = {}
    any_graph = next(iter(qgraphs.values()))
    with tempfile.TemporaryDirectory() as tmp:
        for i, op in enumerate(any_graph.layers):
            for bits, qgraph in sorted(qgraphs.items()):
                path = Path(tmp) / f"{i}_{bits}.onnx"
                export_qdq(single_layer_graph(qgraph, op.name), path)
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                shape = (1, *qgraph.values[op.inputs[0]].shape[1:])
                x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                run = functools.partial(session.run, None, {"x": x})
                ms.setdefault(op.name, {})[bits] = median_ms(run, repeats, warmup=3)
            log(f"latency (onnxruntime): layer {i + 1}/{len(any_graph.layers)}")
    return LatencyTable("onnxruntime-cpu", "onnxruntime per-layer QDQ", ms,
                        {"threads": threads, "repeats": repeats, "batch": 1})

