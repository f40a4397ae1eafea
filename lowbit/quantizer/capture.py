"""Capture: a `torch.export` program becomes a lowbit `Graph`.

Every checkpoint format is first turned into an `ExportedProgram` (see
`lowbit.models.loading`), so this is the only frontend. It is a registry of one
converter per ATen op, in the style of TVM's ONNX frontend: before converting
anything, the whole program is scanned and *every* unsupported op is reported at
once, with where it occurs in the user's model.

Sub-graphs that depend only on weights (a transpose of a linear weight, say)
are folded to constants as they are met.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..errors import LowbitError
from .graph import Graph, Node

aten = torch.ops.aten


class UnsupportedOpsError(LowbitError):
    """The model uses ops lowbit cannot quantize; the message lists every one of them."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        lines = [f"  - {op} at {where}" + (f": {why}" if why else "") for op, where, why in problems]
        ops = sorted({op for op, _, _ in problems})
        super().__init__(
            f"the model uses {len(problems)} unsupported op occurrence(s) ({', '.join(ops)}):\n"
            + "\n".join(lines)
            + "\nlowbit supports conv2d, linear, batch_norm (folded), add, relu, relu6/hardtanh, clamp, "
            "constant zero pad, max/avg pool, adaptive avg pool, mean over H and W, flatten/view/reshape, "
            "cat and dropout. Rewrite these parts of the model with supported ops, or file an issue."
        )


@dataclass
class _Tensor:
    """A value produced by a lowbit node (as opposed to a weight-only constant)."""

    node: str


Converter = Callable[["_Context", torch.fx.Node], Any]
CONVERTERS: dict[Any, Converter] = {}


def converts(*targets: Any) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for t in targets:
            CONVERTERS[t] = fn
        return fn

    return register


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


class UnsupportedAttr(Exception):
    """Raised by a converter for a supported op used with an unsupported setting."""


class _Context:
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


# -- converters ----------------------------------------------------------------------


def _pair(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v


def _conv(ctx: _Context, fx: torch.fx.Node, x: str, w: torch.Tensor, b: torch.Tensor | None,
          stride: Any, padding: Any, dilation: Any, groups: int) -> _Tensor:
    if w.dim() != 4:
        raise UnsupportedAttr(f"only 2-D convolutions are supported (weight has {w.dim()} dims)")
    if isinstance(padding, str):
        raise UnsupportedAttr(f"padding={padding!r}; use explicit integer padding")
    if b is None:
        b = torch.zeros(w.shape[0])
    out = fx.meta["val"].shape
    macs = math.prod(out) * w.shape[1] * w.shape[2] * w.shape[3] // out[0]
    attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation), "groups": int(groups)}
    return ctx.emit(fx, "conv", [x], attrs, {"weight": w, "bias": b}, macs, prefer_module_name=True)


@converts(aten.conv2d.default)
def _conv2d(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _conv(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                 ctx.arg(fx, 3, "stride", 1), ctx.arg(fx, 4, "padding", 0), ctx.arg(fx, 5, "dilation", 1),
                 ctx.arg(fx, 6, "groups", 1))


@converts(aten.convolution.default)
def _convolution(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    if ctx.arg(fx, 6, "transposed"):
        raise UnsupportedAttr("transposed convolution")
    return _conv(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                 ctx.arg(fx, 3, "stride"), ctx.arg(fx, 4, "padding"), ctx.arg(fx, 5, "dilation"),
                 ctx.arg(fx, 8, "groups"))


def _linear_node(ctx: _Context, fx: torch.fx.Node, x: str, w: torch.Tensor, b: torch.Tensor | None) -> _Tensor:
    if b is None:
        b = torch.zeros(w.shape[0])
    out = fx.meta["val"].shape
    macs = math.prod(out) * w.shape[1]
    return ctx.emit(fx, "linear", [x], {}, {"weight": w, "bias": b}, macs, prefer_module_name=True)


@converts(aten.linear.default)
def _linear(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _linear_node(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"))


@converts(aten.addmm.default)
def _addmm(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    if ctx.arg(fx, 3, "beta", 1) != 1 or ctx.arg(fx, 4, "alpha", 1) != 1:
        raise UnsupportedAttr("addmm with alpha/beta other than 1")
    return _linear_node(ctx, fx, ctx.tensor(fx, 1, "mat1"), ctx.const(fx, 2, "mat2").t(), ctx.const(fx, 0, "input"))


@converts(aten.mm.default)
def _mm(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _linear_node(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "mat2").t(), None)


def _batch_norm(ctx: _Context, fx: torch.fx.Node, x: str, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                mean: torch.Tensor, var: torch.Tensor, eps: float) -> _Tensor:
    scale = (var + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale + (beta if beta is not None else 0)
    prev = ctx.by_name[x]
    src = fx.args[0]
    if prev.op == "conv" and ctx.fx_of.get(x) is src and len(src.users) == 1:
        # Fold into the conv: w' = w * scale, b' = b * scale + shift. The conv keeps its
        # name and takes this op's output shape (identical).
        w = ctx.params[f"{x}.weight"]
        ctx.params[f"{x}.weight"] = (w * scale.reshape(-1, 1, 1, 1)).contiguous()
        ctx.params[f"{x}.bias"] = (ctx.params[f"{x}.bias"] * scale + shift).contiguous()
        return _Tensor(x)
    # A batch norm with no conv before it becomes a depthwise 1x1 conv.
    c = scale.numel()
    attrs = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": c}
    macs = math.prod(fx.meta["val"].shape)
    return ctx.emit(fx, "conv", [x], attrs, {"weight": scale.reshape(c, 1, 1, 1), "bias": shift}, macs, True)


@converts(aten.batch_norm.default)
def _bn(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    if ctx.arg(fx, 5, "training"):
        raise UnsupportedAttr("batch norm in training mode; call model.eval() before exporting")
    return _batch_norm(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                       ctx.const(fx, 3, "running_mean"), ctx.const(fx, 4, "running_var"), ctx.arg(fx, 7, "eps"))


@converts(aten._native_batch_norm_legit_no_training.default)
def _bn_no_training(ctx: _Context, fx: torch.fx.Node) -> tuple:
    out = _batch_norm(ctx, fx, ctx.tensor(fx, 0, "input"), ctx.const(fx, 1, "weight"), ctx.const(fx, 2, "bias"),
                      ctx.const(fx, 3, "running_mean"), ctx.const(fx, 4, "running_var"), ctx.arg(fx, 6, "eps"))
    return (out, None, None)


@converts(operator.getitem)
def _getitem(ctx: _Context, fx: torch.fx.Node) -> Any:
    container, index = ctx.arg(fx, 0, "a"), ctx.arg(fx, 1, "b")
    if not isinstance(container, (list, tuple)) or index != 0:
        raise UnsupportedAttr("only the first output of a multi-output op is supported")
    return container[index]


def _clamp(ctx: _Context, fx: torch.fx.Node, lo: float | None, hi: float | None) -> _Tensor:
    return ctx.emit(fx, "clamp", [ctx.tensor(fx, 0, "input")], {"min": lo, "max": hi})


@converts(aten.relu.default, aten.relu_.default)
def _relu(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _clamp(ctx, fx, 0.0, None)


@converts(aten.relu6.default)
def _relu6(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _clamp(ctx, fx, 0.0, 6.0)


@converts(aten.hardtanh.default, aten.hardtanh_.default)
def _hardtanh(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _clamp(ctx, fx, float(ctx.arg(fx, 1, "min_val", -1.0)), float(ctx.arg(fx, 2, "max_val", 1.0)))


@converts(aten.clamp.default, aten.clamp_.default)
def _clamp_op(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    lo, hi = ctx.arg(fx, 1, "min"), ctx.arg(fx, 2, "max")
    return _clamp(ctx, fx, None if lo is None else float(lo), None if hi is None else float(hi))


@converts(aten.clamp_min.default)
def _clamp_min(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _clamp(ctx, fx, float(ctx.arg(fx, 1, "min")), None)


@converts(aten.clamp_max.default)
def _clamp_max(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _clamp(ctx, fx, None, float(ctx.arg(fx, 1, "max")))


@converts(aten.add.Tensor, aten.add_.Tensor)
def _add(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    if ctx.arg(fx, 2, "alpha", 1) != 1:
        raise UnsupportedAttr("add with alpha != 1")
    a, b = ctx.tensor(fx, 0, "self"), ctx.tensor(fx, 1, "other")
    if ctx.by_name[a].shape != ctx.by_name[b].shape:
        raise UnsupportedAttr("add with broadcasting")
    return ctx.emit(fx, "add", [a, b])


def _pad(ctx: _Context, fx: torch.fx.Node, pads: list[int], value: float | None) -> _Tensor:
    if value not in (None, 0, 0.0):
        raise UnsupportedAttr(f"padding value {value}; only zero padding is supported")
    if len(pads) != 4 or min(pads) < 0:
        raise UnsupportedAttr(f"pad {pads}; only non-negative padding of H and W is supported")
    return ctx.emit(fx, "pad", [ctx.tensor(fx, 0, "input")], {"pads": [int(p) for p in pads]})


@converts(aten.pad.default)
def _pad_op(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    if ctx.arg(fx, 2, "mode", "constant") != "constant":
        raise UnsupportedAttr(f"pad mode {ctx.arg(fx, 2, 'mode')!r}; only constant padding is supported")
    return _pad(ctx, fx, list(ctx.arg(fx, 1, "pad")), ctx.arg(fx, 3, "value"))


@converts(aten.constant_pad_nd.default)
def _constant_pad(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    return _pad(ctx, fx, list(ctx.arg(fx, 1, "pad")), ctx.arg(fx, 2, "value", 0))


@converts(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def _maxpool(ctx: _Context, fx: torch.fx.Node) -> Any:
    kernel = _pair(ctx.arg(fx, 1, "kernel_size"))
    stride = _pair(ctx.arg(fx, 2, "stride", []) or kernel)
    attrs = {"kernel": kernel, "stride": stride, "padding": _pair(ctx.arg(fx, 3, "padding", 0)),
             "dilation": _pair(ctx.arg(fx, 4, "dilation", 1)), "ceil_mode": bool(ctx.arg(fx, 5, "ceil_mode", False))}
    out = ctx.emit(fx, "maxpool", [ctx.tensor(fx, 0, "input")], attrs)
    return (out, None) if fx.target == aten.max_pool2d_with_indices.default else out


def _avgpool(ctx: _Context, fx: torch.fx.Node, x: str, kernel: list[int], stride: list[int],
             padding: list[int]) -> _Tensor:
    macs = math.prod(fx.meta["val"].shape) * kernel[0] * kernel[1]
    attrs = {"kernel": kernel, "stride": stride, "padding": padding}
    return ctx.emit(fx, "avgpool", [x], attrs, macs=macs)


@converts(aten.avg_pool2d.default)
def _avg_pool2d(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    kernel = _pair(ctx.arg(fx, 1, "kernel_size"))
    padding = _pair(ctx.arg(fx, 3, "padding", 0))
    if ctx.arg(fx, 4, "ceil_mode", False):
        raise UnsupportedAttr("avg_pool2d with ceil_mode=True")
    if any(padding) and not ctx.arg(fx, 5, "count_include_pad", True):
        raise UnsupportedAttr("avg_pool2d with padding and count_include_pad=False")
    if ctx.arg(fx, 6, "divisor_override") is not None:
        raise UnsupportedAttr("avg_pool2d with divisor_override")
    stride = _pair(ctx.arg(fx, 2, "stride", []) or kernel)
    return _avgpool(ctx, fx, ctx.tensor(fx, 0, "input"), kernel, stride, padding)


@converts(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    x = ctx.tensor(fx, 0, "input")
    h, w = ctx.by_name[x].shape[-2:]
    oh, ow = _pair(ctx.arg(fx, 1, "output_size"))
    if h % oh or w % ow:
        raise UnsupportedAttr(f"adaptive_avg_pool2d from {h}x{w} to {oh}x{ow} (sizes must divide)")
    kernel = [h // oh, w // ow]
    return _avgpool(ctx, fx, x, kernel, kernel, [0, 0])


@converts(aten.mean.dim)
def _mean(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    x = ctx.tensor(fx, 0, "input")
    shape = ctx.by_name[x].shape
    dims = sorted(d % len(shape) for d in ctx.arg(fx, 1, "dim"))
    if len(shape) != 4 or dims != [2, 3]:
        raise UnsupportedAttr(f"mean over dims {dims} of a {len(shape)}-D tensor; only the spatial mean is supported")
    if ctx.arg(fx, 2, "keepdim", False):
        return _avgpool(ctx, fx, x, list(shape[2:]), list(shape[2:]), [0, 0])
    # Global pool, then drop the two unit dims.
    pooled = Node(f"{fx.name}_pool", "avgpool", [x], (*shape[:2], 1, 1),
                  {"kernel": list(shape[2:]), "stride": list(shape[2:]), "padding": [0, 0]},
                  math.prod(shape), _where(fx))
    ctx.nodes.append(pooled)
    ctx.by_name[pooled.name] = pooled
    ctx.names.add(pooled.name)
    return ctx.emit(fx, "reshape", [pooled.name])


@converts(aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    x = ctx.tensor(fx, 0, "input")
    if fx.meta["val"].shape[0] != ctx.by_name[x].shape[0]:
        raise UnsupportedAttr("reshape that changes the batch dimension")
    return ctx.emit(fx, "reshape", [x])


@converts(aten.cat.default)
def _cat(ctx: _Context, fx: torch.fx.Node) -> _Tensor:
    parts = ctx.arg(fx, 0, "tensors")
    if not all(isinstance(p, _Tensor) for p in parts):
        raise UnsupportedAttr("cat of a constant")
    axis = ctx.arg(fx, 1, "dim", 0) % len(fx.meta["val"].shape)
    if axis == 0:
        raise UnsupportedAttr("cat along the batch dimension")
    return ctx.emit(fx, "concat", [p.node for p in parts], {"axis": axis})


_IDENTITY = [aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
             aten.detach.default, aten.feature_dropout.default, aten.dropout_.default, aten.lift_fresh_copy.default]


@converts(*_IDENTITY)
def _identity(ctx: _Context, fx: torch.fx.Node) -> Any:
    return ctx.arg(fx, 0, "input")


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


def scan_unsupported(ep: torch.export.ExportedProgram) -> list[tuple[str, str, str]]:
    """Every op occurrence with no converter (weight-only sub-graphs are fine: they are folded)."""
    consts = _constant_inputs(ep)
    const_nodes: set[torch.fx.Node] = set()
    problems = []
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in consts:
                const_nodes.add(n)
        elif n.op == "get_attr" or (n.op == "call_function" and _is_const_op(n, const_nodes)):
            const_nodes.add(n)
        elif n.op == "call_function" and n.target not in CONVERTERS:
            problems.append((_op_name(n.target), _where(n), ""))
        elif n.op in ("call_module", "call_method"):
            problems.append((str(n.target), _where(n), "not a flat ATen graph"))
    return problems


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(target) if str(target).startswith("aten.") else name


def capture(ep: torch.export.ExportedProgram, name: str = "model") -> Graph:
    """Convert an exported program to a `Graph`; raises `UnsupportedOpsError` listing all problems."""
    problems = scan_unsupported(ep)
    if problems:
        raise UnsupportedOpsError(problems)
    consts = _constant_inputs(ep)
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
                    ctx.nodes.append(Node(n.name, "input", [], shape, source="model input"))
                    ctx.by_name[n.name] = ctx.nodes[-1]
                    ctx.names.add(n.name)
                    ctx.values[n] = _Tensor(n.name)
            elif n.op == "get_attr":
                ctx.values[n] = getattr(ep.graph_module, n.target)
            elif n.op == "call_function":
                args = [ctx.values.get(i) for i in n.all_input_nodes]
                if args and not any(isinstance(a, _Tensor) or isinstance(a, (list, tuple)) for a in args):
                    with torch.no_grad():  # weight-only sub-graph: fold it now
                        ctx.values[n] = n.target(*ctx.resolve(n.args), **ctx.resolve(n.kwargs))
                else:
                    ctx.values[n] = CONVERTERS[n.target](ctx, n)
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
