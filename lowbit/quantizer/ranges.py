"""Output-aware activation ranges: each 8-bit tensor's clipping threshold chosen by the error at the network output.

A range method (minmax, percentile, mse) looks at one tensor's histogram, but what
matters is how that tensor's rounding and clipping noise reaches the output. So,
tensor by tensor in execution order, `output_aware_ratios` tries clipping thresholds
T = r * max|x| for a coarse grid of ratios r (and the method's own choice), then the
midpoints around the best, and keeps the ratio with the least output error on the
given samples. Each candidate runs the fake-quant graph only from that tensor onward:
the prefix, with the ranges already chosen, is computed once per tensor. The cost is
about (candidates / 2) fake-quant passes per tensor.

The ratios are fitted to the samples they are chosen on, so the recipe keeps them
only where a validation split agrees (`recipe.choose_recipe`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..ir import QuantizedGraph
from ..ir.dtypes import qrange
from ..ir.ops import SCALE_PRESERVING_OPS
from ..ir.ops._layer import integer_bias
from ..ir.ops.clamp import integer_bounds
from ..metrics import mean_kl
from .calibrate import TensorStats
from .config import BitPlan, QuantConfig
from .graph import Graph, Node, run_graph, run_node
from .inputs import TorchInputs
from .quantize import activation_grid, fusable_clamps, lower_to_integer
from .simulate import FakeQuant, dequantized_bias, dequantized_params, fake_quantizers

COARSE_RATIOS = (1.0, 0.75, 0.55, 0.4, 0.3)  # of max|x|: from no clipping to clipping most of the tail
RANGE_SAMPLES = 16  # samples the ratios are chosen on: each candidate runs the rest of the graph on them
Outputs = Mapping[str, torch.Tensor]


def output_metric(graph: Graph, reference: Outputs) -> str:
    """Pooled embeddings are compared by direction, class scores as distributions, anything else by its relative
    squared error."""
    if all(graph.is_embedding(o) for o in graph.outputs):
        return "mean (1 - cosine)"
    return "mean KL(softmax)" if all(r.dim() == 2 for r in reference.values()) else "relative MSE"


def output_error(reference: Outputs, outputs: Outputs, metric: str) -> float:
    """The error of `outputs` against the float `reference`, averaged over the graph's outputs."""
    errors = []
    for name, want in reference.items():
        w, g = want.double().numpy(), outputs[name].double().numpy()
        if metric.startswith("mean KL"):
            errors.append(mean_kl(w, g))
        elif metric.startswith("mean (1 - cosine)"):
            cosine = (w * g).sum(-1) / np.maximum(np.linalg.norm(w, axis=-1) * np.linalg.norm(g, axis=-1), 1e-30)
            errors.append(float(np.mean(1.0 - cosine)))
        else:
            errors.append(float(np.sum((g - w) ** 2) / max(float(np.sum(w ** 2)), 1e-30)))
    return float(np.mean(errors))


@dataclass(frozen=True)
class RangeChoice:
    ratios: dict[str, float]  # per tensor whose best ratio beat the method's range: that ratio
    error_before: float  # output error on the samples, with the method's ranges
    error_after: float  # ... and with the ratios


def output_aware_ratios(graph: Graph, stats: dict[str, TensorStats], plan: BitPlan, config: QuantConfig,
                        x: TorchInputs, log: Callable[[str], None] = lambda _: None) -> RangeChoice:
    """Choose each 8-bit activation tensor's clipping ratio by the output error on inputs `x` (greedy, in execution
    order, each choice made with the earlier ones in place)."""
    qgraph = lower_to_integer(graph, stats, plan, config)
    with torch.no_grad():
        return _Chooser(graph, qgraph, stats, plan, config, x, log).run()


class _Chooser:
    def __init__(self, graph: Graph, qgraph: QuantizedGraph, stats: dict[str, TensorStats], plan: BitPlan,
                 config: QuantConfig, x: TorchInputs, log: Callable[[str], None]):
        self.graph, self.stats, self.plan, self.config, self.log = graph, stats, plan, config, log
        self.x = x
        self.quantizers = fake_quantizers(qgraph)
        self.weights, self.biases = dequantized_params(qgraph)
        self.layer_ops = {op.name: op for op in qgraph.layers}
        self.reference = {o: t for o, t in run_graph(graph, self.x).items() if o in graph.outputs}
        self.metric = output_metric(graph, self.reference)
        self.last_use = graph.last_uses()
        self.clamps = {c.name: c for c in fusable_clamps(graph).values()}
        # The tensors with a range of their own that are 8-bit in this plan (stats holds exactly those with a scale).
        self.tensors = [n.name for n in graph.nodes
                        if n.name in stats and n.name in self.quantizers and plan.activation(n.name) == 8]

    def run(self) -> RangeChoice:
        ratios: dict[str, float] = {}
        env: dict[str, torch.Tensor] = {}
        before = after = None  # the output error with the method's ranges, and with the ratios chosen so far
        for i, node in enumerate(self.graph.nodes):
            raw = self.x[node.name] if node.op == "input" else self._eval(node, env)
            if node.name in self.tensors:
                self.log(f"output-aware ranges: tensor {self.tensors.index(node.name) + 1}/{len(self.tensors)}")
                ratio, own, after = self._choose(i, node.name, raw, env)
                before = own if before is None else before
                if ratio is not None:
                    ratios[node.name] = ratio
                    quantizers, biases = self._grid(node.name, ratio)
                    self.quantizers.update(quantizers)
                    self.biases.update(biases)
            self._store(i, node.name, raw, env, self.quantizers)
        if before is None or after is None:  # no tensor to choose a range for
            before = after = output_error(self.reference, {o: env[o] for o in self.graph.outputs}, self.metric)
        return RangeChoice(ratios, before, after)

    def _eval(self, node: Node, env: dict[str, torch.Tensor], biases: Mapping[str, torch.Tensor] | None = None
              ) -> torch.Tensor:
        return run_node(self.graph, node, [env[n] for n in node.inputs], self.weights.get(node.name),
                        (self.biases if biases is None else biases).get(node.name))

    def _store(self, i: int, name: str, raw: torch.Tensor, env: dict[str, torch.Tensor],
               quantizers: Mapping[str, FakeQuant]) -> None:
        fq = quantizers.get(name)
        env[name] = fq(raw) if fq else raw
        for n in dict.fromkeys(self.graph.nodes[i].inputs):  # free what nobody reads any more (x + x: once)
            if self.last_use[n] == i and n not in self.graph.outputs:
                del env[n]

    def _error_from(self, start: int, env: dict[str, torch.Tensor], quantizers: Mapping[str, FakeQuant],
                    biases: Mapping[str, torch.Tensor]) -> float:
        """The output error with `env` holding the graph's state after node `start` - 1."""
        env = dict(env)
        for i in range(start, len(self.graph.nodes)):
            node = self.graph.nodes[i]
            self._store(i, node.name, self._eval(node, env, biases), env, quantizers)
        return output_error(self.reference, {o: env[o] for o in self.graph.outputs}, self.metric)

    def _choose(self, i: int, name: str, raw: torch.Tensor, env: dict[str, torch.Tensor]
                ) -> tuple[float | None, float, float]:
        """(The best ratio for tensor `name` (node i), or None if the method's own range is at least as good; the
        output error with the method's range; the error with the choice made.)"""

        def error(ratio: float | None) -> float:
            quantizers, biases = self._grid(name, ratio) if ratio is not None else ({}, {})
            quantizers, biases = {**self.quantizers, **quantizers}, {**self.biases, **biases}
            trial = dict(env)
            self._store(i, name, raw, trial, quantizers)
            return self._error_from(i + 1, trial, quantizers, biases)

        own = error(None)
        tried = {r: error(r) for r in COARSE_RATIOS}
        best = min(tried, key=lambda r: tried[r])
        k = COARSE_RATIOS.index(best)
        for neighbour in COARSE_RATIOS[max(k - 1, 0):k + 2]:  # coarse to fine: the midpoints around the best
            if neighbour != best:
                mid = (best + neighbour) / 2
                tried[mid] = error(mid)
        best = min(tried, key=lambda r: tried[r])
        return (best, own, tried[best]) if tried[best] < own else (None, own, own)

    def _grid(self, name: str, ratio: float) -> tuple[dict[str, FakeQuant], dict[str, torch.Tensor]]:
        """At this ratio: the fake quantizers of `name` and of the tensors that inherit its grid, and the biases of
        the layers reading them (an integer bias is rounded at its input's scale)."""
        dtype, scale, qmin, qmax = activation_grid(self.stats[name], 8, self.clamps.get(name), self.config, ratio)
        quantizers = {name: FakeQuant(float(scale), qmin, qmax)}
        pending = [name]
        while pending:  # pad, maxpool, reshape, an unfused clamp...: same grid, their own bounds
            for reader in self.graph.consumers(pending.pop()):
                if reader.op in SCALE_PRESERVING_OPS and reader.name in self.quantizers:
                    lo, hi = (reader.attrs["min"], reader.attrs["max"]) if reader.op == "clamp" else (None, None)
                    quantizers[reader.name] = FakeQuant(float(scale), *integer_bounds(lo, hi, scale, *qrange(dtype)))
                    pending.append(reader.name)
        biases = {}
        for tensor in quantizers:
            for reader in self.graph.consumers(tensor):
                op = self.layer_ops.get(reader.name)
                if op is not None and reader.inputs[0] == tensor:
                    w_scale = np.asarray(op.attrs["weight_scale"], dtype=np.float32)
                    bias = integer_bias(self.graph.bias(reader.name).numpy(), scale, w_scale)
                    biases[reader.name] = dequantized_bias(bias, w_scale, scale)
        return quantizers, biases
