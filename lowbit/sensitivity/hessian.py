"""Second-order loss model of a float `Graph`: Hessian traces and exact quadratic forms.

The loss is measured against the FP32 model itself: L = mean KL(p_fp32 || p), or
the cross-entropy with labels when the user has them. Its Hessian with respect to
the parameters is H = Jᵀ M J + R, where J is the Jacobian of the logits, M the
Hessian of the loss in the logits (diag(p) - p pᵀ for softmax losses), and R
carries the loss gradient. Two facts make the math cheap and exact here:

- With the KL loss, the gradient is zero at the FP32 weights, so R = 0 and H is
  exactly the Gauss-Newton matrix Jᵀ M J.
- The logits of a conv/linear network are linear in each single layer's weights,
  so the diagonal blocks H_ii equal (Jᵀ M J)_ii for any loss.

So every quantity comes from Jacobian products, never a second derivative:

- Hutchinson traces: Tr(H_ii) = E_u ‖J_iᵀ A u‖² with M = A Aᵀ and u a Rademacher
  vector over the logits. One backward pass gives the estimate for every layer
  (and for every layer's input activation) at once.
- Quadratic forms: ΔW_iᵀ H_ij ΔW_j = mean over samples of (Aᵀ J_i ΔW_i)·(Aᵀ J_j ΔW_j).
  One forward-mode pass per perturbation (a tangent pushed from the perturbed layer
  to the logits) gives exact cross terms between all perturbations, with no noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..quantizer.graph import QUANTIZABLE_OPS, Graph, Node, forward, run_graph, run_node

Log = Callable[[str], None]
Z_95 = 1.959964  # two-sided 95% normal quantile


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(reference) || softmax(logits))."""
    p_ref = F.log_softmax(reference_logits, -1)
    return F.kl_div(F.log_softmax(logits, -1), p_ref, reduction="batchmean", log_target=True)


def loss_of(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The sensitivity loss: KL to the FP32 model, or cross-entropy when labels are given."""
    if labels is None:
        return kl_to_reference(logits, reference_logits)
    return F.cross_entropy(logits, labels)


class OutputCurvature:
    """M = diag(p) - p pᵀ per sample (the loss Hessian in the logits), through its factor A = diag(√p) - p √pᵀ."""

    def __init__(self, logits: torch.Tensor):
        self.p = torch.softmax(logits.double(), -1)
        self.sqrt_p = self.p.sqrt()

    def factor(self, u: torch.Tensor) -> torch.Tensor:
        """A u, per sample (u: [N, classes])."""
        return self.sqrt_p * u - self.p * (self.sqrt_p * u).sum(-1, keepdim=True)

    def factor_t(self, t: torch.Tensor) -> torch.Tensor:
        """Aᵀ t, per sample (t: [..., N, classes]); then (Aᵀ s)·(Aᵀ t) = sᵀ M t."""
        t = t.double()
        return self.sqrt_p * (t - (self.p * t).sum(-1, keepdim=True))


@dataclass
class TraceEstimate:
    mean: float
    half_width: float  # 95% confidence half-width of the mean
    draws: int

    @property
    def relative_half_width(self) -> float:
        return self.half_width / abs(self.mean) if self.mean else math.inf


def hutchinson_traces(graph: Graph, x: torch.Tensor, *, tolerance: float = 0.05, min_draws: int = 8,
                      max_draws: int = 200, max_seconds: float = math.inf, seed: int = 0,
                      log: Log = lambda _: None) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate]]:
    """Tr(H_ii) for every layer's weights, and for every layer's input activation.

    Each draw is one backward pass of Aᵀ-weighted Rademacher noise from the logits.
    Stops once every 95% confidence half-width is under `tolerance` of its mean,
    or at `max_draws` / `max_seconds` (the intervals then say how tight they got).
    """
    output = graph.outputs[0]
    layers = graph.layers
    weights = {n.name: graph.weight(n.name).detach().clone().requires_grad_(True) for n in layers}
    layer_inputs = sorted({n.inputs[0] for n in layers})
    generator = torch.Generator().manual_seed(seed)
    curvature = OutputCurvature(run_graph(graph, x)[output])
    samples: dict[str, list[float]] = {n: [] for n in [*weights, *layer_inputs]}
    captured: dict[str, torch.Tensor] = {}

    def keep_layer_inputs(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in layer_inputs:
            if not t.requires_grad:  # the graph input
                t = t.detach().requires_grad_(True)
            captured[name] = t
        return t

    start = time.perf_counter()
    for draw in range(1, max_draws + 1):
        logits = forward(graph, x, keep_layer_inputs, weights)[output]
        u = torch.randint(0, 2, logits.shape, generator=generator, dtype=torch.float64) * 2 - 1
        targets = [*weights.values(), *(captured[n] for n in layer_inputs)]
        grads = torch.autograd.grad(logits, targets, curvature.factor(u).float())
        for name, g in zip([*weights, *layer_inputs], grads, strict=True):
            samples[name].append(float(g.double().pow(2).sum()) / len(x))
        estimates = {name: _estimate(values) for name, values in samples.items()}
        worst = max(e.relative_half_width for e in estimates.values())
        log(f"hutchinson traces: draw {draw}, widest 95% interval ±{100 * worst:.1f}%")
        if draw >= min_draws and (worst <= tolerance or time.perf_counter() - start > max_seconds):
            break
    by_layer_input = {n.name: estimates[n.inputs[0]] for n in layers}
    return {n.name: estimates[n.name] for n in layers}, by_layer_input


def _estimate(values: list[float]) -> TraceEstimate:
    a = np.asarray(values)
    half = Z_95 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else math.inf
    return TraceEstimate(float(a.mean()), float(half), len(a))


@torch.no_grad()
def float_activations(graph: Graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's FP32 output (the primal point that tangents are pushed through)."""
    env: dict[str, torch.Tensor] = {}

    def keep(name: str, t: torch.Tensor) -> torch.Tensor:
        env[name] = t
        return t

    run_graph(graph, x, keep)
    return env


def push_tangent(graph: Graph, primals: dict[str, torch.Tensor], start: str, tangent: torch.Tensor) -> torch.Tensor:
    """Forward-mode: the change of the logits caused by a change `tangent` of node `start`'s output."""
    tangents = {start: tangent}
    begin = next(i for i, n in enumerate(graph.nodes) if n.name == start) + 1
    for node in graph.nodes[begin:]:
        if not any(i in tangents for i in node.inputs):
            continue
        tangents[node.name] = _node_tangent(graph, node, primals, tangents)
    return tangents[graph.outputs[0]]


def _node_tangent(graph: Graph, node: Node, primals: dict[str, torch.Tensor],
                  tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    if node.op in QUANTIZABLE_OPS:  # linear in its input: the same layer without bias
        return run_node(graph, node, [tangents[node.inputs[0]]], bias=torch.zeros_like(graph.bias(node.name)))
    args = tuple(primals[i] for i in node.inputs)
    dargs = tuple(tangents.get(i, torch.zeros_like(primals[i])) for i in node.inputs)
    return torch.func.jvp(lambda *a: run_node(graph, node, list(a)), args, dargs)[1]


def layer_output_change(graph: Graph, node: Node, primals: dict[str, torch.Tensor], weight_delta: torch.Tensor | None,
                        input_delta: torch.Tensor | None) -> torch.Tensor:
    """First-order change of a layer's output from a weight change and/or an input change."""
    zero_bias = torch.zeros_like(graph.bias(node.name))
    change = torch.zeros_like(primals[node.name])
    if weight_delta is not None:
        change = change + run_node(graph, node, [primals[node.inputs[0]]], weight_delta, zero_bias)
    if input_delta is not None:
        change = change + run_node(graph, node, [input_delta], bias=zero_bias)
    return change
