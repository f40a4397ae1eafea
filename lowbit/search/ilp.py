"""The mixed-precision ILP (HAWQ-V3), solved with HiGHS through `scipy.optimize.milp`.

One binary x[g, b] per tie group g and bit-width b, with Σ_b x[g, b] = 1.
Minimise Σ cost[g, b]·x[g, b] subject to Σ metric[g, b]·x[g, b] <= budget for
each constrained metric (size, BOPs, latency). Tied layers share one choice, so
the quadratic terms between them are constant within a choice and enter the
linear cost exactly.

The cross terms between groups make the objective quadratic:
+ Σ_{g<h} Σ_{b,c} pairs[g, b, h, c]·x[g, b]·x[h, c]. `solve` linearizes it exactly
(the reformulation-linearization technique): one continuous y[g, b, h, c] >= 0 per
product, with Σ_c y[g, b, h, c] = x[g, b] and Σ_b y[g, b, h, c] = x[h, c]. For
one-hot x these force y = x[g, b]·x[h, c]: y[g, b, h, c'] sums to x[h, c'] = 0
over b for every c' but the chosen c, so the row's mass x[g, b] lands on c.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from ..errors import LowbitError

Plan = dict[str, int]

# What the ILP minimises: the predicted loss increase of `Sensitivity.predict`'s models.
OBJECTIVES = {
    "diagonal": "the exact Hessian blocks of each tie group (tied layers' mutual terms included)",
    "cross": "½ δᵀHδ with every inter-layer term (a quadratic ILP, linearized exactly)",
    "trace": "HAWQ-V3's trace estimate, ½ Σ Tr(H_i)/n_i ‖ΔW_i‖²",
}
DEFAULT_OBJECTIVE = "diagonal"


ACTIVATION_BITS = (8, 16)  # the options of an activation tensor's row


@dataclass(frozen=True)
class Problem:
    """One row per choice: first the tie groups of layers (options `bits`), then the activation tensors that
    may be 16-bit (options `ACTIVATION_BITS`). Rows with fewer options than the widest are padded with
    forbidden columns (`allowed`)."""

    groups: list[list[str]]  # tied layers; every layer in exactly one group
    bits: list[int]
    cost: np.ndarray  # [rows, options]: the objective
    metrics: dict[str, np.ndarray]  # name -> [rows, options]
    budgets: dict[str, float]  # name -> upper bound
    # [rows, options, rows, options]: the objective's cross terms between two rows' choices (only r != s
    # is read; None: a linear objective).
    pairs: np.ndarray | None = None
    tensors: list[str] = field(default_factory=list)  # the activation rows, after the groups

    @property
    def allowed(self) -> np.ndarray:
        """[rows, options]: which options each row has."""
        mask = np.zeros(self.cost.shape, dtype=bool)
        mask[:len(self.groups), :len(self.bits)] = True
        mask[len(self.groups):, :len(ACTIVATION_BITS)] = True
        return mask

    def objective(self, choice: Sequence[int]) -> float:
        """The objective's value at `choice` (option index per row), cross terms included."""
        c = np.asarray(choice)
        rows = np.arange(len(c))
        value = float(self.cost[rows, c].sum())
        if self.pairs is not None:
            between = self.pairs[rows[:, None], c[:, None], rows[None, :], c[None, :]]
            value += float(np.triu(between, 1).sum())
        return value

    def with_budgets(self, budgets: dict[str, float]) -> Problem:
        return replace(self, budgets=budgets)

    def plan(self, choice: Sequence[int]) -> Plan:
        """Option index per row -> bits per layer."""
        return {layer: self.bits[c] for group, c in zip(self.groups, choice, strict=False) for layer in group}

    def activation_plan(self, choice: Sequence[int]) -> dict[str, int]:
        """Option index per row -> bits per activation tensor (8 or 16)."""
        return {t: ACTIVATION_BITS[c] for t, c in zip(self.tensors, choice[len(self.groups):], strict=True)}

    def usage(self, choice: Sequence[int]) -> dict[str, float]:
        rows = np.arange(len(choice))
        return {m: float(table[rows, list(choice)].sum()) for m, table in self.metrics.items()}

    def feasible(self, choice: Sequence[int]) -> bool:
        used = self.usage(choice)
        return all(used[m] <= self.budgets[m] * (1 + 1e-9) for m in self.budgets)

    def metric_range(self, metric: str) -> tuple[float, float]:
        """The least and the most any plan's total of `metric` can be."""
        table = self.metrics[metric]
        return (float(np.where(self.allowed, table, np.inf).min(1).sum()),
                float(np.where(self.allowed, table, -np.inf).max(1).sum()))


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


def solve(problem: Problem, units: Mapping[str, Callable[[float], str]] | None = None,
          time_limit: float = 60.0, log: Callable[[str], None] = lambda _: None) -> list[int]:
    """The optimal option index per row, cross terms included; a clear error when no plan fits the budgets.

    Past `time_limit` seconds HiGHS returns the best plan it has found, and `log` hears how far from the
    optimum it may be."""
    units = units or {}
    _check_budgets(problem, units)
    n_rows, n_options = problem.cost.shape
    n_x = n_rows * n_options
    pair_cost, pair_rows = _linearized_products(problem)
    n_y = len(pair_cost)
    one_per_row = np.kron(np.eye(n_rows), np.ones(n_options))
    constraints = [LinearConstraint(np.hstack([one_per_row, np.zeros((n_rows, n_y))]), 1, 1)]
    for m, budget in problem.budgets.items():
        # As a fraction of the budget: HiGHS' feasibility tolerance is absolute (1e-7), which a budget in seconds
        # (a decoder's GEMVs: ~1e-5 s each) would pass through unchecked.
        unit = abs(budget) if budget else 1.0
        row = np.concatenate([problem.metrics[m].reshape(-1), np.zeros(n_y)]) / unit
        constraints.append(LinearConstraint(row.reshape(1, -1), -np.inf, budget / unit))
    if pair_rows is not None:
        constraints.append(LinearConstraint(pair_rows, 0, 0))
    result = milp(np.concatenate([problem.cost.reshape(-1), pair_cost]), constraints=constraints,
                  integrality=np.concatenate([np.ones(n_x), np.zeros(n_y)]),
                  bounds=Bounds(0, np.concatenate([problem.allowed.reshape(-1), np.ones(n_y)])),
                  options={"time_limit": time_limit})
    if result.x is None:
        raise LowbitError(f"the budgets {_describe(problem.budgets, units)} admit no plan together "
                          f"({result.message}); loosen one of them")
    if result.status != 0:
        log(f"the ILP stopped at its {time_limit:.0f} s limit; its plan is within {100 * result.mip_gap:.1f}% of "
            "the optimum")
    return [int(i) for i in np.round(result.x[:n_x]).reshape(n_rows, n_options).argmax(1)]


def _linearized_products(problem: Problem) -> tuple[np.ndarray, coo_array | None]:
    """The y variables' costs, and the rows Σ_c y[g,b,h,c] - x[g,b] = 0 and Σ_b y[g,b,h,c] - x[h,c] = 0.

    y is numbered by (pair of groups, b, c); x[g, b] is column g·bits + b and y k is column x's count + k.
    """
    n_groups, n_bits = problem.cost.shape
    if problem.pairs is None or n_groups < 2:
        return np.zeros(0), None
    g, h = np.triu_indices(n_groups, 1)
    n_pairs, n_x = len(g), n_groups * n_bits
    pair = np.repeat(np.arange(n_pairs), n_bits * n_bits)
    b = np.tile(np.repeat(np.arange(n_bits), n_bits), n_pairs)
    c = np.tile(np.arange(n_bits), n_pairs * n_bits)
    y_col = n_x + np.arange(len(pair))
    # One row per (pair, bit) for each marginal: first Σ_c (rows pair·bits + b), then Σ_b (after those).
    marginal = np.arange(n_pairs * n_bits)
    marginal_pair, marginal_bit = np.repeat(np.arange(n_pairs), n_bits), np.tile(np.arange(n_bits), n_pairs)
    rows = np.concatenate([pair * n_bits + b, n_pairs * n_bits + pair * n_bits + c,
                           marginal, n_pairs * n_bits + marginal])
    cols = np.concatenate([y_col, y_col, g[marginal_pair] * n_bits + marginal_bit,
                           h[marginal_pair] * n_bits + marginal_bit])
    values = np.concatenate([np.ones(2 * len(y_col)), -np.ones(2 * len(marginal))])
    matrix = coo_array((values, (rows, cols)), shape=(2 * n_pairs * n_bits, n_x + len(y_col)))
    return problem.pairs[g[pair], b, h[pair], c], matrix


def _check_budgets(problem: Problem, units: Mapping[str, Callable[[float], str]]) -> None:
    for m, budget in problem.budgets.items():
        smallest = problem.metric_range(m)[0]
        if budget < smallest * (1 - 1e-9):
            fmt = units.get(m, lambda v: f"{v:.6g}")
            same_bytes = ""
            if m == "size" and 7 in problem.bits:
                same_bytes = (" (7-bit weights are stored a byte each, as 8-bit ones: a size budget cannot trade "
                              "one for the other; a --bops or --latency budget can)")
            raise LowbitError(f"{m} budget {fmt(budget)} is infeasible: the smallest {m} any plan reaches is "
                              f"{fmt(smallest)} (every layer at its cheapest bit-width){same_bytes}; raise the budget "
                              f"to at least that")


def _describe(budgets: Mapping[str, float], units: Mapping[str, Callable[[float], str]]) -> str:
    return ", ".join(f"{m} <= {units.get(m, lambda v: f'{v:.6g}')(b)}" for m, b in budgets.items())
