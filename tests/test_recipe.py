"""The default recipe is chosen by measurement on a validation split of the calibration data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import calibrate, lower_to_integer, quantize
from lowbit.quantizer.ranges import output_aware_ratios, output_error
from lowbit.quantizer.recipe import BASELINE, MIN_SAMPLES_TO_VALIDATE, choose_recipe
from lowbit.quantizer.simulate import simulate


def _capture(model: nn.Module, example: np.ndarray, name: str) -> Graph:
    program = torch.export.export(model.eval(), (torch.from_numpy(example[:1]),))
    return capture(program, name)


class _TwoLinears(nn.Module):
    """Two linear layers with more inputs (256) than calibration samples, one row per sample each.

    With so few rows GPTQ's error feedback fits the calibration samples (its Hessian has rank ≤ their
    number). Whether that carries over to unseen samples depends on their structure: `fc1` reads
    zero-mean, uncorrelated inputs, where the Hessian's true form is a multiple of the identity and
    round-to-nearest is already optimal, so GPTQ only adds estimation noise; `fc2` reads ReLU outputs,
    whose large shared mean GPTQ learns from any few samples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 10)
        nn.init.constant_(self.fc1.bias, 1.0)  # most ReLU outputs positive: a large shared mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def wide() -> tuple[Graph, np.ndarray]:
    torch.manual_seed(0)
    calib = np.random.default_rng(0).normal(size=(24, 256)).astype(np.float32)
    return _capture(_TwoLinears(), calib, "wide"), calib


def test_gptq_is_kept_only_where_it_lowers_the_error_on_held_back_samples(wide) -> None:
    graph, calib = wide
    recipe = choose_recipe(graph, calib, QuantConfig(calib_method="minmax"), BitPlan.uniform(graph, 4))
    errors = recipe.evidence["layer_rounding_error"]
    assert recipe.evidence["fit_samples"] == 18 and recipe.evidence["validation_samples"] == 6
    # GPTQ fitted on 18 samples: worse than round-to-nearest on the 6 held back for fc1, better for fc2.
    assert errors["fc1"]["gptq"] > errors["fc1"]["nearest"]
    assert errors["fc2"]["gptq"] < errors["fc2"]["nearest"]
    assert "fc1" not in recipe.gptq_layers


def test_the_chosen_recipe_never_measures_worse_than_minmax_nearest_on_the_split(wide) -> None:
    graph, calib = wide
    recipe = choose_recipe(graph, calib, QuantConfig(), BitPlan.uniform(graph, 4))
    evidence = recipe.evidence
    chosen = evidence["range_error"][recipe.calib_method]
    assert chosen == min(evidence["range_error"].values())
    assert chosen <= evidence["range_error"][BASELINE]
    if recipe.gptq_layers:
        assert evidence["gptq_model_error"] < chosen
    # The final model is quantized with the chosen recipe from all the calibration data.
    qgraph = quantize(graph, calib, QuantConfig(), BitPlan.uniform(graph, 4), recipe=recipe)
    assert np.isfinite(simulate(graph, qgraph, torch.from_numpy(calib[:2]))["fc2"].numpy()).all()


def test_a_fixed_config_is_used_as_given(wide) -> None:
    graph, calib = wide
    recipe = choose_recipe(graph, calib, QuantConfig(calib_method="mse", rounding="gptq"),
                           BitPlan.uniform(graph, 8))
    assert recipe.calib_method == "mse" and recipe.gptq_layers == {"fc1", "fc2"}
    assert recipe.evidence == {"chosen_by": "configuration"}


def test_too_few_samples_fall_back_to_the_baseline(wide) -> None:
    graph, calib = wide
    recipe = choose_recipe(graph, calib[:MIN_SAMPLES_TO_VALIDATE - 1], QuantConfig(), BitPlan.uniform(graph, 8))
    assert recipe.calib_method == BASELINE and not recipe.gptq_layers
    assert "too few calibration samples" in recipe.evidence["chosen_by"]


def test_the_choice_is_deterministic_for_a_seed(wide) -> None:
    graph, calib = wide
    plan = BitPlan.uniform(graph, 4)
    assert choose_recipe(graph, calib, QuantConfig(), plan) == choose_recipe(graph, calib, QuantConfig(), plan)


@pytest.mark.parametrize("field, value", [("calib_method", "best"), ("rounding", "adaround"),
                                          ("validation_fraction", 1.0)])
def test_bad_recipe_options_are_refused(field: str, value: object) -> None:
    with pytest.raises(LowbitError, match=field.split("_")[0] if field != "calib_method" else "calib-method"):
        QuantConfig(**{field: value})


class _ConvPool(nn.Module):
    """conv → relu → maxpool → conv → relu → flatten → linear: maxpool and flatten pass their input's grid on."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(x)).flatten(1))


@pytest.fixture(scope="module")
def outlier() -> tuple[Graph, np.ndarray]:
    """Calibration images where one pixel of one image is 40x larger than the rest: min/max ranges waste most of
    their steps on it."""
    torch.manual_seed(0)
    calib = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    calib[0, :, 4, 4] *= 40.0
    return _capture(_ConvPool(), calib, "conv_pool"), calib


def test_output_aware_ranges_lower_the_output_error_they_predict(outlier) -> None:
    graph, calib = outlier
    plan, config = BitPlan.uniform(graph, 8), QuantConfig(calib_method="minmax", rounding="nearest")
    stats, x = calibrate(graph, calib), torch.from_numpy(calib[1:17])  # the outlier is in the statistics only
    choice = output_aware_ratios(graph, stats, plan, config, {graph.inputs[0]: x})
    assert choice.ratios and min(choice.ratios.values()) < 1.0
    assert choice.error_after < choice.error_before
    # The chooser's own bookkeeping (suffix runs, grids passed on through maxpool/flatten) must equal a plain
    # fake-quant run of the graph lowered with those ratios: otherwise it optimised something else.
    reference = run_graph(graph, x)
    for ratios, want in ((None, choice.error_before), (choice.ratios, choice.error_after)):
        got = output_error(reference, simulate(graph, lower_to_integer(graph, stats, plan, config, ratios), x),
                           "mean KL(softmax)")
        assert got == pytest.approx(want, rel=1e-9)
    # A ratio sets the tensor's threshold, so its scale, as a fraction of max|x|.
    qgraph = lower_to_integer(graph, stats, plan, config, choice.ratios)
    for name, ratio in choice.ratios.items():
        value = qgraph.values[qgraph.float_to_int[name]]
        assert float(value.scale) == pytest.approx(ratio * stats[name].absmax / (255 if stats[name].nonnegative
                                                                                  else 127), rel=1e-6)


def test_output_aware_ranges_are_kept_only_if_the_validation_split_agrees(outlier) -> None:
    graph, calib = outlier
    plan = BitPlan.uniform(graph, 8)
    recipe = choose_recipe(graph, calib, QuantConfig(rounding="nearest", output_aware_ranges=True), plan)
    aware = recipe.evidence["output_aware_ranges"]
    assert aware["fit_samples"] == 16 and aware["fit_error"][1] <= aware["fit_error"][0]
    if aware["kept"]:
        assert recipe.range_ratios and aware["validation_error"] < recipe.evidence["range_error"][recipe.calib_method]
    else:
        assert not recipe.range_ratios
    off = choose_recipe(graph, calib, QuantConfig(rounding="nearest"), plan)  # off by default (config.py says why)
    assert "output_aware_ranges" not in off.evidence and not off.range_ratios
