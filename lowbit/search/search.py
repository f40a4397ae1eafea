"""The search stage: Sensitivity + costs + budget -> BitPlan, a measured frontier, and bisection.

- `plan_for_budget`: ILP on the exact per-group quadratic costs (tied layers' mutual
  terms included), optionally refined with the cross terms between groups. On
  MobileNetV2 at 0.7x size the refinement lowered predicted loss but also held-out
  agreement (BENCHMARKS.md, search section, from benchmarks/bench_search.py), so it is
  off by default.
- `PlanEvaluator`: quantizes a plan for real (same pipeline as `lowbit quantize`,
  calibration statistics shared) and measures top-1 agreement with FP32 on
  held-out data, with the fake-quant executor. The recipe's `auto` parts are chosen
  once per bit-width, on the uniform plan: a layer at b bits gets GPTQ if it did in
  the uniform b-bit plan, so every plan does not pay for its own choice.
  Agreement comes with bootstrap intervals over photos.
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
from ..metrics import Agreement, agreement_summary, paired_difference, sqnr_db, top1_agreement
from ..quantizer.calibrate import TensorStats
from ..quantizer.config import BitPlan, QuantConfig
from ..quantizer.graph import Graph, run_graph
from ..quantizer.quantize import quantize
from ..quantizer.recipe import Recipe, choose_recipe
from ..quantizer.simulate import simulate
from ..sensitivity.artifact import Sensitivity
from .costs import CostModel
from .ilp import Plan, Problem, refine, solve, tie_groups

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
                  budgets: dict[str, float], tie: bool = True) -> Problem:
    """The ILP: one choice per tie group; its cost is the group's exact quadratic loss at that choice."""
    layers = [n.name for n in graph.layers]
    groups = tie_groups(layers, residual_ties(graph) if tie else [])
    bits = sorted(bits)
    cost = np.array([[sens.predict({layer: b for layer in group}) for b in bits] for group in groups])
    metrics = {m: np.array([[sum(costs.cost(m, layer, b) for layer in group) for b in bits] for group in groups])
               for m in METRICS if m in budgets}
    return Problem(groups, bits, cost, metrics, budgets)


def plan_for_budget(problem: Problem, sens: Sensitivity, cross_terms: bool = False) -> Plan:
    choice = solve(problem, FORMATTERS)
    if cross_terms:
        choice = refine(problem, choice, lambda c: sens.predict(problem.plan(c)))
    return problem.plan(choice)


@dataclass
class PlanEvaluator:
    """Measures plans for real: quantize (shared calibration statistics), then fake-quant on held-out data.

    `photos`: each held-out sample's source photo, for the agreement intervals (None: samples independent).
    """

    graph: Graph
    calib: np.ndarray
    heldout: np.ndarray
    config: QuantConfig
    stats: dict[str, TensorStats]
    photos: np.ndarray | None = None
    reference: np.ndarray = field(init=False)
    _measured: dict[frozenset, dict[str, Any]] = field(init=False, default_factory=dict)
    _recipes: dict[int, Recipe] = field(init=False, default_factory=dict)  # per bit-width, uniform plans
    _agrees: dict[frozenset, np.ndarray] = field(init=False, default_factory=dict)  # per held-out sample

    def __post_init__(self) -> None:
        self.reference = self._logits(lambda x: run_graph(self.graph, x))

    def _logits(self, fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> np.ndarray:
        out = []
        for i in range(0, len(self.heldout), EVAL_BATCH):
            x = torch.from_numpy(np.ascontiguousarray(self.heldout[i:i + EVAL_BATCH], dtype=np.float32))
            out.append(fn(x)[self.graph.outputs[0]].numpy())
        return np.concatenate(out)

    def measure(self, plan: Plan, log: Log = lambda _: None) -> dict[str, Any]:
        key = frozenset(plan.items())
        if key not in self._measured:  # bisection often lands on a plan already measured
            self._measured[key] = self._measure(plan, log)
        return self._measured[key]

    def recipe(self, plan: Plan, log: Log = lambda _: None) -> Recipe:
        """The plan's recipe, from the recipes chosen for the uniform plans of its bit-widths."""
        for bits in sorted(set(plan.values()) - set(self._recipes)):
            self._recipes[bits] = choose_recipe(self.graph, self.calib, self.config,
                                                BitPlan.uniform(self.graph, bits), log)
        widest = self._recipes[max(plan.values())]
        gptq = frozenset(layer for layer, bits in plan.items() if layer in self._recipes[bits].gptq_layers)
        return Recipe(widest.calib_method, gptq, {"chosen_by": "the uniform plans of its bit-widths"})

    def _measure(self, plan: Plan, log: Log) -> dict[str, Any]:
        t0 = time.perf_counter()
        qgraph = quantize(self.graph, self.calib, self.config, BitPlan(dict(plan)), log, stats=self.stats,
                          recipe=self.recipe(plan, log))
        logits = self._logits(lambda x: simulate(self.graph, qgraph, x))
        self._agrees[frozenset(plan.items())] = self.reference.argmax(1) == logits.argmax(1)
        sqnr = sqnr_db(float(np.sum(self.reference ** 2)), float(np.sum((logits - self.reference) ** 2)))
        return {"top1_agreement": top1_agreement(self.reference, logits),
                "agreement": agreement_summary(self.reference, logits, self.photos), "sqnr_db": sqnr,
                "weight_bytes": qgraph.weight_bytes(), "seconds": time.perf_counter() - t0}

    def agrees(self, plan: Plan) -> np.ndarray:
        """Per held-out sample: does the plan's top-1 class match FP32's? (Measures the plan if needed.)"""
        self.measure(plan)
        return self._agrees[frozenset(plan.items())]

    def agreement_drop(self, baseline: Plan, plan: Plan) -> dict[str, float]:
        """`baseline`'s agreement minus `plan`'s, with a paired bootstrap 95% interval: both are scored on the
        same held-out samples, so photos that are hard for both do not widen it."""
        drop, interval = paired_difference(self.agrees(baseline), self.agrees(plan), self.photos)
        return {"value": drop, "low": interval.low, "high": interval.high}


@dataclass
class FrontierPoint:
    budget: dict[str, float]
    plan: Plan
    predicted_loss: float
    measured: dict[str, Any]
    costs: dict[str, float]

    @property
    def bit_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for b in self.plan.values():
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "predicted_loss": self.predicted_loss, "measured": self.measured,
                "costs": self.costs, "bit_counts": {str(k): v for k, v in self.bit_counts.items()},
                "plan": self.plan}


def all_costs(costs: CostModel, plan: Plan) -> dict[str, float]:
    found = {"size": costs.total("size", plan), "bops": costs.total("bops", plan)}
    if costs.latency is not None:
        found["latency"] = costs.total("latency", plan)
    return found


def evaluate_point(problem: Problem, sens: Sensitivity, costs: CostModel, evaluator: PlanEvaluator,
                   budgets: dict[str, float], cross_terms: bool, log: Log) -> FrontierPoint:
    problem = Problem(problem.groups, problem.bits, problem.cost, problem.metrics, budgets)
    plan = plan_for_budget(problem, sens, cross_terms)
    measured = evaluator.measure(plan, log)
    return FrontierPoint(budgets, plan, sens.predict(plan), measured, all_costs(costs, plan))


def budget_range(problem: Problem, metric: str) -> tuple[float, float]:
    """The cheapest and the dearest plan's total of `metric`."""
    table = problem.metrics[metric]
    return float(table.min(1).sum()), float(table.max(1).sum())


def bisect_max_drop(problem: Problem, sens: Sensitivity, costs: CostModel, evaluator: PlanEvaluator, metric: str,
                    max_drop: float, baseline: FrontierPoint, steps: int = 6, cross_terms: bool = False,
                    log: Log = lambda _: None, echo: Log = lambda _: None) -> tuple[FrontierPoint, list[FrontierPoint]]:
    """Bisect the `metric` budget for the cheapest plan whose measured agreement drop is at most `max_drop`.

    The drop is measured against `baseline`, the uniform highest-precision plan. The
    budget ranges from the cheapest plan up to the problem's own `metric` budget (the
    user's cap, or the dearest plan). Returns the chosen point and every point tried.
    """
    cheapest, dearest = budget_range(problem, metric)
    cap = min(problem.budgets.get(metric, dearest), dearest)
    tried: list[FrontierPoint] = []

    def attempt(f: float, label: str) -> tuple[FrontierPoint, bool]:
        budgets = {**problem.budgets, metric: cheapest + f * (cap - cheapest)}
        point = evaluate_point(problem, sens, costs, evaluator, budgets, cross_terms, log)
        tried.append(point)
        drop = baseline.measured["top1_agreement"] - point.measured["top1_agreement"]
        ok = drop <= max_drop + 1e-12
        interval = evaluator.agreement_drop(baseline.plan, point.plan)
        echo(f"{label}: {metric} <= {format_metric(metric, budgets[metric])}, bits {point.bit_counts}, top-1 "
             f"agreement {Agreement.from_json(point.measured['agreement']['top1']).short()} (drop "
             f"{100 * drop:+.1f}% [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]): "
             f"{'within' if ok else 'outside'} the band")
        return point, ok

    best, ok = attempt(1.0, "largest budget")
    if not ok:
        raise LowbitError(f"no plan within {metric} <= {format_metric(metric, cap)} keeps the top-1 agreement drop "
                          f"within {100 * max_drop:.2f}%; raise the budget or widen --max-drop")
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
