"""SmoothQuant (Xiao et al. 2023) as a float-graph transform that runs before quantization.

A group is the linears that read one tensor X. Per input channel j of X,

    s_j = max|X_j|^α / max over the group's linears of max|W[:, j]|^(1-α),

X is divided by s (folded into the op that produces X) and the group's weight columns are multiplied by s.
The float function is unchanged; X's per-channel ranges even out, so a per-tensor int8 scale wastes fewer
steps on a few outlier channels. The graph keeps its shape: only parameters change.

Where 1/s can fold:
- into a linear's output rows and bias, through reshape, permute and the value operand of a matmul, with the
  channels followed one by one (BERT's attention context A·V feeding attention.output.dense: the head split
  maps context channel h*d_head + k back to value channel h*d_head + k);
- into a LayerNorm's gamma and beta (or a linear's rows) when X's other readers, if any, are adds: each such
  add multiplies X by s per channel before its sum (`ops.add`, `channel_scale`), so the residual stream of a
  post-LN model (BERT: every LayerNorm output feeds q/k/v or intermediate.dense and the residual add) is
  unchanged;
- into an elementwise table op (gelu feeding output.dense): its node computes f(x)/s per channel
  (`ops.lut`, `channel_scale`), and its integer form is one 256-entry table per channel, exact on the grid.

Where it cannot, the group is measured and reported but left alone: X is read by an op other than the group's
linears and adds, or comes from an op with no per-channel parameters (a graph input, softmax...).

All statistics come from one float run on the calibration inputs, over real tokens only (padding is masked
out when the graph reads an attention mask). Scales use the original weights, so groups are independent.
alpha is scored on held-back calibration samples: on the samples it is fitted on, the error keeps falling up
to alpha = 1 (every channel's range exactly equalized), while unseen text then clips the channels it lifts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import LowbitError
from ..ir.ops.lut import TABLE_OPS
from .graph import Graph, Node, run_graph
from .inputs import MASK_READERS, real_tokens, token_mask

# SmoothQuant's range (0.5 is its default) and 0.9: on MiniLM-L6 the held-back error is lowest at 0.7-0.9 in every
# group kind and rises again at 1.0 (64 calibration sentences).
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TRANSIT_OPS = ("reshape", "permute", "matmul")  # 1/s passes through these channel by channel (checked)
SCALABLE_OPS = ("linear", "layer_norm")  # a weight and bias per output channel on the last axis
VALIDATION_FRACTION = 0.25  # of the calibration samples, held back to score alpha (as QuantConfig's default)
Alpha = float | str  # a migration strength in [0, 1], or "auto"


def check_alpha(alpha: object, where: str = "smooth") -> Alpha:
    """`alpha` as a float in [0, 1] or "auto"; a LowbitError naming `where` otherwise."""
    if alpha == "auto":
        return "auto"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"{where}: alpha {alpha!r} must be a number in [0, 1] (0.5 is SmoothQuant's default) "
                          f'or "auto" (searched per group)')
    return float(alpha)


def parse_smooth(text: str, where: str = "--smooth") -> Alpha | None:
    """The config's text form: "none" -> None, "auto", or a number in [0, 1] written as text ("default" is
    resolved per graph by `resolve_smooth` and parses as "auto" here)."""
    if text in ("none", "auto", "default"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise LowbitError(f"{where} {text!r}: expected none, auto, or a migration strength alpha in [0, 1] "
                          "such as 0.5")
    return value


def resolve_smooth(text: str, graph: Graph) -> str:
    """The config's `smooth` for `graph`: "default" is auto for a graph that reads an attention mask (a
    transformer: on MiniLM-L6 it lifts the integer W8A8 cosine from 0.975 to 0.995) and none otherwise."""
    if text != "default":
        return text
    return "auto" if any(n.op in MASK_READERS for n in graph.nodes) else "none"


# -- simulated W8A8, as the search scores it ---------------------------------------------------------------

def quantize_activation(x: torch.Tensor, absmax: float | None = None, nonnegative: bool | None = None,
                        bits: int = 8) -> torch.Tensor:
    """Per-tensor fake-quant with a min/max range, symmetric as lowbit's calibration: [-T, T] in 127 steps each
    side, or [0, T] in 255 steps for a nonnegative tensor (at 8 bits). T and the sign default to `x`'s own."""
    t = float(x.abs().max()) if absmax is None else absmax
    unsigned = bool(x.min() >= 0) if nonnegative is None else nonnegative
    if t == 0.0:
        return x.clone()
    top = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
    step = t / top
    return torch.clamp(torch.round(x / step), 0 if unsigned else -top, top) * step


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel (row) symmetric int8 fake-quant, round to nearest."""
    step = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.clamp(torch.round(w / step), -127, 127) * step


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α); 1 for a channel that is all zero in X or in W (any s is exact there,
    and 1 leaves its producer untouched)."""
    s = x_absmax.pow(alpha) / w_absmax.pow(1.0 - alpha)
    dead = (x_absmax == 0) | (w_absmax == 0)
    return torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None, fit: torch.Tensor | None = None,
               reference: torch.Tensor | None = None) -> float:
    """Relative squared error of X·Wᵀ when X/s is quantized per tensor and W·s per output channel.

    The activation range is max|fit/s| (default: X's own): give the rows the scales and ranges were fitted on,
    so that X's values beyond them clip as unseen data would."""
    ref = x @ w.T if reference is None else reference
    ones = torch.ones(x.shape[-1], dtype=x.dtype)
    s = ones if s is None else s
    fit = x if fit is None else fit
    xq = quantize_activation(x / s, float((fit.abs().amax(0) / s).max()), bool(fit.min() >= 0))
    err = xq @ quantize_weight(w * s).T - ref
    return float(err.square().sum() / ref.square().sum().clamp_min(torch.finfo(ref.dtype).tiny))


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median over channels of the per-channel max|X_j|: 1 for even channels."""
    median = float(absmax.median())
    return float(absmax.max()) / median if median > 0 else math.inf


# -- which groups exist and where 1/s folds -------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """Where a group's 1/s goes: `producer`'s output channel `channels[j]` is X's channel j (its params, or for
    a table op its per-channel output scale); each add of `rescaled` multiplies X back by s."""

    producer: str
    channels: torch.Tensor
    rescaled: tuple[str, ...] = ()

    def describe(self) -> str:
        return " + ".join([self.producer, *(f"{add} x s" for add in self.rescaled)])


@dataclass(frozen=True)
class Group:
    tensor: str  # X, the tensor the linears read
    layers: tuple[str, ...]
    fold: Fold | None
    reason: str  # why 1/s cannot fold, when `fold` is None


def smoothing_groups(graph: Graph) -> list[Group]:
    """Every tensor read by linears, in graph order, with where its 1/s would fold (or why it cannot)."""
    readers: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "linear":
            readers.setdefault(node.inputs[0], []).append(node.name)
    groups = []
    for tensor, layers in readers.items():
        fold, reason = _find_fold(graph, tensor, set(layers))
        groups.append(Group(tensor, tuple(layers), fold, reason))
    return groups


def _find_fold(graph: Graph, tensor: str, layers: set[str]) -> tuple[Fold | None, str]:
    others = [n for n in graph.consumers(tensor) if n.name not in layers]
    if others:
        return _fold_with_adds(graph, tensor, others)
    chain: list[Node] = []
    node = graph.node(tensor)
    while node.op in TRANSIT_OPS:
        source = node.inputs[1] if node.op == "matmul" else node.inputs[0]  # matmul: the value operand
        if node.inputs.count(source) != 1 or len(graph.consumers(source)) != 1:
            return None, f"{source} (on the way to {tensor}) has other readers than {node.op} {node.name}"
        chain.append(node)
        node = graph.node(source)
    if node.op not in SCALABLE_OPS and not (node.op in TABLE_OPS and not chain):
        return None, (f"produced by {node.op} {node.name}, which has no per-channel weight and bias to take 1/s"
                      + (" (nonlinear)" if node.op != "input" else ""))
    channels = _follow_channels(node, chain[::-1])
    if channels is None:
        return None, f"the ops from {node.name} to {tensor} mix channels, so 1/s cannot go back channel by channel"
    return Fold(node.name, channels), ""


def _fold_with_adds(graph: Graph, tensor: str, others: list[Node]) -> tuple[Fold | None, str]:
    """X is also read by `others`: it folds if its producer takes 1/s itself and each of them is an add that can
    multiply X back by s (once, on an input not already rescaled)."""
    names = ", ".join(f"{n.op} {n.name}" for n in others)
    cannot = [n for n in others if n.op != "add" or n.inputs.count(tensor) != 1 or n.attrs.get(
        "channel_scale") is not None and n.attrs.get("channel_input") != n.inputs.index(tensor)]
    if cannot:
        return None, (f"also read by {names}, which would see X/s (only an add can rescale its input per "
                      "channel, once)")
    producer = graph.node(tensor)
    if producer.op not in SCALABLE_OPS and producer.op not in TABLE_OPS:
        return None, (f"also read by {names}, and produced by {producer.op} {producer.name}, which has no "
                      "per-channel weight and bias to take 1/s")
    return Fold(producer.name, torch.arange(producer.shape[-1]), tuple(n.name for n in others)), ""


def _follow_channels(producer: Node, chain: list[Node]) -> torch.Tensor | None:
    """Label each element of the producer's output with its channel, carry the labels through the chain and
    read, per channel of the last op's output, the producer channel it comes from; None if that is not a
    one-to-one map (a channel split across positions, or a contraction over the channel axis)."""
    width = producer.shape[-1]
    labels = torch.arange(width).expand(producer.shape[1:])  # per sample: the batch axis never moves
    for node in chain:
        if node.op == "reshape":
            labels = labels.reshape(node.shape[1:])
        elif node.op == "permute":
            dims = node.attrs["dims"]
            if dims[0] != 0:  # the per-sample labels assume the batch axis stays first
                return None
            labels = labels.permute([d - 1 for d in dims[1:]])
        else:  # matmul a @ v: out[..., m, n] = Σ_k a[..., m, k] v[..., k, n] is per channel iff v's label is one per n
            if labels.ndim < 2 or not bool((labels == labels[..., :1, :]).all()):
                return None
            labels = labels[..., :1, :].expand(node.shape[1:])
    rows = labels.reshape(-1, labels.shape[-1])
    channels = rows[0]
    if not bool((rows == channels).all()) or not torch.equal(channels.sort().values, torch.arange(width)):
        return None
    return channels.clone()


# -- measuring, choosing alpha, applying -------------------------------------------------------------------

@dataclass(frozen=True)
class GroupReport:
    tensor: str
    layers: tuple[str, ...]
    # The node that took 1/s (its weight and bias, or a table op's per-channel scale), then each add that
    # multiplies X back by s ("encoder.layer.0.attention.output.LayerNorm + add_4 x s"); "" when it cannot fold.
    folded_into: str
    reason: str  # why not, when folded_into is ""
    # The alpha chosen, or for a group that cannot fold, the one that would be; None: no alpha lowered the error
    # (auto) -- the group is left alone.
    alpha: float | None
    outliers_before: float  # max/median over channels of max|X_j| on the calibration tokens
    outliers_after: float  # the same for X/s (as it would be, for a group that cannot fold)
    # Relative squared error of X·Wᵀ under simulated W8A8 on the held-back samples, with scales and ranges
    # from the others: unsmoothed, and smoothed at `alpha`.
    error_before: float
    error_after: float

    @property
    def applied(self) -> bool:
        return bool(self.folded_into) and self.alpha is not None


@dataclass(frozen=True)
class SmoothReport:
    alpha: Alpha
    tokens: int  # calibration tokens the statistics come from
    groups: tuple[GroupReport, ...]

    def table(self) -> str:
        """One line per group: where it folds, alpha, outlier ratio and W8A8 error before -> after."""
        lines = [f"smoothing (alpha={self.alpha}, {self.tokens} calibration tokens): outliers = max/median of "
                 "per-channel max|X|, error = relative W8A8 error of X.W^T "
                 "on held-back samples",
                 f"{'tensor':44s} {'read by':40s} {'folded into':38s} {'alpha':>5s} {'outliers':>15s} "
                 f"{'error':>19s}"]
        for g in self.groups:
            alpha = "-" if g.alpha is None else f"{g.alpha:.1f}"
            readers, into = ", ".join(_short(x) for x in g.layers), _short(g.folded_into or "-")
            lines.append(f"{g.tensor:44s} {readers:40s} {into:38s} "
                         f"{alpha:>5s} {g.outliers_before:6.1f} -> {g.outliers_after:5.1f} "
                         f"{g.error_before:.2e} -> {g.error_after:.2e}{'' if g.applied else ' *'}")
        lines.append("* not applied; the figures after are what smoothing would give there:")
        lines += [f"  {g.tensor}: {g.reason or 'no alpha of the grid lowered the error'}"
                  for g in self.groups if not g.applied]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "tokens": self.tokens,
                "groups": [{**asdict(g), "layers": list(g.layers), "applied": g.applied} for g in self.groups]}


@dataclass(frozen=True)
class SmoothPlan:
    """The measured groups and their scales (also those that cannot fold: what a rescaling add would need)."""

    groups: tuple[Group, ...]
    scales: dict[str, torch.Tensor]  # tensor -> s, for every group whose alpha is not None
    report: SmoothReport


def plan_smoothing(graph: Graph, inputs: dict[str, torch.Tensor], alpha: Alpha = 0.5,
                   grid: Sequence[float] = ALPHA_GRID, validation_fraction: float = VALIDATION_FRACTION,
                   ) -> SmoothPlan:
    """Measure every group on `inputs` (calibration data, one batch) and choose its scales.

    Every `1/validation_fraction`-th sample is held back: scales and ranges are fitted on the others and the
    errors in the report are measured on it, so that channels that exceed their calibration range clip as on
    unseen text. With alpha="auto", each group takes the alpha of `grid` with the lowest held-back error, or
    none if no alpha beats leaving it unsmoothed. The scales applied are then refitted on all samples."""
    alpha = check_alpha(alpha)
    for a in grid:
        check_alpha(a, "smooth grid")
    if not 0.0 < validation_fraction < 1.0:
        raise LowbitError(f"smooth: validation_fraction {validation_fraction} must be in (0, 1)")
    groups = smoothing_groups(graph)
    by_tensor = {g.tensor: g for g in groups}
    mask = token_mask(graph, inputs)
    samples = len(inputs[graph.inputs[0]])
    stride = max(2, round(1 / validation_fraction))
    if samples < stride:
        raise LowbitError(f"smooth: {samples} calibration sample(s) leave none to validate the scales on (one in "
                          f"{stride} is held back); give at least {stride}")
    held_back = torch.arange(samples) % stride == stride - 1
    chosen: dict[str, tuple[GroupReport, torch.Tensor | None]] = {}
    tokens = 0

    def measure(name: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal tokens
        if name in by_tensor:
            sample = torch.arange(samples).reshape(-1, *[1] * (t.ndim - 1)).expand(*t.shape[:-1], 1)
            x, validate = token_rows(t, mask), held_back[token_rows(sample, mask)[:, 0]]
            tokens = x.shape[0]
            chosen[name] = _choose(graph, by_tensor[name], x, validate, alpha, grid)
        return t

    run_graph(graph, inputs, on_output=measure)
    scales = {name: s for name, (_, s) in chosen.items() if s is not None}
    report = SmoothReport(alpha, tokens, tuple(chosen[g.tensor][0] for g in groups))
    return SmoothPlan(tuple(groups), scales, report)


def _choose(graph: Graph, group: Group, x: torch.Tensor, validate: torch.Tensor, alpha: Alpha,
            grid: Sequence[float]) -> tuple[GroupReport, torch.Tensor | None]:
    w = torch.cat([graph.weight(name) for name in group.layers]).to(x.dtype)
    fit, held = x[~validate], x[validate]
    w_max = w.abs().amax(0)
    ref = held @ w.T
    before = w8a8_error(held, w, None, fit, ref)
    best: tuple[float | None, float] = (None, before)
    for a in grid if alpha == "auto" else [alpha]:
        err = w8a8_error(held, w, smoothing_scales(fit.abs().amax(0), w_max, a), fit, ref)
        if alpha != "auto" or err < best[1]:
            best = (a, err)
    a, after = best
    x_max = x.abs().amax(0)
    s = None if a is None else smoothing_scales(x_max, w_max, a)
    report = GroupReport(group.tensor, group.layers, group.fold.describe() if group.fold else "", group.reason, a,
                         outlier_ratio(x_max), outlier_ratio(x_max if s is None else x_max / s), before, after)
    return report, s


def apply_smoothing(graph: Graph, plan: SmoothPlan) -> Graph:
    """A new Graph with each foldable group's s folded in; `graph` is not changed (changed params and attrs are
    new tensors, the others are shared)."""
    params = dict(graph.params)
    nodes = [Node(n.name, n.op, list(n.inputs), n.shape, dict(n.attrs), n.macs, n.source) for n in graph.nodes]
    by_name = {n.name: n for n in nodes}
    for group in plan.groups:
        s = plan.scales.get(group.tensor)
        if group.fold is None or s is None:
            continue
        for name in group.layers:
            key = f"{name}.weight"
            params[key] = params[key] * s.to(params[key].dtype)
        inverse = torch.ones(len(s), dtype=torch.float64)
        inverse[group.fold.channels] = 1.0 / s.double()
        producer = by_name[group.fold.producer]
        if producer.op in TABLE_OPS:  # f(x) / s, per channel of the table op's output
            producer.attrs["channel_scale"] = _times(producer.attrs.get("channel_scale"), inverse)
        else:
            for key in (f"{producer.name}.weight", f"{producer.name}.bias"):
                p = params[key]
                params[key] = p * inverse.to(p.dtype).reshape(-1, *[1] * (p.ndim - 1))
        for add in group.fold.rescaled:  # the add reads X / s: times s restores X in the sum
            node = by_name[add]
            node.attrs["channel_input"] = node.inputs.index(group.tensor)
            node.attrs["channel_scale"] = _times(node.attrs.get("channel_scale"), s.double())
    return Graph(nodes, params, list(graph.inputs), list(graph.outputs), graph.name)


def _times(scale: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """A per-channel scale times `factor`, kept in float64: the op casts it to its input's dtype, so a float64
    graph stays exact."""
    return factor.double() if scale is None else scale.double() * factor.double()


def smooth(graph: Graph, inputs: dict[str, torch.Tensor], alpha: Alpha = 0.5, grid: Sequence[float] = ALPHA_GRID,
           validation_fraction: float = VALIDATION_FRACTION) -> tuple[Graph, SmoothReport]:
    """SmoothQuant on `graph` with statistics from `inputs` (calibration data, one batch): a new Graph with the
    same nodes and function, and the report (outlier ratios and simulated W8A8 error per group)."""
    plan = plan_smoothing(graph, inputs, alpha, grid, validation_fraction)
    return apply_smoothing(graph, plan), plan.report


def token_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, channels] of the real tokens of `t`."""
    t = real_tokens(t, mask)
    return t.reshape(-1, t.shape[-1])


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.", "att.")
