"""Fast fake-quant simulation of a `QuantizedGraph`, in float torch.

It runs the float graph with dequantized integer weights and biases, and
rounds every quantized tensor to its grid (clamped to its integer range). It
differs from the integer reference only in requantization rounding (float vs
dyadic), so it is the cheap accuracy estimate used during calibration and
search; the reference executor stays the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir import QuantizedGraph
from ..ir.ops._layer import weights_of
from .graph import Graph, run_graph


@dataclass
class FakeQuant:
    scale: float
    qmin: int
    qmax: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(t / self.scale), self.qmin, self.qmax) * self.scale


def fake_quantizers(qgraph: QuantizedGraph) -> dict[str, FakeQuant]:
    """Float tensor name -> its rounding to the integer grid (int8, uint8 or int16; accumulators are left exact)."""
    out = {}
    for float_name, value_name in qgraph.float_to_int.items():
        v = qgraph.values[value_name]
        if v.dtype == "int32":  # a layer's accumulator
            continue
        op = qgraph.producer(value_name)
        qmin, qmax = v.qrange
        if op is not None and "qmin" in op.attrs:
            qmin, qmax = op.attrs["qmin"], op.attrs["qmax"]
        out[float_name] = FakeQuant(float(v.scale), qmin, qmax)
    return out


def dequantized_params(qgraph: QuantizedGraph) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer: the float weight and bias the integer op really computes with (as its weight format says)."""
    weights, biases = {}, {}
    for op in qgraph.layers:
        weights[op.name] = torch.from_numpy(weights_of(op).dequantize())
        biases[op.name] = dequantized_bias(op.arrays["bias"], op.attrs["weight_scale"], op.attrs["input_scale"])
    return weights, biases


def dequantized_bias(bias: np.ndarray, weight_scale: list[float] | np.ndarray, input_scale: float) -> torch.Tensor:
    """An int32 bias as the float bias the layer really adds."""
    w_scale = torch.tensor(np.asarray(weight_scale, dtype=np.float32))
    return torch.from_numpy(bias.astype(np.float32)) * w_scale * input_scale


def simulate(graph: Graph, qgraph: QuantizedGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fake-quant forward pass of the float graph `qgraph` was built from."""
    quantizers = fake_quantizers(qgraph)
    weights, biases = dequantized_params(qgraph)

    def round_to_grid(name: str, t: torch.Tensor) -> torch.Tensor:
        fq = quantizers.get(name)
        return fq(t) if fq else t

    return run_graph(graph, x, round_to_grid, weights, biases)
