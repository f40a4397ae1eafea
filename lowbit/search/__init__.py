"""Mixed-precision search: per-layer costs, the ILP, and bisection inside an accuracy band."""

from .costs import CostModel, LatencyTable, layer_costs, measure_onnxruntime
from .ilp import Problem, solve

__all__ = ["CostModel", "LatencyTable", "Problem", "layer_costs", "measure_onnxruntime", "solve"]
