"""Quantize: Graph + calibration data + BitPlan -> QuantizedGraph (the integer IR).

1. Calibrate every tensor's range (`calibrate`).
2. Lower node by node: weights to per-channel symmetric integers, activations
   to int8/uint8 (unsigned where the tensor is non-negative, e.g. after ReLU), or
   to int16 where the BitPlan's `activation_bits` says 16 (`check_activation_bits`),
   clamps fused into the conv/linear/add that feeds them, and every change of
   scale turned into a dyadic multiplier.
3. Refine layer by layer on calibration data, the float graph and the fake-quant
   graph running side by side: GPTQ rounding of the weights (`rounding`), then
   empirical bias correction (each layer's mean output error folded into its
   int32 bias), so later layers see the refined earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import LowbitError
from ..ir import Op, QuantizedGraph, Value
from ..ir.dtypes import activation_dtype, qrange, steps
from ..ir.ops import OPS, QUANTIZABLE_OPS, SCALE_PRESERVING_OPS, op_def
from ..ir.ops._layer import channel_axis, f32
from ..ir.ops.clamp import integer_bounds
from ..ir.ops.quantize import input_dtype
from ..ir.weights import weight_range
from .calibrate import TensorStats, clip_threshold, collect_stats, round_weight
from .config import BitPlan, QuantConfig
from .graph import Graph, Node, run_node
from .inputs import CalibData, ModelInputs, TorchInputs, model_inputs, real_tokens, token_mask
from .rounding import HessianAccumulator, gptq_round
from .simulate import dequantized_params, fake_quantizers

if TYPE_CHECKING:
    from .recipe import Recipe

Log = Callable[[str], None]
CALIBRATION_BATCH = 16
HESSIAN_CHUNK_ELEMENTS = 1 << 20  # input elements per unfold for a layer's Hessian (memory: times the kernel size)


def fusable_clamps(graph: Graph) -> dict[str, Node]:
    """Producer name -> the clamp it can absorb (the clamp is its only consumer)."""
    fused = {}
    for n in graph.nodes:
        if OPS[n.op].absorbs_clamp and n.name not in graph.outputs:
            consumers = graph.consumers(n.name)
            if len(consumers) == 1 and consumers[0].op == "clamp":
                fused[n.name] = consumers[0]
    return fused


def scaled_tensors(graph: Graph) -> set[str]:
    """The tensors that get a scale of their own (the others inherit their input's, or are fused away)."""
    fused = fusable_clamps(graph)
    return {n.name for n in graph.nodes if n.op not in SCALE_PRESERVING_OPS and n.name not in fused
            and OPS[n.op].calibrated and not (n.op == "input" and input_dtype(n) != "float32")}


def check_activation_bits(graph: Graph, activation_bits: dict[str, int]) -> None:
    """Refuse a plan's activation bit-widths that the model cannot take, naming each tensor and why (see
    `int16_refusal`)."""
    problems = [f"{name}={bits}: supported activation bit-widths are 8 and 16"
                for name, bits in activation_bits.items() if bits not in (8, 16)]
    problems += [why for name, bits in sorted(activation_bits.items()) if bits == 16
                 for why in [int16_refusal(graph, name)] if why]
    if problems:
        raise LowbitError("the bit plan's activation_bits do not fit the model: " + "; ".join(problems)
                          + f". Tensors that can be 16-bit: the outputs of {', '.join(sorted(QUANTIZABLE_OPS))}, "
                          "add, concat, avgpool and inputs, where no table-lookup op reads them")


def int16_refusal(graph: Graph, name: str) -> str | None:
    """Why tensor `name` cannot be 16-bit, or None when it can.

    A tensor may be 16-bit when it gets its own scale (`scaled_tensors`), is not a layer's raw int32
    accumulator (a graph output), and every op that reads its integers accepts int16 (`OpDef.int16_refusal`),
    including the ops behind scale-preserving ones (pad, maxpool, reshape, clamp), which pass the int16 on.
    """
    fused_clamps = {c.name for c in fusable_clamps(graph).values()}
    scaled = {n for n in scaled_tensors(graph) if graph.node(n).op != "clamp" or n in fused_clamps}
    if name not in scaled:
        why = ("no such tensor" if name not in {n.name for n in graph.nodes} else
               "it has no scale of its own (it keeps its input's grid, or is a clamp fused into its producer: "
               "name the clamp instead)")
        return f"{name}: {why}"
    if name in graph.outputs and OPS[graph.node(name).op].quantizable:
        return f"{name}: a graph output of a layer stays the int32 accumulator, with no activation grid"
    refused = [f"{name}: read by {reader.name} ({reader.op}), and {reader.op} cannot take int16: {why}"
               for reader, why in _int16_readers(graph, name)]
    return "; ".join(refused) or None


def integer_readers(graph: Graph, name: str) -> list[str]:
    """The layers that read tensor `name`'s integers: directly, or through ops that keep its grid (pad,
    maxpool, reshape, clamp). A 16-bit `name` makes each of them run on a 16-bit input."""
    found = []
    for reader in graph.consumers(name):
        if OPS[reader.op].quantizable:
            found.append(reader.name)
        elif OPS[reader.op].scale_preserving or reader.op == "clamp":
            found += integer_readers(graph, reader.name)
    return found


def int16_candidates(graph: Graph) -> list[str]:
    """The tensors a plan may keep at 16 bits (those not 16-bit anyway), in graph order."""
    wide = wide_tensors(graph)
    return [n.name for n in graph.nodes if n.name not in wide and int16_refusal(graph, n.name) is None]


def wide_tensors(graph: Graph) -> set[str]:
    """The tensors that are int16 whatever the plan says: the first input of each `wide_input` op (LayerNorm's),
    and where that is a sum (a residual add), the layer outputs only that sum reads.

    A transformer's residual stream is a sum of a wide stream and a layer's output whose few outlier channels
    dominate its range (MiniLM's FFN outputs reach 196 where most channels stay within 3): at 8 bits they cost
    the embedding most of its accuracy (cosine 0.84 against 0.97 with them at 16 bits, the rest 8-bit). A
    layer's requantizer writes 16 bits as cheaply as 8, and the sum reads them as they are."""
    wide = {n.inputs[0] for n in graph.nodes if OPS[n.op].wide_input}
    for name in list(wide):
        if graph.node(name).op == "add":
            wide.update(i for i in graph.node(name).inputs
                        if OPS[graph.node(i).op].quantizable and len(graph.consumers(i)) == 1)
    return wide


def _int16_readers(graph: Graph, name: str) -> list[tuple[Node, str]]:
    """The ops that would read tensor `name`'s int16 integers and refuse to, with their reasons."""
    refused = []
    for reader in graph.consumers(name):
        op = OPS[reader.op]
        if op.int16_refusal:
            refused.append((reader, op.int16_refusal))
        elif op.scale_preserving or reader.op == "clamp":  # (a clamp reading a named tensor is never fused)
            refused += _int16_readers(graph, reader.name)  # it passes the int16 grid on
    return refused


def activation_grid(stats: TensorStats, bits: int, clamp: Node | None, config: QuantConfig,
                    ratio: float | None = None) -> tuple[str, np.float32, int, int]:
    """A tensor's integer grid: (dtype, scale, qmin, qmax). Its clipping threshold is `ratio` * max|x| if given,
    else what `config.calib_method` picks; a clamp fused into its producer narrows the range."""
    lo = clamp.attrs["min"] if clamp else None
    hi = clamp.attrs["max"] if clamp else None
    unsigned = stats.nonnegative or (lo is not None and lo >= 0)
    if ratio is not None:
        t = ratio * stats.absmax
    else:
        t = clip_threshold(stats, config.calib_method, not unsigned, config.percentile, bits=bits)
    if hi is not None and lo is not None:
        t = min(t, max(abs(lo), abs(hi)))
    t = max(t, 1e-8)  # an all-zero tensor still needs a valid scale
    dtype = activation_dtype(bits, unsigned)
    scale = f32(t / steps(dtype))
    qmin, qmax = integer_bounds(lo, hi, scale, *qrange(dtype))
    return dtype, scale, qmin, qmax


class Lowering:
    """The state of one lowering pass; each op's `lower` (in `lowbit.ir.ops`) calls these helpers."""

    def __init__(self, graph: Graph, stats: dict[str, TensorStats], plan: BitPlan, config: QuantConfig,
                 range_ratios: Mapping[str, float] | None = None):
        self.graph, self.stats, self.plan, self.config = graph, stats, plan, config
        self.range_ratios = range_ratios or {}  # tensor -> its clipping threshold as a fraction of max|x|
        self.values: dict[str, Value] = {}
        self.ops: list[Op] = []
        self.float_to_int: dict[str, str] = {}
        self.fused = fusable_clamps(graph)
        self.wide = wide_tensors(graph)

    def ir_name(self, float_name: str) -> str:
        return f"{float_name}_int" if float_name in self.graph.outputs else float_name

    def input_value(self, node: Node, index: int = 0) -> Value:
        return self.values[self.float_to_int[node.inputs[index]]]

    def add_value(self, float_name: str, value: Value) -> Value:
        self.values[value.name] = value
        self.float_to_int[float_name] = value.name
        return value

    def graph_input(self, name: str, dtype: str, shape: tuple[int, ...]) -> Value:
        """A graph input of the IR: float32 (quantized next), or int64 (read as it is)."""
        self.values[name] = Value(name, dtype, shape)
        return self.values[name]

    def like(self, float_name: str, src: Value, shape: tuple[int, ...]) -> Value:
        """A value on the same integer grid as `src` (pad, maxpool, reshape, clamp)."""
        return self.add_value(float_name, Value(self.ir_name(float_name), src.dtype, shape, src.scale))

    def accumulator(self, node: Node, scales: list[float], axis: int) -> Value:
        """An int32 value with per-channel scales along `axis` (a layer's raw accumulator, as a graph output)."""
        return self.add_value(node.name, Value(self.ir_name(node.name), "int32", node.shape, scales, 0, axis))

    def is_fused_clamp(self, node: Node) -> bool:
        return any(c is node for c in self.fused.values())

    def value(self, float_name: str, dtype: str, shape: tuple[int, ...], scale: float) -> Value:
        """A new value on a grid the op fixes itself (an accumulator, probabilities, an embedding table's)."""
        return self.add_value(float_name, Value(self.ir_name(float_name), dtype, shape, f32(scale)))

    def activation(self, float_name: str, shape: tuple[int, ...], clamp: Node | None = None,
                   ir_name: str | None = None) -> tuple[Value, int, int]:
        """A new value for a float tensor (8-bit, or int16 where the plan says 16 or a reader needs it), with its
        clamp range in integer units."""
        bits = 16 if float_name in self.wide else self.plan.activation(float_name)
        ratio = self.range_ratios.get(float_name) if bits == 8 else None
        dtype, scale, qmin, qmax = activation_grid(self.stats[float_name], bits, clamp, self.config, ratio)
        value = self.add_value(float_name, Value(ir_name or self.ir_name(float_name), dtype, shape, scale))
        return value, qmin, qmax

    def round_weight(self, node: Node, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Round-to-nearest integer weights (int8 array) and per-channel float32 scales of a layer."""
        w_int, w_scale = round_weight(self.graph.weight(node.name), bits, self.config.weight_method)
        return w_int.numpy().astype(np.int8), w_scale.numpy().astype(np.float32)

    def emit(self, name: str, op: str, inputs: list[Value], output: Value, attrs: dict | None = None,
             arrays: dict[str, np.ndarray] | None = None) -> None:
        self.ops.append(Op(name, op, [v.name for v in inputs], output.name, attrs or {}, arrays or {}))

    def lower(self, node: Node) -> None:
        op = op_def(node.op)
        if op.lower is None:
            raise LowbitError(f"node {node.name}: op {node.op!r} has no lowering to integers")
        op.lower(self, node)

    def finish(self) -> QuantizedGraph:
        for name in self.graph.outputs:
            src = self.values[self.float_to_int[name]]
            out = Value(name, "float32", src.shape)
            self.values[name] = out
            self.emit(f"{name}_dequantize", "dequantize", [src], out)
        return QuantizedGraph(self.values, self.ops, list(self.graph.inputs), list(self.graph.outputs),
                              self.graph.name, self.float_to_int)


def check_lowerable(graph: Graph) -> None:
    """Refuse, before any work, a graph with ops that have no integer lowering yet, naming each op and its nodes."""
    missing: dict[str, list[str]] = {}
    for n in graph.nodes:
        if op_def(n.op).lower is None:
            missing.setdefault(n.op, []).append(n.name)
    if missing:
        ops = "; ".join(f"{op} ({len(names)} node(s): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                        for op, names in missing.items())
        raise LowbitError(f"model {graph.name!r} cannot be quantized yet: these ops have no integer lowering in "
                          f"lowbit: {ops}. They capture and run in float (run_graph), but quantize, sensitivity "
                          "and the backends need every op lowered to integers.")


def lower_to_integer(graph: Graph, stats: dict[str, TensorStats], plan: BitPlan, config: QuantConfig,
                     range_ratios: Mapping[str, float] | None = None) -> QuantizedGraph:
    """The float graph as integer ops, round-to-nearest weights; `range_ratios` override the clipping threshold
    of those 8-bit tensors (as a fraction of max|x|)."""
    check_lowerable(graph)
    lowering = Lowering(graph, stats, plan, config, range_ratios)
    for node in graph.nodes:
        lowering.lower(node)
    return lowering.finish()


def _channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def layer_hessian(graph: Graph, node: Node, x: torch.Tensor) -> torch.Tensor:
    """GPTQ's H = mean X Xᵀ of one layer's inputs `x`, per group: [groups, K, K]."""
    columns = op_def(node.op).input_columns
    weight_shape = tuple(graph.weight(node.name).shape)
    hessian = HessianAccumulator()
    # Bounded memory, yet few calls: a linear's token rows (a few hundred elements each) go thousands at once.
    rows = max(1, HESSIAN_CHUNK_ELEMENTS // max(1, x[0].numel()))
    for chunk in torch.split(x, rows):
        hessian.add(columns(node.attrs, weight_shape, chunk))
    return hessian.result()


def gptq_weight(graph: Graph, node: Node, hessian: torch.Tensor, scale: np.ndarray | torch.Tensor,
                bits: int) -> torch.Tensor:
    """GPTQ-rounded integer weights of one layer, given its input Hessian and per-channel `scale`."""
    w = graph.weight(node.name)
    groups = hessian.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(groups, -1)
    qmin, qmax = weight_range(bits)
    return gptq_round(w.reshape(groups, w.shape[0] // groups, -1), hessian, scale, qmin, qmax).reshape(w.shape)


def gptq_layer(graph: Graph, node: Node, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Re-round one layer's weights with GPTQ on its (quantized) inputs `x` (a linear's may be rows of real
    tokens, [tokens, in_features]); returns the new float weights."""
    scale = np.asarray(op.attrs["weight_scale"], dtype=np.float64)
    w_int = gptq_weight(graph, node, layer_hessian(graph, node, x), scale, op.attrs["weight_bits"])
    op.arrays["weight"] = w_int.numpy().astype(np.int8)
    return (w_int * _channel_view(torch.from_numpy(scale), w_int.dim(), 0)).float()


# A layer's step in `walk_side_by_side`: (node, its IR op, its fake-quant input, its float output) -> the
# layer's fake-quant output (before the rounding of its output to the grid).
LayerStep = Callable[[Node, Op, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def walk_side_by_side(graph: Graph, qgraph: QuantizedGraph, x: TorchInputs, layer_step: LayerStep,
                      float_rows: slice = slice(None)) -> None:
    """Run the float graph and the fake-quant graph side by side on inputs `x`, each layer through `layer_step`.

    The step may change the layer's IR op in place (its weights or bias), so later layers see the
    refined earlier ones: the basis of GPTQ's and bias correction's layer-by-layer refinement.
    The float graph runs on the samples `float_rows` of `x` only (the step's float output has just those).
    """
    quantizers = fake_quantizers(qgraph)
    last_use = graph.last_uses()
    float_env: dict[str, torch.Tensor] = {}
    quant_env: dict[str, torch.Tensor] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "input":
            q = x[node.name]
            f = q[float_rows]
        else:
            f = run_node(graph, node, [float_env[n] for n in node.inputs])
            args = [quant_env[n] for n in node.inputs]
            q = (layer_step(node, qgraph.op(node.name), args[0], f) if node.op in QUANTIZABLE_OPS
                 else run_node(graph, node, args))
        fq = quantizers.get(node.name)
        float_env[node.name], quant_env[node.name] = f, (fq(q) if fq else q)
        for name in node.inputs:
            if last_use[name] == i:
                del float_env[name], quant_env[name]


def refine_layers(graph: Graph, qgraph: QuantizedGraph, x: TorchInputs, config: QuantConfig,
                  gptq_layers: Collection[str], log: Log = lambda _: None) -> None:
    """Layer by layer, in place: GPTQ rounding of `gptq_layers`, then empirical bias correction (if configured)."""
    weights, biases = dequantized_params(qgraph)
    mask = token_mask(graph, x)  # a text model's padded positions stay out of the Hessians
    n_layers = len(qgraph.layers)
    steps = [f"GPTQ rounding of {len(gptq_layers)}/{n_layers} layers"]
    steps += ["bias correction"] if config.bias_correction else []
    done = 0

    def refine(node: Node, op: Op, q_input: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if node.name in gptq_layers:
            weights[node.name] = gptq_layer(graph, node, op, real_tokens(q_input, mask))
        q = run_node(graph, node, [q_input], weights[node.name], biases[node.name])
        if config.bias_correction:
            q = _correct_bias(op, q, f, channel_axis(node.op, q.dim()))
        done += 1
        log(f"refining layers ({', '.join(steps)}): {done}/{n_layers}")
        return q

    walk_side_by_side(graph, qgraph, x, refine)


def _correct_bias(op: Op, q: torch.Tensor, f: torch.Tensor, channel: int) -> torch.Tensor:
    """Fold the mean output error per channel into the int32 bias; returns the corrected output."""
    dims = [d for d in range(q.dim()) if d != channel]
    err = (q - f).mean(dims).double().numpy()
    step = np.float64(op.attrs["input_scale"]) * np.asarray(op.attrs["weight_scale"], np.float64)
    delta = np.round(err / step)
    op.arrays["bias"] = np.clip(op.arrays["bias"] - delta, *qrange("int32")).astype(np.int32)
    return q - _channel_view(torch.from_numpy(delta * step).float(), q.dim(), channel)


def check_calibration_data(graph: Graph, calib: CalibData, where: str) -> None:
    """Refuse empty, non-finite or wrongly shaped calibration data with a clear message (`model_inputs`)."""
    model_inputs(graph, calib, where)


def calibrate(graph: Graph, calib: CalibData | ModelInputs, log: Log = lambda _: None) -> dict[str, TensorStats]:
    """Activation statistics of every tensor that gets its own scale (independent of the bit plan)."""
    calib = model_inputs(graph, calib, "calibration")
    return collect_stats(graph, lambda: calib.batches(CALIBRATION_BATCH), scaled_tensors(graph), log)


def quantize(graph: Graph, calib: CalibData | ModelInputs, config: QuantConfig | None = None,
             plan: BitPlan | None = None, log: Log = lambda _: None, stats: dict[str, TensorStats] | None = None,
             recipe: Recipe | None = None) -> QuantizedGraph:
    """The quantize stage: float `Graph` -> integer `QuantizedGraph`.

    `recipe`: the range method and GPTQ layers to use; default: the one `config` names, its `auto` parts
    chosen on a validation split of `calib` (`choose_recipe`). `stats` (from `calibrate` on the same data)
    skips calibration, e.g. when a search quantizes many plans.
    """
    from .recipe import choose_recipe  # it quantizes candidates with this module's lowering

    check_lowerable(graph)
    config = config or QuantConfig()
    plan = plan or BitPlan.uniform(graph, config.bits)
    plan.validate(graph)
    calib = model_inputs(graph, calib, "calibration")
    recipe = recipe or choose_recipe(graph, calib, config, plan, log)
    stats = stats if stats is not None else calibrate(graph, calib, log)
    qgraph = lower_to_integer(graph, stats, plan, replace(config, calib_method=recipe.calib_method),
                              recipe.range_ratios)
    if config.bias_correction or recipe.gptq_layers:
        refine_layers(graph, qgraph, calib.take(slice(config.refine_samples)).tensors(), config, recipe.gptq_layers,
                      log)
    return qgraph
