"""Capture: a `torch.export` program becomes a lowbit `Graph`.

Every checkpoint format is first turned into an `ExportedProgram` (see
`lowbit.models.loading`), so this is the only frontend. Each op module in
`lowbit.ir.ops` registers the converters of its ATen ops, in the style of TVM's
ONNX frontend; this module is the driver. Before converting anything, the whole
program is scanned and *every* unsupported op is reported at once, with where it
occurs in the user's model.

Sub-graphs that depend only on weights (a transpose of a linear weight, say)
are folded to constants as they are met. Sub-graphs that an op declares as one
of its `fusions` (masked softmax, masked mean pooling) are found first and become
one node; the nodes they replace are neither scanned nor converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..errors import LowbitError
from ..ir.ops import ATEN_CONVERTERS, FUSIONS, Fusion, UnsupportedAttr, supported_description
from .graph import Graph, Node


class UnsupportedOpsError(LowbitError):
    """The model uses ops lowbit cannot quantize; the message lists every one of them."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        lines = [f"  - {op} at {where}" + (f": {why}" if why else "") for op, where, why in problems]
        ops = sorted({op for op, _, _ in problems})
        super().__init__(
            f"the model uses {len(problems)} unsupported op occurrence(s) ({', '.join(ops)}):\n"
            + "\n".join(lines)
            + f"\nlowbit supports {supported_description()}. Rewrite these parts of the model with supported ops, "
            "or file an issue."
        )


@dataclass
class _Tensor:
    """A value produced by a lowbit node (as opposed to a weight-only constant)."""

    node: str


def _where(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return f"{_clean_path(path) or '<root>'} ({kind_name.rsplit('.', 1)[-1]}), node {n.name}"
    return f"node {n.name}"


def _clean_path(path: str) -> str:
    # torch.export writes module paths as e.g. "L['self'].features[1].conv" or "features.1.conv".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _module_path(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return _clean_path(list(stack.values())[-1][0]) if stack else ""


class _Context:
    """What converters (in `lowbit.ir.ops`) see: argument access, and `emit` to add a node to the graph."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}
        self.values: dict[torch.fx.Node, Any] = {}
        self.names: set[str] = set()
        self.by_name: dict[str, Node] = {}
        self.fx_of: dict[str, torch.fx.Node] = {}

    # -- helpers used by converters ----------------------------------------------
    def arg(self, n: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
        if i < len(n.args):
            v = n.args[i]
        else:
            v = n.kwargs.get(name, default)
        return self.resolve(v)

    def resolve(self, v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            return self.values[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.resolve(x) for x in v)
        return v

    def tensor(self, n: torch.fx.Node, i: int, name: str) -> str:
        v = self.arg(n, i, name)
        if not isinstance(v, _Tensor):
            raise UnsupportedAttr(f"argument {name!r} must be an activation tensor, not a constant")
        return v.node

    def const(self, n: torch.fx.Node, i: int, name: str) -> torch.Tensor | None:
        v = self.arg(n, i, name)
        if isinstance(v, _Tensor):
            raise UnsupportedAttr(f"argument {name!r} must be a weight, not an activation")
        return v

    def activation(self, name: str) -> _Tensor:
        """The captured value of node `name`, for a converter that reuses it (a folded batch norm)."""
        return _Tensor(name)

    @staticmethod
    def is_activation(v: Any) -> bool:
        return isinstance(v, _Tensor)

    def add_node(self, name: str, op: str, inputs: list[str], shape: tuple[int, ...], attrs: dict, macs: int,
                 fx: torch.fx.Node) -> str:
        """A node of the converter's own naming, besides the one `emit` makes for `fx`; returns its name."""
        node = Node(name, op, inputs, shape, attrs, macs, _where(fx))
        self.nodes.append(node)
        self.by_name[name] = node
        self.names.add(name)
        return name

    def emit(self, fx: torch.fx.Node, op: str, inputs: list[str], attrs: dict | None = None,
             params: dict[str, torch.Tensor] | None = None, macs: int = 0, prefer_module_name: bool = False) -> _Tensor:
        name = _module_path(fx) if prefer_module_name else ""
        if not name or name in self.names:
            name = fx.name
        while name in self.names:
            name += "_"
        self.names.add(name)
        shape = tuple(int(s) for s in fx.meta["val"].shape)
        # int(): programs converted from TorchScript carry symbolic (but hinted) sizes.
        node = Node(name, op, inputs, shape, attrs or {}, int(macs), _where(fx))
        self.nodes.append(node)
        self.by_name[name] = node
        self.fx_of[name] = fx
        for k, v in (params or {}).items():
            self.params[f"{name}.{k}"] = v.detach().to(torch.float32).contiguous()
        return _Tensor(name)


# -- driver --------------------------------------------------------------------------


def _constant_inputs(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor, for parameters, buffers and lifted constants."""
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    consts: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        if spec.target is not None and spec.target in state:
            consts[spec.arg.name] = state[spec.target]
    return consts


def _is_const_op(n: torch.fx.Node, const_nodes: set[torch.fx.Node]) -> bool:
    inputs = n.all_input_nodes
    return bool(inputs) and all(i in const_nodes for i in inputs)


def _const_nodes(ep: torch.export.ExportedProgram) -> set[torch.fx.Node]:
    """Nodes that depend only on weights: they are folded to constants."""
    consts = _constant_inputs(ep)
    const_nodes: set[torch.fx.Node] = set()
    for n in ep.graph.nodes:
        if (n.op == "placeholder" and n.name in consts) or n.op == "get_attr" or (
                n.op == "call_function" and _is_const_op(n, const_nodes)):
            const_nodes.add(n)
    return const_nodes


def find_fusions(ep: torch.export.ExportedProgram) -> tuple[dict[torch.fx.Node, Fusion], set[torch.fx.Node]]:
    """The fusions of the program (root -> fusion), and the nodes they make vanish.

    A fusion applies where each of its interior nodes is read only inside it and belongs to no other fusion.
    Besides the interiors, a node vanishes when every reader vanishes or is a root that does not read its value
    (the attention mask's cast and reshapes, read through by masked softmax and masked mean)."""
    const_nodes = _const_nodes(ep)
    fusions: dict[torch.fx.Node, Fusion] = {}
    claimed: set[torch.fx.Node] = set()
    for n in ep.graph.nodes:
        if n.op != "call_function" or n in const_nodes or n in claimed:
            continue
        for matcher in FUSIONS.get(n.target, ()):
            fusion = matcher(n)
            if fusion is None or fusion.interior & (claimed | set(fusions) | const_nodes):
                continue
            if all(set(i.users) <= fusion.interior | {n} for i in fusion.interior):
                fusions[n] = fusion
                claimed |= fusion.interior
                break
    vanished = set(claimed)
    read = {i for f in fusions.values() for i in f.inputs}  # what the fused nodes' converters read
    for n in reversed(ep.graph.nodes):
        if n.op != "call_function" or n in fusions or n in vanished or n in read or not n.users:
            continue
        if all(u in vanished or u in fusions for u in n.users):
            vanished.add(n)
    return fusions, vanished


def scan_unsupported(ep: torch.export.ExportedProgram) -> list[tuple[str, str, str]]:
    """Every op occurrence with no converter (weight-only sub-graphs are fine: they are folded; fused
    sub-graphs are fine: they become one node)."""
    const_nodes = _const_nodes(ep)
    fusions, vanished = find_fusions(ep)
    problems = []
    for n in ep.graph.nodes:
        if n in const_nodes or n in vanished or n in fusions:
            continue
        if n.op == "call_function" and n.target not in ATEN_CONVERTERS:
            problems.append((_op_name(n.target), _where(n), ""))
        elif n.op in ("call_module", "call_method"):
            problems.append((str(n.target), _where(n), "not a flat ATen graph"))
    return problems


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(target) if str(target).startswith("aten.") else name


def _input_attrs(n: torch.fx.Node) -> dict[str, str]:
    """A float32 input needs no attributes; an int64 one (token ids, a mask) says so."""
    dtype = n.meta["val"].dtype
    if dtype == torch.float32:
        return {}
    if dtype == torch.int64:
        return {"dtype": "int64"}
    raise UnsupportedAttr(f"model input {n.name} is {dtype}; lowbit takes float32 inputs, or int64 ids and masks")


def capture(ep: torch.export.ExportedProgram, name: str = "model") -> Graph:
    """Convert an exported program to a `Graph`; raises `UnsupportedOpsError` listing all problems."""
    problems = scan_unsupported(ep)
    if problems:
        raise UnsupportedOpsError(problems)
    consts = _constant_inputs(ep)
    fusions, vanished = find_fusions(ep)
    ctx = _Context()
    user_inputs: list[str] = []
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    for n in ep.graph.nodes:
        try:
            if n.op == "placeholder":
                if n.name in consts:
                    ctx.values[n] = consts[n.name].detach()
                else:
                    user_inputs.append(n.name)
                    shape = tuple(int(s) for s in n.meta["val"].shape)
                    ctx.nodes.append(Node(n.name, "input", [], shape, _input_attrs(n), source="model input"))
                    ctx.by_name[n.name] = ctx.nodes[-1]
                    ctx.names.add(n.name)
                    ctx.values[n] = _Tensor(n.name)
            elif n.op == "get_attr":
                ctx.values[n] = getattr(ep.graph_module, n.target)
            elif n.op == "call_function" and n in vanished:
                continue
            elif n.op == "call_function" and n in fusions:
                args = [ctx.values.get(i) for i in fusions[n].inputs]
                # None: reads an op already listed as a problem
                ctx.values[n] = None if any(a is None for a in args) else fusions[n].convert(ctx, n)
            elif n.op == "call_function":
                args = [ctx.values.get(i) for i in n.all_input_nodes]
                if any(a is None for a in args):  # reads an op already listed as a problem
                    ctx.values[n] = None
                elif args and not any(isinstance(a, _Tensor) or isinstance(a, (list, tuple)) for a in args):
                    with torch.no_grad():  # weight-only sub-graph: fold it now
                        ctx.values[n] = n.target(*ctx.resolve(n.args), **ctx.resolve(n.kwargs))
                else:
                    ctx.values[n] = ATEN_CONVERTERS[n.target](ctx, n)
        except UnsupportedAttr as e:
            problems.append((_op_name(n.target), _where(n), str(e)))
            ctx.values[n] = None
        except (KeyError, TypeError) as e:
            if problems:  # a consequence of an earlier problem
                ctx.values[n] = None
                continue
            raise UnsupportedOpsError([(_op_name(n.target), _where(n), f"could not convert ({e})")]) from e
    if problems:
        raise UnsupportedOpsError(problems)
    outputs = []
    for v in torch.utils._pytree.tree_leaves(ctx.resolve(output_node.args[0])):
        if not isinstance(v, _Tensor):
            raise UnsupportedOpsError([("output", "model output", "the model returns a constant")])
        outputs.append(v.node)
    graph = Graph(ctx.nodes, ctx.params, user_inputs, outputs, name)
    return _prune(graph)


def _prune(graph: Graph) -> Graph:
    """Drop nodes whose results never reach an output."""
    live = set(graph.outputs)
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(node.inputs)
    nodes = [n for n in graph.nodes if n.name in live or n.op == "input"]
    params = {k: v for k, v in graph.params.items() if k.rsplit(".", 1)[0] in live}
    return Graph(nodes, params, graph.inputs, graph.outputs, graph.name)
