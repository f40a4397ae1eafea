"""The sensitivity stage: Graph + calibration data -> `Sensitivity`.

1. Hutchinson traces of every layer's Hessian block (weights and input activation).
2. Quantization errors: round-to-nearest weights at each bit-width, and the
   8-bit grid of each layer's input (from the same calibration as `quantize`).
3. One forward-mode tangent per perturbation (layer x weight bit-width, and the
   rounding noise of each tensor that may be 8- or 16-bit, at both widths),
   projected through the loss curvature, whose inner products are the exact
   quadratic terms between all perturbations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import LowbitError
from ..quantizer.calibrate import weight_error, weight_scales
from ..quantizer.graph import Graph, forward
from ..quantizer.inputs import CalibData, TorchInputs, model_inputs
from ..quantizer.quantize import gptq_weight, layer_hessian
from ..quantizer.simulate import FakeQuant
from .artifact import LayerSensitivity, Sensitivity, activation_key, weight_key
from .hessian import (
    Log,
    curvature_of,
    float_activations,
    hutchinson_traces,
    layer_output_change,
    loss_of,
    output_loss,
    push_tangent,
)


@dataclass(frozen=True)
class SensitivityConfig:
    bits: tuple[int, ...] = (2, 3, 4, 8)  # weight bit-widths that get an Ω_i(b)
    pair_bits: tuple[int, ...] = (4, 8)  # weight bit-widths that get exact quadratic terms
    # Measured on MobileNetV2: 16 samples give stable rankings; each Hutchinson draw is one backward pass.
    samples: int = 16
    head_classes: int = 8  # classes per sample whose share of each trace is summed exactly
    tolerance: float = 0.05  # stop once every trace's 95% half-width is under this fraction of it
    min_draws: int = 4
    max_draws: int = 200
    max_trace_seconds: float = 120.0
    weight_method: str = "mse"
    # The weight errors δ_i(b) whose effect is measured: GPTQ's, as `lowbit quantize` rounds, or nearest.
    rounding: str = "gptq"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in (*self.bits, *self.pair_bits) if not 2 <= b <= 8]
        if bad:
            raise LowbitError(f"sensitivity bit-widths {bad}: weights take 2 to 8 bits")
        if self.rounding not in ("gptq", "nearest"):
            raise LowbitError(f"sensitivity rounding {self.rounding!r}: expected gptq or nearest")
        if self.samples < 1:
            raise LowbitError(f"sensitivity samples {self.samples}: need at least one")
        if self.head_classes < 0 or self.tolerance <= 0 or self.min_draws < 2 or self.max_draws < self.min_draws:
            raise LowbitError(f"sensitivity sampling settings are invalid: head_classes {self.head_classes} (>= 0), "
                              f"tolerance {self.tolerance} (> 0), draws {self.min_draws}..{self.max_draws} (>= 2)")


class WeightErrors:
    """δ_i(b) = Q_b(W_i) - W_i per layer and bit-width, cached; GPTQ uses each layer's FP32 inputs."""

    def __init__(self, graph: Graph, primals: dict[str, torch.Tensor], weight_method: str, rounding: str):
        self.graph, self.weight_method, self.rounding = graph, weight_method, rounding
        self.hessians = ({n.name: layer_hessian(graph, n, primals[n.inputs[0]]) for n in graph.layers}
                         if rounding == "gptq" else {})
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, layer: str, bits: int) -> torch.Tensor:
        if (layer, bits) not in self._cache:
            w = self.graph.weight(layer)
            if self.rounding == "gptq":
                scale = weight_scales(w, bits, self.weight_method)
                w_int = gptq_weight(self.graph, self.graph.node(layer), self.hessians[layer], scale, bits)
                self._cache[layer, bits] = (w_int * scale.double().reshape(-1, *[1] * (w.dim() - 1))).float() - w
            else:
                self._cache[layer, bits] = weight_error(w, bits, self.weight_method)
        return self._cache[layer, bits]


def first_samples(graph: Graph, x: CalibData, n: int) -> TorchInputs:
    """The first `n` samples of `x` (one array, or one per graph input) as tensors, by input name."""
    return model_inputs(graph, x, "the sensitivity data").take(slice(0, n)).tensors()


def compute_sensitivity(graph: Graph, x: CalibData, activation_quantizers: dict[str, FakeQuant],
                        config: SensitivityConfig | None = None, labels: np.ndarray | None = None,
                        log: Log = lambda _: None, errors: WeightErrors | None = None,
                        wide_quantizers: dict[str, FakeQuant] | None = None) -> Sensitivity:
    """Sensitivity of `graph` to weight and activation quantization, measured on `x` (first `config.samples`;
    one array, or one per graph input). The loss is `hessian.output_loss`: KL or cross-entropy for class
    scores, 1 - cos for a pooled embedding.

    `activation_quantizers` maps float tensor names to their 8-bit grids, as
    `quantizer.simulate.fake_quantizers` returns them for a quantized graph.
    `wide_quantizers` maps the tensors that may be 16-bit to their 16-bit grids: each
    gets its rounding noise at 8 and at 16 bits as perturbations (`activation_key`).
    """
    config = config or SensitivityConfig()
    loss = output_loss(graph, labels)
    xt = first_samples(graph, x, config.samples)
    n = len(next(iter(xt.values())))
    label_t = None if labels is None else torch.as_tensor(labels[:n], dtype=torch.long)
    timings: dict[str, float] = {}
    layers = graph.layers

    t0 = time.perf_counter()
    traces, act_traces = hutchinson_traces(graph, xt, head_classes=config.head_classes,
                                           tolerance=config.tolerance, min_draws=config.min_draws,
                                           max_draws=config.max_draws, max_seconds=config.max_trace_seconds,
                                           seed=config.seed, log=log)
    timings["traces_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    primals = float_activations(graph, xt)
    output = graph.outputs[0]
    curvature = curvature_of(loss, primals[output])
    errors = errors or WeightErrors(graph, primals, config.weight_method, config.rounding)
    keys: list[str] = []
    projected: list[torch.Tensor] = []  # Aᵀ (J δ) per perturbation, [n, classes]
    weight_deltas: dict[str, tuple[str, torch.Tensor]] = {}  # key -> (layer, δ)
    results = []
    for i, node in enumerate(layers):
        w = graph.weight(node.name)
        deltas = {b: errors(node.name, b) for b in sorted({*config.bits, *config.pair_bits})}
        x_in = primals[node.inputs[0]]
        grid = activation_quantizers.get(node.inputs[0])
        if grid is None:
            raise LowbitError(f"layer {node.name}: its input {node.inputs[0]!r} has no activation grid; "
                              "pass the quantizers of a graph quantized from this one")
        act_error = grid(x_in) - x_in
        for b in config.pair_bits:
            keys.append(weight_key(node.name, b))
            weight_deltas[keys[-1]] = (node.name, deltas[b])
            change = layer_output_change(graph, node, primals, deltas[b], None)
            projected.append(curvature.factor_t(push_tangent(graph, primals, node.name, change)))
        tr, atr = traces[node.name], act_traces[node.name]
        results.append(LayerSensitivity(
            name=node.name, params=w.numel(), trace=tr.mean, trace_half_width=tr.half_width,
            activation_elements=x_in.numel(), activation_trace=atr.mean, activation_trace_half_width=atr.half_width,
            weight_error_sq={b: float(deltas[b].double().pow(2).sum()) for b in config.bits},
            activation_error_sq=float(act_error.double().pow(2).sum())))
        log(f"quadratic terms: layer {i + 1}/{len(layers)}")
    wide = wide_quantizers or {}
    for i, tensor in enumerate(wide):
        for bits, grid in ((8, activation_quantizers[tensor]), (16, wide[tensor])):
            keys.append(activation_key(tensor, bits))
            noise = grid(primals[tensor]) - primals[tensor]
            projected.append(curvature.factor_t(push_tangent(graph, primals, tensor, noise)))
        log(f"quadratic terms: activation {i + 1}/{len(wide)}")
    flat = torch.stack(projected).reshape(len(projected), -1)
    cross = (flat @ flat.T / n).numpy()
    timings["quadratic_terms_s"] = time.perf_counter() - t0

    gradient = np.zeros(len(keys))
    if label_t is not None:
        gradient = _first_order_terms(graph, xt, label_t, keys, weight_deltas, primals[output])
    return Sensitivity(
        model=graph.name, loss=loss, samples=n,
        bits=sorted(config.bits), pair_bits=sorted(config.pair_bits), layers=results,
        trace_draws=max(t.draws for t in traces.values()),
        head_classes=0 if loss == "cosine" else config.head_classes,
        rounding=config.rounding, keys=keys, cross=cross, gradient=gradient,
        timings=timings)


def _first_order_terms(graph: Graph, x: TorchInputs, labels: torch.Tensor, keys: list[str],
                       weight_deltas: dict[str, tuple[str, torch.Tensor]], reference: torch.Tensor) -> np.ndarray:
    """gᵀ δ for weight perturbations (activation ones are left at zero: their gradient is per sample)."""
    weights = {n.name: graph.weight(n.name).detach().clone().requires_grad_(True) for n in graph.layers}
    loss = loss_of(forward(graph, x, weights=weights)[graph.outputs[0]], reference, labels)
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))
    return np.array([float((grads[weight_deltas[k][0]] * weight_deltas[k][1]).sum()) if k in weight_deltas else 0.0
                     for k in keys])


class LossProbe:
    """Measures the real loss change of weight plans (weights rounded as `errors` says, activations float)."""

    def __init__(self, graph: Graph, x: CalibData, errors: WeightErrors, labels: np.ndarray | None = None):
        self.graph, self.errors = graph, errors
        self.x = first_samples(graph, x, len(model_inputs(graph, x, "the sensitivity data")))
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.loss = output_loss(graph, labels)
        with torch.no_grad():
            self.reference = forward(graph, self.x)[graph.outputs[0]]
            self.base = float(loss_of(self.reference, self.reference, self.labels, self.loss))

    @torch.no_grad()
    def loss_increase(self, plan: dict[str, int]) -> float:
        weights = {name: self.graph.weight(name) + self.errors(name, bits) for name, bits in plan.items()}
        logits = forward(self.graph, self.x, weights=weights)[self.graph.outputs[0]]
        return float(loss_of(logits, self.reference, self.labels, self.loss)) - self.base


PREDICTION_MODELS = ("cross", "diagonal", "trace")


def check_predictions(graph: Graph, sens: Sensitivity, x: CalibData, configs: int = 30, bits: tuple[int, int] = (4, 8),
                      weight_method: str = "mse", labels: np.ndarray | None = None, seed: int = 0,
                      log: Log = lambda _: None, errors: WeightErrors | None = None) -> dict[str, Any]:
    """Random low/high-bit plans: measured loss increase vs each prediction, and their Spearman correlations.

    Each plan draws its share of low-bit layers uniformly from [5%, 50%], so plans
    differ in which layers are low-bit, not only in how many. The loss is measured
    on the samples the sensitivity was computed on.
    """
    rng = np.random.default_rng(seed)
    xs = first_samples(graph, x, sens.samples)
    if errors is None:
        primals = float_activations(graph, xs)
        errors = WeightErrors(graph, primals, weight_method, sens.rounding)
    probe = LossProbe(graph, xs, errors, None if labels is None else labels[:sens.samples])
    names = [n.name for n in graph.layers]
    low, high = bits
    rows = []
    for k in range(configs):
        share = rng.uniform(0.05, 0.5)
        plan = {name: low if rng.random() < share else high for name in names}
        row = {"low_bit_layers": sum(b == low for b in plan.values()), "measured": probe.loss_increase(plan)}
        row.update({model: sens.predict(plan, model) for model in PREDICTION_MODELS})
        rows.append(row)
        log(f"checking predictions: plan {k + 1}/{configs}")
    measured = [r["measured"] for r in rows]
    return {"configs": configs, "bits": list(bits),
            "spearman": {model: spearman(measured, [r[model] for r in rows]) for model in PREDICTION_MODELS},
            "rows": rows}


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value) if not math.isnan(value) else 0.0
