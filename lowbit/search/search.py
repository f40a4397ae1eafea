"""The search stage: Sensitivity + costs + budget -> BitPlan, a measured frontier, and bisection.

- `build_problem`: the ILP for one of three objectives (`OBJECTIVES`): the exact
  per-group quadratic costs (tied layers' mutual terms included), the same plus every
  cross term between groups (a quadratic objective that `ilp.solve` linearizes
  exactly), or HAWQ-V3's trace estimate. Which is the default, and why, is measured
  out of sample by benchmarks/bench_cross_terms.py (BENCHMARKS.md, cross_terms).
- `PlanEvaluator`: quantizes a plan for real (same pipeline as `lowbit quantize`,
  calibration statistics shared) and measures its fidelity to FP32 on held-out
  data with the fake-quant executor: top-1 agreement for a classifier, the embedding
  cosine for a sentence encoder (`fidelity`). The recipe's `auto` parts are chosen
  once per bit-width, on the uniform plan: a layer at b bits gets GPTQ if it did in
  the uniform b-bit plan, so every plan does not pay for its own choice.
  Scores come with bootstrap intervals (over photos, where crops share one).
- `bisect_max_drop`: the cheapest plan whose measured drop stays within a band.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import LowbitError
from ..ir.ops import QUANTIZABLE_OPS
from ..metrics import paired_difference, sqnr_db
from ..quantizer.calibrate import TensorStats
from ..quantizer.config import BitPlan, QuantConfig
from ..quantizer.graph import Graph, run_graph
from ..quantizer.inputs import CalibData, ModelInputs, TorchInputs, model_inputs
from ..quantizer.quantize import quantize
from ..quantizer.recipe import Recipe, choose_recipe
from ..quantizer.simulate import simulate
from ..sensitivity.artifact import Sensitivity, activation_key, weight_key
from .costs import CostModel
from .fidelity import Fidelity, fidelity_of
from .ilp import ACTIVATION_BITS, DEFAULT_OBJECTIVE, OBJECTIVES, Plan, Problem, solve, tie_groups

Log = Callable[[str], None]
METRICS = ("size", "bops", "latency")
EVAL_BATCH = 32

_UNITS = {
    "size": {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30},
    "bops": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
    "latency": {"ms": 1, "s": 1e3, "us": 1e-3},
}


def format_metric(metric: str, value: float) -> str:
    if metric == "size":
        return f"{value / 1e6:.3f} MB"
    if metric == "bops":
        return f"{value / 1e9:.2f} GBOPs"
    return f"{value:.3f} ms"


FORMATTERS = {m: (lambda v, m=m: format_metric(m, v)) for m in METRICS}


def parse_budget(metric: str, text: str, reference: float) -> float:
    """'0.75x' (of `reference`, the uniform highest-precision plan) or an absolute value with an optional unit."""
    s = text.strip().lower().replace(" ", "")
    if s.endswith("x"):
        try:
            return float(s[:-1]) * reference
        except ValueError:
            pass
    match = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)([a-z]*)", s)
    units = _UNITS[metric]
    default_unit = {"size": "b", "bops": "", "latency": "ms"}[metric]
    if match and (match.group(2) or default_unit) in units:
        return float(match.group(1)) * units[match.group(2) or default_unit]
    raise LowbitError(f"--{metric} {text!r}: expected a fraction of the uniform highest-precision plan such as "
                      f"0.75x, or an absolute value with a unit ({', '.join(u for u in units if u)})")


def residual_ties(graph: Graph) -> list[list[str]]:
    """Layers whose outputs meet in an add or concat (HAWQ-V3 gives them one bit-width)."""
    ties = []
    for tensors in graph.scale_groups():
        layers: set[str] = set()
        for t in tensors:
            node = graph.node(t)
            layers |= {t} if node.op in QUANTIZABLE_OPS else set(graph.layer_producers(t))
        if len(layers) > 1:
            ties.append(sorted(layers))
    return ties




def build_problem(graph: Graph, sens: Sensitivity, costs: CostModel, bits: Sequence[int],
                  budgets: dict[str, float], tie: bool = True, objective: str = DEFAULT_OBJECTIVE,
                  activations: bool = False) -> Problem:
    """The ILP: one choice per tie group, costed by `objective` (one of `OBJECTIVES`), and with `activations`
    one per tensor that may be 16-bit (`Sensitivity.activation_tensors`)."""
    if objective not in OBJECTIVES:
        raise LowbitError(f"search objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    layers = [n.name for n in graph.layers]
    groups = tie_groups(layers, residual_ties(graph) if tie else [])
    bits = sorted(bits)
    tensors = sens.activation_tensors if activations else []
    if activations and not tensors:
        raise LowbitError("this sensitivity measured no activation tensor at 16 bits (none can be 16-bit, or it "
                          "predates them): rerun `lowbit sensitivity`")
    width = max(len(bits), len(ACTIVATION_BITS) if tensors else 0)  # rows with fewer options are padded
    options = ([[[weight_key(layer, b) for layer in group] for b in bits] + [[]] * (width - len(bits))
                for group in groups]
               + [[[activation_key(t, a)] for a in ACTIVATION_BITS] + [[]] * (width - 2) for t in tensors])
    terms = sens.option_terms(options)
    rows = np.arange(len(options))
    # A row's own cost: its exact block (tied layers' mutual terms included) and first-order terms, or for
    # "trace" HAWQ-V3's Ω for weights (activation noise has no Ω: its exact term stands in).
    cost = 0.5 * terms[rows, :, rows, :].diagonal(axis1=1, axis2=2) + np.array(
        [[sum(sens.gradient[sens.keys.index(k)] for k in keys) for keys in row] for row in options])
    if objective == "trace":
        cost[:len(groups), :len(bits)] = [[0.5 * sum(sens.layer(layer).omega(b) for layer in group) for b in bits]
                                          for group in groups]
    pairs = terms if objective == "cross" else None
    metrics = {m: np.array([[sum(costs.cost(m, layer, b) for layer in group) for b in bits]
                            + [0.0] * (width - len(bits)) for group in groups]
                           + [[costs.activation_cost(m, t, a) for a in ACTIVATION_BITS] + [0.0] * (width - 2)
                              for t in tensors]).reshape(len(options), width)
               for m in METRICS if m in budgets}
    return Problem(groups, bits, cost, metrics, budgets, pairs, tensors)


def plan_for_budget(problem: Problem, log: Log = lambda _: None) -> BitPlan:
    """The ILP's plan: weight bits per layer, and the activation tensors it keeps at 16 bits."""
    choice = solve(problem, FORMATTERS, log=log)
    wide = {t: bits for t, bits in problem.activation_plan(choice).items() if bits == 16}
    return BitPlan(problem.plan(choice), wide)


def _bitplan(plan: BitPlan | Plan) -> BitPlan:
    return plan if isinstance(plan, BitPlan) else BitPlan(dict(plan))


def wide_text(plan: BitPlan) -> str:
    """', 5 activations at 16' for a plan that keeps some activations at 16 bits."""
    wide = sum(b == 16 for b in plan.activation_bits.values())
    return f", {wide} activations at 16" if wide else ""


def plan_key(plan: BitPlan) -> tuple[frozenset, frozenset]:
    return frozenset(plan.bits.items()), frozenset(plan.activation_bits.items())


@dataclass
class PlanEvaluator:
    """Measures plans for real: quantize (shared calibration statistics), then fake-quant on held-out data.

    `calib`, `heldout`: one array per graph input (or an image model's single array). `groups`: each held-out
    sample's source photo, for the intervals (None: samples independent, as sentences are). The score is
    `fidelity`: top-1 agreement for class scores, the embedding cosine for a pooled embedding.
    """

    graph: Graph
    calib: CalibData
    heldout: CalibData
    config: QuantConfig
    stats: dict[str, TensorStats]
    groups: np.ndarray | None = None
    reference: np.ndarray = field(init=False)
    fidelity: Fidelity = field(init=False)
    _inputs: ModelInputs = field(init=False)
    _measured: dict[tuple, dict[str, Any]] = field(init=False, default_factory=dict)
    _recipes: dict[int, Recipe] = field(init=False, default_factory=dict)  # per bit-width, uniform plans
    _scores: dict[tuple, np.ndarray] = field(init=False, default_factory=dict)  # per held-out sample

    def __post_init__(self) -> None:
        self._inputs = model_inputs(self.graph, self.heldout, "the held-out data")
        self.fidelity = fidelity_of(self.graph.is_embedding(self.graph.outputs[0]))
        self.reference = self._outputs(lambda x: run_graph(self.graph, x))

    def _outputs(self, fn: Callable[[TorchInputs], dict[str, torch.Tensor]]) -> np.ndarray:
        return np.concatenate([fn(x)[self.graph.outputs[0]].numpy() for x in self._inputs.batches(EVAL_BATCH)])

    def measure(self, plan: BitPlan | Plan, log: Log = lambda _: None) -> dict[str, Any]:
        """Quantize `plan` (a `BitPlan`, or weight bits per layer) and score it on the held-out data."""
        plan = _bitplan(plan)
        if plan_key(plan) not in self._measured:  # bisection often lands on a plan already measured
            self._measured[plan_key(plan)] = self._measure(plan, log)
        return self._measured[plan_key(plan)]

    def recipe(self, plan: BitPlan, log: Log = lambda _: None) -> Recipe:
        """The plan's recipe, from the recipes chosen for the uniform plans of its bit-widths."""
        for bits in sorted(set(plan.bits.values()) - set(self._recipes)):
            self._recipes[bits] = choose_recipe(self.graph, self.calib, self.config,
                                                BitPlan.uniform(self.graph, bits), log)
        widest = self._recipes[max(plan.bits.values())]
        gptq = frozenset(layer for layer, bits in plan.bits.items() if layer in self._recipes[bits].gptq_layers)
        return Recipe(widest.calib_method, gptq, {"chosen_by": "the uniform plans of its bit-widths"},
                      widest.range_ratios)

    def _measure(self, plan: BitPlan, log: Log) -> dict[str, Any]:
        t0 = time.perf_counter()
        qgraph = quantize(self.graph, self.calib, self.config, plan, log, stats=self.stats,
                          recipe=self.recipe(plan, log))
        out = self._outputs(lambda x: simulate(self.graph, qgraph, x))
        self._scores[plan_key(plan)] = self.fidelity.per_sample(self.reference, out)
        sqnr = sqnr_db(float(np.sum(self.reference ** 2)), float(np.sum((out - self.reference) ** 2)))
        return {**self.fidelity.measure(self.reference, out, self.groups), "sqnr_db": sqnr,
                "weight_bytes": qgraph.weight_bytes(), "seconds": time.perf_counter() - t0}

    def scores(self, plan: BitPlan | Plan) -> np.ndarray:
        """Per held-out sample, the plan's fidelity score (measuring the plan if needed)."""
        self.measure(plan)
        return self._scores[plan_key(_bitplan(plan))]

    def drop(self, baseline: BitPlan | Plan, plan: BitPlan | Plan) -> dict[str, float]:
        """`baseline`'s mean score minus `plan`'s, with a paired bootstrap 95% interval: both are scored on the
        same held-out samples, so samples that are hard for both do not widen it."""
        drop, interval = paired_difference(self.scores(baseline), self.scores(plan), self.groups)
        return {"value": drop, "low": interval.low, "high": interval.high}


@dataclass
class FrontierPoint:
    budget: dict[str, float]
    plan: BitPlan
    predicted_loss: float
    measured: dict[str, Any]
    costs: dict[str, float]

    @property
    def bit_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for b in self.plan.bits.values():
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "predicted_loss": self.predicted_loss, "measured": self.measured,
                "costs": self.costs, "bit_counts": {str(k): v for k, v in self.bit_counts.items()},
                "plan": self.plan.bits, "activation_bits": self.plan.activation_bits}


def all_costs(costs: CostModel, plan: BitPlan | Plan) -> dict[str, float]:
    """The plan's size, BOPs and (with a latency table) latency, its 16-bit activations included."""
    plan = _bitplan(plan)

    def total(metric: str) -> float:
        return costs.total(metric, plan.bits) + sum(costs.activation_cost(metric, t, b)
                                                    for t, b in plan.activation_bits.items())

    return {m: total(m) for m in METRICS if m != "latency" or costs.latency is not None}


def evaluate_point(problem: Problem, sens: Sensitivity, costs: CostModel, evaluator: PlanEvaluator,
                   budgets: dict[str, float], log: Log) -> FrontierPoint:
    plan = plan_for_budget(problem.with_budgets(budgets), log)
    measured = evaluator.measure(plan, log)
    predicted = sens.predict(plan.bits, activations=plan.activation_bits if problem.tensors else None)
    return FrontierPoint(budgets, plan, predicted, measured, all_costs(costs, plan))


def bisect_max_drop(problem: Problem, sens: Sensitivity, costs: CostModel, evaluator: PlanEvaluator, metric: str,
                    max_drop: float, baseline: FrontierPoint, steps: int = 6, log: Log = lambda _: None,
                    echo: Log = lambda _: None) -> tuple[FrontierPoint, list[FrontierPoint]]:
    """Bisect the `metric` budget for the cheapest plan whose measured fidelity drop is at most `max_drop`.

    The drop is measured against `baseline`, the uniform highest-precision plan. The
    budget ranges from the cheapest plan up to the problem's own `metric` budget (the
    user's cap, or the dearest plan). Returns the chosen point and every point tried.
    """
    cheapest, dearest = problem.metric_range(metric)
    cap = min(problem.budgets.get(metric, dearest), dearest)
    tried: list[FrontierPoint] = []

    def attempt(f: float, label: str) -> tuple[FrontierPoint, bool]:
        budgets = {**problem.budgets, metric: cheapest + f * (cap - cheapest)}
        point = evaluate_point(problem, sens, costs, evaluator, budgets, log)
        tried.append(point)
        drop = baseline.measured["score"] - point.measured["score"]
        ok = drop <= max_drop + 1e-12
        interval = evaluator.drop(baseline.plan, point.plan)
        f = evaluator.fidelity
        echo(f"{label}: {metric} <= {format_metric(metric, budgets[metric])}, bits {point.bit_counts}"
             f"{wide_text(point.plan)}, {f.label} {f.short(point.measured)} (drop {f.difference(drop)} "
             f"[{f.difference(interval['low'])}, {f.difference(interval['high'])}]): "
             f"{'within' if ok else 'outside'} the band")
        return point, ok

    best, ok = attempt(1.0, "largest budget")
    if not ok:
        raise LowbitError(f"no plan within {metric} <= {format_metric(metric, cap)} keeps the "
                          f"{evaluator.fidelity.label} drop within {100 * max_drop:.2f}%; raise the budget or widen "
                          "--max-drop")
    point, ok = attempt(0.0, "cheapest plan")
    if ok:
        return point, tried
    low, high = 0.0, 1.0  # fractions of the way from the cheapest plan to the cap
    for step in range(steps):
        f = (low + high) / 2
        point, ok = attempt(f, f"step {step + 1}/{steps}")
        if ok and point.costs[metric] < best.costs[metric]:
            best = point
        low, high = (low, f) if ok else (f, high)
    return best, tried
