"""Sensitivity: Hutchinson traces and the exact quadratic terms, checked against torch's exact Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.calibrate import weight_error
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph, forward
from lowbit.quantizer.quantize import int16_candidates, quantize
from lowbit.quantizer.simulate import fake_quantizers
from lowbit.sensitivity.analyze import SensitivityConfig, check_predictions, compute_sensitivity
from lowbit.sensitivity.artifact import Sensitivity, activation_key, weight_key
from lowbit.sensitivity.hessian import float_activations, hutchinson_traces, kl_to_reference


class Tiny(nn.Module):
    """Small enough for torch.autograd.functional.hessian over every weight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.dw = nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3)
        self.fc = nn.Linear(3 * 3 * 3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.clamp(self.dw(x), 0.0, 6.0)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def tiny() -> tuple[Graph, np.ndarray]:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(12, 2, 6, 6)
    graph = capture(torch.export.export(model, (x[:1],)), "tiny")
    return graph, x.numpy()


def exact_hessian(graph: Graph, x: np.ndarray) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The full Hessian of the KL-to-FP32 loss over every layer's weights (float64), flattened in layer order."""
    names = [n.name for n in graph.layers]
    sizes = [graph.weight(n).numel() for n in names]
    original = graph.params
    graph.params = {k: v.double() for k, v in original.items()}
    try:
        xt = torch.from_numpy(x).double()
        reference = forward(graph, xt)[graph.outputs[0]].detach()

        def loss(flat: torch.Tensor) -> torch.Tensor:
            parts = torch.split(flat, sizes)
            weights = {n: p.reshape(graph.weight(n).shape) for n, p in zip(names, parts, strict=True)}
            return kl_to_reference(forward(graph, xt, weights=weights)[graph.outputs[0]], reference)

        flat = torch.cat([graph.weight(n).reshape(-1) for n in names])
        h = torch.autograd.functional.hessian(loss, flat)
    finally:
        graph.params = original
    return h, list(zip(names, sizes, strict=True))


def _exact_traces(h: torch.Tensor, layout: list[tuple[str, int]]) -> dict[str, float]:
    traces, start = {}, 0
    for name, size in layout:
        traces[name] = float(torch.diagonal(h[start:start + size, start:start + size]).sum())
        start += size
    return traces


def test_trace_is_exact_when_every_class_is_in_the_head(tiny) -> None:
    graph, x = tiny
    exact = _exact_traces(*exact_hessian(graph, x))
    traces, _ = hutchinson_traces(graph, torch.from_numpy(x), head_classes=6)  # the model has 6 classes
    for name, value in exact.items():
        assert traces[name].half_width == 0.0
        assert traces[name].mean == pytest.approx(value, rel=1e-4)


def test_hutchinson_tail_is_unbiased_and_stops_when_tight(tiny) -> None:
    graph, x = tiny
    exact = _exact_traces(*exact_hessian(graph, x))
    traces, _ = hutchinson_traces(graph, torch.from_numpy(x), head_classes=1, tolerance=0.03, max_draws=4000)
    for name, value in exact.items():
        est = traces[name]
        assert est.relative_half_width <= 0.03
        # Unbiased: the exact trace lies within a couple of confidence half-widths of the estimate.
        assert abs(est.mean - value) <= 2 * est.half_width + 1e-9, (name, est, value)


def test_quadratic_terms_equal_the_exact_hessian(tiny) -> None:
    graph, x = tiny
    h, layout = exact_hessian(graph, x)
    quantizers = fake_quantizers(quantize(graph, x, QuantConfig(rounding="nearest")))
    config = SensitivityConfig(samples=len(x), max_draws=10, rounding="nearest")  # δ = round-to-nearest error
    sens = compute_sensitivity(graph, x, quantizers, config)
    rng = np.random.default_rng(0)
    for _ in range(5):
        plan = {name: int(rng.choice([4, 8])) for name, _ in layout}
        delta = torch.cat([weight_error(graph.weight(n), plan[n], "mse").reshape(-1) for n, _ in layout]).double()
        exact = 0.5 * float(delta @ h @ delta)
        assert sens.predict(plan, "cross") == pytest.approx(exact, rel=1e-4)
    # Diagonal blocks alone are δ_iᵀ H_ii δ_i.
    name, size = layout[0]
    d = weight_error(graph.weight(name), 4, "mse").reshape(-1).double()
    k = sens.keys.index(weight_key(name, 4))
    assert sens.cross[k, k] == pytest.approx(float(d @ h[:size, :size] @ d), rel=1e-4)


def _curvature_along(graph: Graph, x: np.ndarray, noise: dict[str, torch.Tensor]) -> float:
    """d²/dε² of the KL-to-FP32 loss with ε·noise added to the named tensors, at ε = 0 (autograd, float64)."""
    original = graph.params
    graph.params = {k: v.double() for k, v in original.items()}
    try:
        xt = torch.from_numpy(x).double()
        reference = forward(graph, xt)[graph.outputs[0]].detach()
        eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
        logits = forward(graph, xt, lambda n, t: t + eps * noise[n].double() if n in noise else t)
        loss = kl_to_reference(logits[graph.outputs[0]], reference)
        (slope,) = torch.autograd.grad(loss, eps, create_graph=True)
        (curvature,) = torch.autograd.grad(slope, eps)
    finally:
        graph.params = original
    return float(curvature)


def test_activation_noise_terms_equal_the_exact_curvature(tiny) -> None:
    # Each tensor that may be 16-bit gets its 8- and 16-bit rounding noise as perturbations; their quadratic
    # terms are the loss's exact second derivative along that noise, and the cross terms along the sum.
    graph, x = tiny
    plan = BitPlan(BitPlan.uniform(graph, 8).bits, {t: 16 for t in int16_candidates(graph)})
    narrow = fake_quantizers(quantize(graph, x, QuantConfig(rounding="nearest")))
    wide = fake_quantizers(quantize(graph, x, QuantConfig(rounding="nearest"), plan))
    wide = {t: wide[t] for t in int16_candidates(graph)}
    sens = compute_sensitivity(graph, x, narrow, SensitivityConfig(samples=len(x), max_draws=4, rounding="nearest"),
                               wide_quantizers=wide)
    assert len(wide) >= 2 and sens.activation_tensors == list(wide)
    primals = float_activations(graph, torch.from_numpy(x))
    noise = {(t, b): grid(primals[t]) - primals[t] for t in wide for b, grid in ((8, narrow[t]), (16, wide[t]))}
    key = {k: sens.keys.index(activation_key(*k)) for k in noise}
    for k, e in noise.items():
        assert sens.cross[key[k], key[k]] == pytest.approx(_curvature_along(graph, x, {k[0]: e}), rel=1e-3)
    a, b = list(wide)[:2]
    both = _curvature_along(graph, x, {a: noise[a, 8], b: noise[b, 8]})
    cross = sens.cross[key[a, 8], key[b, 8]]
    assert both == pytest.approx(sens.cross[key[a, 8], key[a, 8]] + sens.cross[key[b, 8], key[b, 8]] + 2 * cross,
                                 rel=1e-3)
    # 16 bits cut the noise's cost by about 2^16; the prediction counts only the tensors the plan keeps at 8.
    for t in wide:
        assert sens.cross[key[t, 16], key[t, 16]] < 1e-3 * sens.cross[key[t, 8], key[t, 8]]
    weights = {n.name: 8 for n in graph.layers}
    assert sens.predict(weights, activations={}) > sens.predict(weights, activations={a: 16}) > sens.predict(
        weights, activations={t: 16 for t in wide})


def test_sensitivity_round_trips_and_checks_predictions(tmp_path) -> None:
    entry = get_zoo_entry("small_cnn")
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    calib = entry.calibration(0)
    quantizers = fake_quantizers(quantize(graph, calib, QuantConfig(rounding="nearest")))
    sens = compute_sensitivity(graph, calib, quantizers, SensitivityConfig(samples=8, max_draws=12))
    assert [layer.name for layer in sens.layers] == [n.name for n in graph.layers]
    for layer in sens.layers:
        assert layer.trace > 0 and layer.activation_trace > 0
        assert layer.omega(2) > layer.omega(4) > layer.omega(8) > 0  # fewer bits, more loss
    sens.check = check_predictions(graph, sens, calib, configs=8)
    assert set(sens.check["spearman"]) == {"cross", "diagonal", "trace"}
    sens.save(tmp_path)
    loaded = Sensitivity.load(tmp_path)
    plan = {n.name: 4 for n in graph.layers}
    assert loaded.predict(plan) == pytest.approx(sens.predict(plan))
    assert loaded.check == sens.check
    (tmp_path / "sensitivity.safetensors").write_bytes(b"truncated")
    # The match is on words of the message, never on the temporary path (which holds this test's name).
    with pytest.raises(LowbitError, match="cannot read a sensitivity artifact"):
        Sensitivity.load(tmp_path)


def test_labels_switch_the_loss_and_add_first_order_terms(tiny) -> None:
    graph, x = tiny
    quantizers = fake_quantizers(quantize(graph, x, QuantConfig(rounding="nearest")))
    labels = np.arange(len(x)) % 6
    sens = compute_sensitivity(graph, x, quantizers, SensitivityConfig(samples=len(x), max_draws=4), labels=labels)
    assert sens.loss == "cross_entropy"
    assert np.abs(sens.gradient).max() > 0  # away from the FP32 optimum the gradient term matters
    kl = compute_sensitivity(graph, x, quantizers, SensitivityConfig(samples=len(x), max_draws=4))
    assert kl.loss == "kl" and not kl.gradient.any()
