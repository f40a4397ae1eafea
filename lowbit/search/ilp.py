"""The mixed-precision ILP (HAWQ-V3), solved with HiGHS through `scipy.optimize.milp`.

One binary x[g, b] per tie group g and bit-width b, with Σ_b x[g, b] = 1.
Minimise Σ cost[g, b]·x[g, b] subject to Σ metric[g, b]·x[g, b] <= budget for
each constrained metric (size, BOPs, latency). Tied layers share one choice, so
the quadratic terms between them are constant within a choice and enter the
linear cost exactly. The remaining cross terms, between groups, are used by
`refine`, a local search on the full quadratic objective after the ILP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import LowbitError

Plan = dict[str, int]


@dataclass(frozen=True)
class Problem:
    groups: list[list[str]]  # tied layers; every layer in exactly one group
    bits: list[int]
    cost: np.ndarray  # [groups, bits]: the objective
    metrics: dict[str, np.ndarray]  # name -> [groups, bits]
    budgets: dict[str, float]  # name -> upper bound

    def plan(self, choice: Sequence[int]) -> Plan:
        """Bit index per group -> bits per layer."""
        return {layer: self.bits[c] for group, c in zip(self.groups, choice, strict=True) for layer in group}

    def usage(self, choice: Sequence[int]) -> dict[str, float]:
        rows = np.arange(len(self.groups))
        return {m: float(table[rows, list(choice)].sum()) for m, table in self.metrics.items()}

    def feasible(self, choice: Sequence[int]) -> bool:
        used = self.usage(choice)
        return all(used[m] <= self.budgets[m] * (1 + 1e-9) for m in self.budgets)


def tie_groups(layers: Sequence[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Union of overlapping tie sets; layers keep their order, and untied layers stand alone."""
    parent = {layer: layer for layer in layers}

    def root(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for tie in ties:
        for a, b in zip(tie, tie[1:], strict=False):
            parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(root(layer), []).append(layer)
    return list(groups.values())


def solve(problem: Problem, units: Mapping[str, Callable[[float], str]] | None = None) -> list[int]:
    """The optimal bit index per group; a clear error when no plan fits the budgets."""
    units = units or {}
    _check_budgets(problem, units)
    n_groups, n_bits = problem.cost.shape
    one_per_group = np.kron(np.eye(n_groups), np.ones(n_bits))
    constraints = [LinearConstraint(one_per_group, 1, 1)]
    for m, budget in problem.budgets.items():
        constraints.append(LinearConstraint(problem.metrics[m].reshape(1, -1), -np.inf, budget))
    result = milp(problem.cost.reshape(-1), constraints=constraints, integrality=np.ones(n_groups * n_bits),
                  bounds=Bounds(0, 1), options={"time_limit": 30.0})
    if result.x is None:
        raise LowbitError(f"the budgets {_describe(problem.budgets, units)} admit no plan together "
                          f"({result.message}); loosen one of them")
    return [int(i) for i in np.round(result.x).reshape(n_groups, n_bits).argmax(1)]


def _check_budgets(problem: Problem, units: Mapping[str, Callable[[float], str]]) -> None:
    for m, budget in problem.budgets.items():
        smallest = float(problem.metrics[m].min(1).sum())
        if budget < smallest * (1 - 1e-9):
            fmt = units.get(m, lambda v: f"{v:.6g}")
            raise LowbitError(f"{m} budget {fmt(budget)} is infeasible: the smallest {m} any plan reaches is "
                              f"{fmt(smallest)} (every layer at its cheapest bit-width); raise the budget to at "
                              f"least that")


def _describe(budgets: Mapping[str, float], units: Mapping[str, Callable[[float], str]]) -> str:
    return ", ".join(f"{m} <= {units.get(m, lambda v: f'{v:.6g}')(b)}" for m, b in budgets.items())


def refine(problem: Problem, choice: list[int], objective: Callable[[list[int]], float],
           max_rounds: int = 20) -> list[int]:
    """Local search on the full objective: single changes and pairwise swaps that stay within budget."""
    best, best_value = list(choice), objective(choice)
    n_groups, n_bits = problem.cost.shape
    for _ in range(max_rounds):
        improved = False
        moves = [[(g, b)] for g in range(n_groups) for b in range(n_bits) if b != best[g]]
        moves += [[(g, b), (h, c)] for g in range(n_groups) for h in range(g + 1, n_groups)
                  for b in range(n_bits) for c in range(n_bits) if b != best[g] and c != best[h]]
        for move in moves:
            candidate = list(best)
            for g, b in move:
                candidate[g] = b
            if not problem.feasible(candidate):
                continue
            value = objective(candidate)
            if value < best_value - 1e-12:
                best, best_value, improved = candidate, value, True
        if not improved:
            break
    return best
