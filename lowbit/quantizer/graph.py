"""The captured float graph: the artifact every later stage reads.

A `Graph` is a flat, topologically ordered list of `Node`s over the ops of
`lowbit.ir.ops` (conv, linear, add, clamp, pad, pools, reshape, concat...). Each node produces one
tensor, named after the node. Batch norm is already folded into convs, and
no-op layers (dropout, clone) are already removed, so every stage sees the
same canonical model whatever checkpoint format it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import LowbitError
from ..ir.ops import OPS, QUANTIZABLE_OPS, op_def


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    macs: int = 0
    # Where the op came from in the user's model (module path), for error messages.
    source: str = ""


@dataclass
class Graph:
    nodes: list[Node]
    params: dict[str, torch.Tensor]
    inputs: list[str]
    outputs: list[str]
    name: str = "model"

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    # -- lookups ------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self._by_name[name]

    def weight(self, name: str) -> torch.Tensor:
        return self.params[f"{name}.weight"]

    def bias(self, name: str) -> torch.Tensor:
        return self.params[f"{name}.bias"]

    @property
    def layers(self) -> list[Node]:
        """The quantizable layers (conv and linear), in execution order."""
        return [n for n in self.nodes if n.op in QUANTIZABLE_OPS]

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def layer_producers(self, name: str) -> list[str]:
        """Quantizable layers whose output reaches `name`'s input through non-quantizable ops."""
        return sorted(self._walk(name, lambda n: [self._by_name[i] for i in n.inputs]))

    def layer_consumers(self, name: str) -> list[str]:
        """Quantizable layers that read `name`'s output through non-quantizable ops."""
        return sorted(self._walk(name, lambda n: self.consumers(n.name)))

    def _walk(self, name: str, step: Callable[[Node], list[Node]]) -> set[str]:
        found: set[str] = set()
        stack = list(step(self._by_name[name]))
        seen: set[str] = set()
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.op in QUANTIZABLE_OPS:
                found.add(n.name)
            else:
                stack.extend(step(n))
        return found

    def last_uses(self) -> dict[str, int]:
        """Node name -> index of the last node that reads it."""
        last = {n.name: i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            for name in n.inputs:
                last[name] = i
        return last

    def scale_groups(self) -> list[list[str]]:
        """Tensors that meet in an add or a concat, so must share a scale (or be rescaled)."""
        return [list(n.inputs) for n in self.nodes if OPS[n.op].joins_inputs]

    @property
    def total_macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": len(self.nodes),
            "layers": len(self.layers),
            "macs": self.total_macs,
            "params": int(sum(p.numel() for p in self.params.values())),
            "inputs": {i: list(self.node(i).shape) for i in self.inputs},
            "outputs": {o: list(self.node(o).shape) for o in self.outputs},
            "scale_groups": self.scale_groups(),
        }

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per quantizable layer: shapes, MACs, and its neighbours."""
        return [
            {
                "name": n.name,
                "op": n.op,
                "source": n.source,
                "weight_shape": list(self.weight(n.name).shape),
                "output_shape": list(n.shape),
                "groups": n.attrs.get("groups", 1),
                "macs": n.macs,
                "producers": self.layer_producers(n.name),
                "consumers": self.layer_consumers(n.name),
            }
            for n in self.layers
        ]

    def is_embedding(self, name: str) -> bool:
        """A pooled embedding (compared by direction), not class scores or a feature map."""
        return self.node(name).op == "masked_mean"

    def with_output_names(self, names: list[str]) -> Graph:
        """The same graph with its outputs renamed (the interface a model promises, e.g. `embedding`)."""
        if len(names) != len(self.outputs) or len(set(names)) != len(names):
            raise LowbitError(f"{len(names)} output names for the {len(self.outputs)} outputs of {self.name}")
        rename = dict(zip(self.outputs, names, strict=True))
        taken = {n.name for n in self.nodes} - set(rename)
        clash = sorted(set(names) & taken)
        if clash:
            raise LowbitError(f"{self.name}: cannot name an output {clash[0]!r}: a node of that name exists")
        nodes = [replace(n, name=rename.get(n.name, n.name), inputs=[rename.get(i, i) for i in n.inputs])
                 for n in self.nodes]
        params = {}
        for key, value in self.params.items():
            node, field_name = key.rsplit(".", 1)
            params[f"{rename.get(node, node)}.{field_name}"] = value
        return Graph(nodes, params, list(self.inputs), names, self.name)

    # -- serialization ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "nodes": [asdict(n) for n in self.nodes],
        }

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "graph.json").write_text(json.dumps(self.to_json(), indent=1))
        save_file({k: v.contiguous() for k, v in self.params.items()}, str(directory / "graph.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> Graph:
        from safetensors.torch import load_file

        meta = json.loads((directory / "graph.json").read_text())
        nodes = [Node(**{**n, "shape": tuple(n["shape"])}) for n in meta["nodes"]]
        for node in nodes:  # each node's op is known and its attributes are that op's
            try:
                op_def(node.op).typed_attrs(node.attrs)
            except TypeError as e:
                raise LowbitError(f"{directory}/graph.json: node {node.name} ({node.op}): bad attributes: {e}") from e
        params = load_file(str(directory / "graph.safetensors"))
        return cls(nodes, params, meta["inputs"], meta["outputs"], meta["name"])


# -- float execution ---------------------------------------------------------------

TensorHook = Callable[[str, torch.Tensor], torch.Tensor]


def run_node(graph: Graph, node: Node, args: list[torch.Tensor], weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluate one node in float. `weight` and `bias` override the stored ones (for fake-quant)."""
    op = op_def(node.op)
    if op.evaluate is None:
        raise ValueError(f"node {node.name}: no float implementation for op {node.op!r}")
    overrides = {"weight": weight, "bias": bias}
    params = {k: graph.params[f"{node.name}.{k}"] if overrides.get(k) is None else overrides[k] for k in op.weights}
    params.update({k: graph.params[f"{node.name}.{k}"] for k in op.constants})
    return op.evaluate(node, args, params)


def forward(
    graph: Graph,
    inputs: dict[str, torch.Tensor] | torch.Tensor,
    on_output: TensorHook | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    biases: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the float graph, differentiably; `on_output(name, t)` may observe or replace each node's output."""
    if isinstance(inputs, torch.Tensor):
        inputs = {graph.inputs[0]: inputs}
    weights, biases = weights or {}, biases or {}
    last_use = graph.last_uses()
    env: dict[str, torch.Tensor] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "input":
            out = inputs[node.name]
        else:
            out = run_node(graph, node, [env[n] for n in node.inputs], weights.get(node.name), biases.get(node.name))
        env[node.name] = on_output(node.name, out) if on_output else out
        for name in dict.fromkeys(node.inputs):  # free activations nobody reads any more (x + x: once)
            if last_use[name] == i and name not in graph.outputs:
                del env[name]
    return {o: env[o] for o in graph.outputs}


run_graph = torch.no_grad()(forward)
run_graph.__doc__ = "`forward` without autograd: the way every stage but sensitivity runs the graph."
