"""The default recipe, chosen by measurement on a validation split of the calibration data.

A recipe is how activation ranges are picked (minmax, percentile or mse) and which
layers get GPTQ rounding instead of round-to-nearest. No single recipe wins on every
model: GPTQ fits each layer to the calibration inputs, and where a layer sees fewer
independent input rows than it has inputs (a classifier after global pooling sees one
row per image) its error feedback can fit noise that unseen inputs do not share;
percentile clipping helps where activation tails are rare outliers and hurts where
they carry signal. So `auto` measures:

1. Split the calibration samples (seeded) into a fit part and a validation part.
2. Ranges: quantize with each method from the fit part's statistics (round-to-nearest)
   and keep the one with the least output error on the validation part. Then refine
   each 8-bit tensor's range by the error at the network output on fit samples
   (`ranges.py`), kept only if the validation error drops too.
3. Rounding, layer by layer (float and fake-quant graphs side by side): GPTQ from the
   fit rows' Hessian, kept only where it lowers the layer's output error on the
   validation rows; then the whole model with those layers is compared with plain
   round-to-nearest on the validation part, and GPTQ is dropped if it lost. A text model's
   padded positions stay out of the Hessians and the errors: they never reach the output.

Minmax with round-to-nearest is always a candidate, so the chosen recipe never
measures worse than it on the split. The final model is then quantized with the
chosen recipe from all the calibration samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..ir import Op, QuantizedGraph
from .calibrate import METHODS
from .config import BitPlan, QuantConfig
from .graph import Graph, Node, run_graph, run_node
from .inputs import (
    CalibData,
    ModelInputs,
    TorchInputs,
    concat_tensors,
    model_inputs,
    real_tokens,
    sample_count,
    token_mask,
)
from .quantize import Log, calibrate, gptq_layer, lower_to_integer, walk_side_by_side
from .ranges import RANGE_SAMPLES, output_aware_ratios, output_error, output_metric
from .simulate import dequantized_params, simulate

MIN_SAMPLES_TO_VALIDATE = 8  # below this a validation split is too small to choose anything by
BASELINE = "minmax"  # the guard: plain min/max ranges with round-to-nearest


@dataclass(frozen=True)
class Recipe:
    """A concrete recipe: the activation range method, the layers GPTQ rounds, and what chose them."""

    calib_method: str
    gptq_layers: frozenset[str]
    evidence: dict[str, Any]  # the measurements behind the choice (report.json's "recipe")
    range_ratios: Mapping[str, float] = field(default_factory=dict)  # output-aware clipping, fraction of max|x|

    @classmethod
    def fixed(cls, graph: Graph, config: QuantConfig) -> Recipe:
        """The recipe a config names outright (no `auto` in it)."""
        layers = frozenset(n.name for n in graph.layers) if config.rounding == "gptq" else frozenset()
        return cls(config.calib_method, layers, {"chosen_by": "configuration"})

    def to_json(self) -> dict[str, Any]:
        return {"calib_method": self.calib_method, "gptq_layers": sorted(self.gptq_layers),
                "range_ratios": dict(self.range_ratios), **self.evidence}

    def describe(self, n_layers: int) -> str:
        aware = f" (output-aware on {len(self.range_ratios)} tensors)" if self.range_ratios else ""
        return (f"{self.calib_method} activation ranges{aware}, GPTQ rounding on {len(self.gptq_layers)}/{n_layers} "
                "layers")


def choose_recipe(graph: Graph, calib: CalibData | ModelInputs, config: QuantConfig, plan: BitPlan,
                  log: Log = lambda _: None) -> Recipe:
    """Resolve the `auto` parts of `config` by the output error on a validation split of `calib`."""
    if config.calib_method != "auto" and config.rounding != "auto":
        return Recipe.fixed(graph, config)
    calib = model_inputs(graph, calib, "calibration")
    n = len(calib)
    n_val = math.ceil(n * config.validation_fraction)
    if n < MIN_SAMPLES_TO_VALIDATE:
        method = BASELINE if config.calib_method == "auto" else config.calib_method
        rounding = "nearest" if config.rounding == "auto" else config.rounding
        recipe = Recipe.fixed(graph, replace(config, calib_method=method, rounding=rounding))
        return replace(recipe, evidence={"chosen_by": f"too few calibration samples ({n}) to validate a recipe "
                                                      f"(at least {MIN_SAMPLES_TO_VALIDATE}): the baseline"})
    order = np.random.default_rng(config.seed).permutation(n)
    fit = calib.take(np.sort(order[n_val:]))
    val = calib.take(np.sort(order[:n_val]))
    validation = _Validation(graph, val)

    stats = calibrate(graph, fit, log)
    methods = METHODS if config.calib_method == "auto" else (config.calib_method,)
    range_error = {}
    for method in methods:
        log(f"choosing the recipe: {method} ranges")
        nearest = replace(config, calib_method=method, rounding="nearest")
        range_error[method] = validation.error(lower_to_integer(graph, stats, plan, nearest))
    # Ties go to the earlier (simpler) method: METHODS starts with minmax.
    method = min(methods, key=lambda m: range_error[m])
    evidence: dict[str, Any] = {
        "chosen_by": "validation", "fit_samples": len(fit), "validation_samples": n_val,
        "metric": validation.metric, "range_error": range_error}

    nearest = replace(config, calib_method=method, rounding="nearest")
    ratios: dict[str, float] = {}
    best_error = range_error[method]
    if config.calib_method == "auto" and config.output_aware_ranges:
        choice = output_aware_ratios(graph, stats, plan, nearest, fit.take(slice(RANGE_SAMPLES)).tensors(), log)
        aware_error = validation.error(lower_to_integer(graph, stats, plan, nearest, choice.ratios))
        if aware_error < best_error:  # fitted on the fit part: kept only if the validation part agrees
            ratios, best_error = choice.ratios, aware_error
        evidence["output_aware_ranges"] = {
            "tensors": len(choice.ratios), "fit_samples": min(len(fit), RANGE_SAMPLES),
            "fit_error": [choice.error_before, choice.error_after], "validation_error": aware_error,
            "kept": bool(ratios)}

    if config.rounding == "auto":
        qgraph = lower_to_integer(graph, stats, plan, nearest, ratios)
        x_fit = fit.take(slice(config.refine_samples)).tensors()
        layer_errors = choose_gptq_layers(graph, qgraph, x_fit, val.tensors(), log)
        gptq = frozenset(name for name, e in layer_errors.items() if e["gptq"] < e["nearest"])
        gptq_error = validation.error(qgraph)
        if gptq_error >= best_error:
            gptq = frozenset()
        evidence.update(layer_rounding_error=layer_errors, gptq_model_error=gptq_error)
    else:
        gptq = Recipe.fixed(graph, config).gptq_layers
    return Recipe(method, gptq, evidence, ratios)


def choose_gptq_layers(graph: Graph, qgraph: QuantizedGraph, fit: TorchInputs, val: TorchInputs,
                       log: Log = lambda _: None) -> dict[str, dict[str, float]]:
    """Layer by layer, in place: GPTQ from `fit`'s Hessian where it beats round-to-nearest on `val`.

    Returns each layer's relative output error on `val` with either rounding (same inputs for both:
    the fake-quant outputs of the layers before it, as chosen).
    """
    weights, biases = dequantized_params(qgraph)
    n_fit, n_layers = sample_count(fit), len(qgraph.layers)
    x = concat_tensors([fit, val])
    mask = token_mask(graph, x)  # a text model's padded positions never reach the output: fit and score without
    fit_mask, val_mask = (None, None) if mask is None else (mask[:n_fit], mask[n_fit:])
    errors: dict[str, dict[str, float]] = {}

    def choose(node: Node, op: Op, q_input: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # Both roundings are scored on the validation rows; only the winner runs on the fit rows.
        q_val = q_input[n_fit:]
        nearest = op.arrays["weight"], weights[node.name], run_node(graph, node, [q_val], weights[node.name],
                                                                   biases[node.name])
        # sets op.arrays["weight"]
        gptq_weight = gptq_layer(graph, node, op, real_tokens(q_input[:n_fit], fit_mask))
        gptq = op.arrays["weight"], gptq_weight, run_node(graph, node, [q_val], gptq_weight, biases[node.name])
        target = real_tokens(f, val_mask).double()  # the float graph ran on the validation rows only
        power = max(float((target ** 2).sum()), 1e-30)

        def error_of(q: torch.Tensor) -> float:
            return float(((real_tokens(q, val_mask).double() - target) ** 2).sum()) / power

        error = {"nearest": error_of(nearest[2]), "gptq": error_of(gptq[2])}
        errors[node.name] = error
        log(f"choosing the recipe: GPTQ or nearest rounding, layer {len(errors)}/{n_layers}")
        op.arrays["weight"], weights[node.name], q_val = gptq if error["gptq"] < error["nearest"] else nearest
        return torch.cat([run_node(graph, node, [q_input[:n_fit]], weights[node.name], biases[node.name]), q_val])

    walk_side_by_side(graph, qgraph, x, choose, float_rows=slice(n_fit, None))
    return errors


class _Validation:
    """The validation samples, their float outputs, and the error of a quantized model on them."""

    def __init__(self, graph: Graph, x: ModelInputs):
        self.graph, self.x = graph, x.tensors()
        with torch.no_grad():
            self.reference = {o: t for o, t in run_graph(graph, self.x).items() if o in graph.outputs}
        self.metric = output_metric(graph, self.reference)

    def error(self, qgraph: QuantizedGraph) -> float:
        with torch.no_grad():
            return output_error(self.reference, simulate(self.graph, qgraph, self.x), self.metric)
