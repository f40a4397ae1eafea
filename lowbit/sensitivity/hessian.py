"""Second-order loss model of a float `Graph`: Hessian traces and exact quadratic forms.

The loss is measured against the FP32 model itself: for class scores L = mean
KL(p_fp32 || p), or the cross-entropy with labels when the user has them; for a
pooled sentence embedding e, L = mean (1 - cos(e, e_fp32)), whose value is the
drop of the mean cosine a search bounds. Its Hessian with respect to the parameters
is H = Jᵀ M J + R, where J is the Jacobian of the output, M the Hessian of the loss
in the output (diag(p) - p pᵀ for softmax losses; (I - r̂r̂ᵀ)/‖r‖² for the cosine
at r = e_fp32), and R carries the loss gradient. Two facts make the math cheap and
exact here:

- With the KL or cosine loss, the gradient is zero at the FP32 weights, so R = 0
  and H is exactly the Gauss-Newton matrix Jᵀ M J.
- The logits of a conv/linear network are linear in each single layer's weights,
  so the diagonal blocks H_ii equal (Jᵀ M J)_ii for any loss.

So every quantity comes from Jacobian products, never a second derivative:

- Hutchinson traces: Tr(H_ii) = Σ_k ‖J_iᵀ a_k‖² over the columns a_k of A, with
  M = A Aᵀ. The likeliest classes' columns are summed exactly; the rest is
  estimated as E_u ‖J_iᵀ A u‖², u a Rademacher vector over the other classes.
  Each pass (vmapped per-sample gradients) serves every layer and every layer's
  input activation at once.
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

from ..errors import LowbitError
from ..ir.ops import QUANTIZABLE_OPS
from ..quantizer.graph import Graph, Node, forward, run_graph, run_node
from ..quantizer.inputs import TorchInputs, sample_count

Log = Callable[[str], None]
Z_95 = 1.959964  # two-sided 95% normal quantile


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(reference) || softmax(logits))."""
    p_ref = F.log_softmax(reference_logits, -1)
    return F.kl_div(F.log_softmax(logits, -1), p_ref, reduction="batchmean", log_target=True)


def cosine_to_reference(embedding: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 1 - cos(embedding, reference)."""
    return (1 - F.cosine_similarity(embedding.double(), reference.double(), dim=-1)).mean()


def output_loss(graph: Graph, labels: object | None = None) -> str:
    """The sensitivity loss of `graph`'s output: "cosine" for a pooled embedding, else "kl", or "cross_entropy"
    with labels."""
    if graph.is_embedding(graph.outputs[0]):
        if labels is not None:
            raise LowbitError(f"{graph.name}: labels are class indices, but the model outputs an embedding; its "
                              "sensitivity is measured against the FP32 embedding (drop --labels)")
        return "cosine"
    return "kl" if labels is None else "cross_entropy"


def loss_of(output: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None,
            kind: str = "kl") -> torch.Tensor:
    """The sensitivity loss `kind` (`output_loss`): KL to the FP32 model, cross-entropy with labels, or 1 - cos."""
    if kind == "cosine":
        return cosine_to_reference(output, reference)
    if labels is None:
        return kl_to_reference(output, reference)
    return F.cross_entropy(output, labels)


class OutputCurvature:
    """M = diag(p) - p pᵀ per sample (the loss Hessian in the logits), through its factor A = diag(√p) - p √pᵀ."""

    def __init__(self, logits: torch.Tensor):
        self.p = torch.softmax(logits.double(), -1)
        self.sqrt_p = self.p.sqrt()
        self.top = self.p.argsort(-1, descending=True)

    def head_columns(self, head: int) -> list[torch.Tensor]:
        """The columns a_k = √p_k (e_k - p) of each sample's `head` likeliest classes, [N, classes] each."""
        columns = []
        for j in range(min(head, self.p.shape[-1])):
            k = self.top[:, j:j + 1]
            column = -self.p * self.sqrt_p.gather(1, k)
            column.scatter_add_(1, k, self.sqrt_p.gather(1, k))
            columns.append(column)
        return columns

    def tail_draw(self, head: int, generator: torch.Generator) -> torch.Tensor | None:
        """A u, with u Rademacher over the classes outside the head (None when the head is every class)."""
        if head >= self.p.shape[-1]:
            return None
        u = torch.randint(0, 2, self.p.shape, generator=generator, dtype=torch.float64) * 2 - 1
        u.scatter_(1, self.top[:, :head], 0.0)
        return self.factor(u)

    def factor(self, u: torch.Tensor) -> torch.Tensor:
        """A u, per sample (u: [N, classes])."""
        return self.sqrt_p * u - self.p * (self.sqrt_p * u).sum(-1, keepdim=True)

    def factor_t(self, t: torch.Tensor) -> torch.Tensor:
        """Aᵀ t, per sample (t: [..., N, classes]); then (Aᵀ s)·(Aᵀ t) = sᵀ M t."""
        t = t.double()
        return self.sqrt_p * (t - (self.p * t).sum(-1, keepdim=True))


class CosineCurvature:
    """M = (I - r̂r̂ᵀ)/‖r‖² per sample, the Hessian of 1 - cos(e, r) at e = r, through its factor A = (I - r̂r̂ᵀ)/‖r‖
    (a projection, so A Aᵀ = M). No direction dominates, so every trace is a Hutchinson estimate."""

    def __init__(self, reference: torch.Tensor):
        r = reference.double()
        self.norm = r.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        self.unit = r / self.norm
        self.shape = r.shape

    def factor(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.unit * (self.unit * u).sum(-1, keepdim=True)) / self.norm

    def factor_t(self, t: torch.Tensor) -> torch.Tensor:
        return self.factor(t.double())

    def head_columns(self, head: int) -> list[torch.Tensor]:
        return []

    def tail_draw(self, head: int, generator: torch.Generator) -> torch.Tensor:
        return self.factor(torch.randint(0, 2, self.shape, generator=generator, dtype=torch.float64) * 2 - 1)


def curvature_of(loss: str, reference: torch.Tensor) -> OutputCurvature | CosineCurvature:
    """The loss Hessian in the output at the FP32 output `reference`, for the loss `loss` (`output_loss`)."""
    return CosineCurvature(reference) if loss == "cosine" else OutputCurvature(reference)


@dataclass
class TraceEstimate:
    mean: float
    half_width: float  # 95% confidence half-width of the mean
    draws: int

    @property
    def relative_half_width(self) -> float:
        return self.half_width / abs(self.mean) if self.mean else math.inf


def hutchinson_traces(graph: Graph, x: torch.Tensor | TorchInputs, *, head_classes: int = 8, tolerance: float = 0.05,
                      min_draws: int = 4, max_draws: int = 200, max_seconds: float = math.inf, seed: int = 0,
                      log: Log = lambda _: None) -> tuple[dict[str, TraceEstimate], dict[str, TraceEstimate]]:
    """Tr(H_ii) for every layer's weights, and for every layer's input activation.

    With M = A Aᵀ = Σ_k a_k a_kᵀ (a_k: column k of A), Tr(J_iᵀ M J_i) = Σ_k ‖J_iᵀ a_k‖².
    The columns of each sample's `head_classes` most likely classes carry most of
    it and are summed exactly; the rest is Hutchinson's estimate, E_u ‖J_iᵀ A u‖²
    with u Rademacher over the remaining classes. Gradients are per sample (vmap),
    so samples do not add noise to each other. Draws stop once every 95% confidence
    half-width is under `tolerance` of its trace, or at `max_draws` / `max_seconds`.
    """
    output = graph.outputs[0]
    x = {graph.inputs[0]: x} if isinstance(x, torch.Tensor) else x
    n_samples = sample_count(x)
    layers = graph.layers
    weights = {n.name: graph.weight(n.name).detach() for n in layers}
    layer_inputs = sorted({n.inputs[0] for n in layers})
    # Zero perturbations added to each layer's input: their gradients are the activation gradients.
    zeros = {name: torch.zeros(graph.node(name).shape[1:]) for name in layer_inputs}

    def directional(w: dict[str, torch.Tensor], eps: dict[str, torch.Tensor], xi: TorchInputs,
                    c: torch.Tensor) -> torch.Tensor:
        def perturb(name: str, t: torch.Tensor) -> torch.Tensor:
            return t + eps[name] if name in eps else t

        one = {k: v[None] for k, v in xi.items()}
        return (forward(graph, one, perturb, w)[output][0] * c).sum()

    per_sample = torch.func.vmap(torch.func.grad(directional, argnums=(0, 1)), in_dims=(None, None, 0, 0))

    def squared_norms(c: torch.Tensor) -> dict[str, float]:
        """Σ_n ‖J_nᵀ c_n‖² / N per layer weight and layer input."""
        g_w, g_a = per_sample(weights, zeros, x, c.float())
        return {name: float(g.double().pow(2).sum()) / n_samples for name, g in [*g_w.items(), *g_a.items()]}

    reference = run_graph(graph, x)[output]
    curvature = curvature_of("cosine" if graph.is_embedding(output) else "kl", reference)
    exact = dict.fromkeys([*weights, *layer_inputs], 0.0)
    columns = curvature.head_columns(head_classes)
    for j, column in enumerate(columns):
        for name, v in squared_norms(column).items():
            exact[name] += v
        log(f"hutchinson traces: exact head class {j + 1}/{len(columns)}")

    tail: dict[str, list[float]] = {name: [] for name in exact}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for draw in range(1, max_draws + 1):
        column = curvature.tail_draw(head_classes, generator)
        if column is None:  # no tail: the head is the whole trace
            break
        for name, v in squared_norms(column).items():
            tail[name].append(v)
        worst = max(_estimate(exact[n], tail[n]).relative_half_width for n in exact)
        log(f"hutchinson traces: draw {draw}, widest 95% interval ±{100 * worst:.1f}%")
        if draw >= min_draws and (worst <= tolerance or time.perf_counter() - start > max_seconds):
            break
    estimates = {name: _estimate(exact[name], tail[name]) for name in exact}
    by_layer_input = {n.name: estimates[n.inputs[0]] for n in layers}
    return {n.name: estimates[n.name] for n in layers}, by_layer_input


def _estimate(exact: float, tail: list[float]) -> TraceEstimate:
    """The exact head plus the mean of the tail draws, with the tail mean's 95% half-width."""
    if not tail:
        return TraceEstimate(exact, 0.0, 0)
    a = np.asarray(tail)
    half = Z_95 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else math.inf
    return TraceEstimate(exact + float(a.mean()), float(half), len(a))


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
    # Integer inputs (token ids, an attention mask) carry no tangent: they stay constants of the jvp.
    moving = [k for k, i in enumerate(node.inputs) if primals[i].is_floating_point()]
    args = [primals[i] for i in node.inputs]

    def run(*floats: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for k, t in zip(moving, floats, strict=True):
            full[k] = t
        return run_node(graph, node, full)

    primal = tuple(args[k] for k in moving)
    tangent = tuple(tangents.get(node.inputs[k], torch.zeros_like(args[k])) for k in moving)
    return torch.func.jvp(run, primal, tangent)[1]


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
