"""`lowbit sensitivity`: how much each layer's quantization costs, measured on calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..io import atomic_directory, atomic_file
from ..quantizer.config import QuantConfig
from ..quantizer.graph import Graph
from ..quantizer.inputs import CalibData
from ..sensitivity.analyze import SensitivityConfig
from ..sensitivity.artifact import Sensitivity
from . import plots
from .prepare import Prepared, Source, prepare, smooth_prepared
from .progress import Progress


def load_labels(path: Path | None, n: int) -> np.ndarray | None:
    if path is None:
        return None
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read labels (a .npy of integer class indices): {e}") from e
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) < n:
        raise LowbitError(f"{path}: labels must be a 1-D integer array with one class index per calibration sample "
                          f"(at least {n}); got shape {labels.shape}, dtype {labels.dtype}")
    return labels


def activation_grids(graph: Graph, calib: CalibData, stats: dict, config: QuantConfig) -> tuple[dict, dict]:
    """The 8-bit activation grids `lowbit quantize` uses (they don't depend on the weights' rounding), and the
    16-bit grids of the tensors a plan may keep at 16 bits."""
    from ..quantizer.config import BitPlan
    from ..quantizer.quantize import int16_candidates, quantize
    from ..quantizer.simulate import fake_quantizers

    cheap = QuantConfig(calib_method=config.calib_method, percentile=config.percentile, rounding="nearest")
    narrow = fake_quantizers(quantize(graph, calib, cheap, stats=stats))
    candidates = int16_candidates(graph)
    wide_plan = BitPlan(BitPlan.uniform(graph, 8).bits, {t: 16 for t in candidates})
    wide = fake_quantizers(quantize(graph, calib, cheap, wide_plan, stats=stats))
    # A tensor with no grid in either is not rounded at all (a matmul's raw int32 sum that only a softmax reads):
    # its width is no choice.
    return narrow, {t: wide[t] for t in candidates if t in wide and t in narrow}


def run_sensitivity(prepared: Prepared, stats: dict, config: SensitivityConfig, labels: np.ndarray | None,
                    check_configs: int, progress: Progress, quant: QuantConfig | None = None) -> Sensitivity:
    """The sensitivity on the calibration data, its activation noise on the grids `quant` gives (default: the
    default recipe's; give a concrete range method to skip choosing one)."""
    from ..sensitivity.analyze import check_predictions, compute_sensitivity

    x = prepared.calib.data
    narrow, wide = activation_grids(prepared.graph, x, stats, quant or QuantConfig())
    with progress.stage("sensitivity"), progress.steps_of("sensitivity") as log:
        sens = compute_sensitivity(prepared.graph, x, narrow, config, labels, log, wide_quantizers=wide)
    sens.smooth, sens.seq_len = prepared.smooth, prepared.seq_len
    widest = max(layer.trace_half_width / layer.trace for layer in sens.layers if layer.trace > 0)
    progress.echo("sensitivity", f"{len(sens.layers)} layers, {sens.trace_draws} Hutchinson draws (widest 95% "
                                 f"interval ±{100 * widest:.1f}%), {len(sens.keys)} exact quadratic terms "
                                 f"({progress.timings['sensitivity']:.1f}s)")
    if check_configs > 0:
        low, high = min(config.pair_bits), max(config.pair_bits)
        with progress.stage("check"), progress.steps_of("check") as log:
            sens.check = check_predictions(prepared.graph, sens, x, check_configs, (low, high), config.weight_method,
                                           labels, config.seed, log)
        rho = sens.check["spearman"]
        progress.echo("check", f"{check_configs} random {low}/{high}-bit plans, Spearman of predicted vs measured "
                               f"loss increase: with cross terms {rho['cross']:.3f}, diagonal blocks only "
                               f"{rho['diagonal']:.3f}, HAWQ trace {rho['trace']:.3f}")
    return sens


def write_sensitivity(directory: Path, sens: Sensitivity) -> None:
    sens.save(directory)
    plots.sensitivity_bars(sens, directory / "sensitivity_layers.png")
    for b in sens.pair_bits[:1]:
        plots.cross_term_heatmap(sens, b, directory / f"cross_terms_w{b}.png")
    with atomic_file(directory / "report.md") as f:
        f.write(sensitivity_markdown(sens))


def sensitivity_markdown(sens: Sensitivity) -> str:
    lines = [f"# Sensitivity: {sens.model}", "",
             f"- loss: {sens.loss} (against the FP32 model's own predictions unless labels were given)",
             f"- samples: {sens.samples}; traces: top-{sens.head_classes} classes exact, then "
             f"{sens.trace_draws} Hutchinson draws",
             "- timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in sens.timings.items()), ""]
    if sens.check:
        rho = sens.check["spearman"]
        lines += [f"## Do the inter-layer terms help? ({sens.check['configs']} random "
                  f"{sens.check['bits'][0]}/{sens.check['bits'][1]}-bit plans)", "",
                  "| prediction of the loss increase | Spearman vs measured |", "|---|---|",
                  f"| ½ δᵀHδ with every cross term | {rho['cross']:.3f} |",
                  f"| exact per-layer blocks only | {rho['diagonal']:.3f} |",
                  f"| HAWQ-V3 trace, ½ Σ Ω_i(b_i) | {rho['trace']:.3f} |", ""]
    lines += ["## Layers", "", "| layer | params | Tr(H) (95% CI) | " +
              " | ".join(f"Ω({b})" for b in sens.bits) + " | activation Ω(8) |",
              "|---|---|---|" + "---|" * len(sens.bits) + "---|"]
    for layer in sens.layers:
        lines.append(f"| {layer.name} | {layer.params} | {layer.trace:.4g} ± {layer.trace_half_width:.2g} | " +
                     " | ".join(f"{layer.omega(b):.3g}" for b in sens.bits) + f" | {layer.activation_omega:.3g} |")
    if sens.activation_tensors:
        lines += ["", "## Activation tensors that may be 16-bit", "",
                  "Predicted loss increase from each tensor's rounding noise alone, ½ eᵀHe (exact), at 8 and 16 bits; "
                  "most costly first.", "", "| tensor | at 8 bits | at 16 bits |", "|---|---:|---:|"]
        for t in sorted(sens.activation_tensors, key=lambda t: -sens.activation_cost(t, 8)):
            lines.append(f"| {t} | {sens.activation_cost(t, 8):.3g} | {sens.activation_cost(t, 16):.3g} |")
    lines += ["", "Plots: `sensitivity_layers.png`, `cross_terms_w*.png`.", ""]
    return "\n".join(lines)


def measure_sensitivity(source: Source, config: SensitivityConfig, labels: Path | None, check_configs: int,
                        output: Path, force: bool = False, progress: Progress | None = None,
                        smooth: str = "default") -> Sensitivity:
    """The whole `lowbit sensitivity`: measure on `source`'s calibration data, after quantize's smoothing
    (`smooth`, its --smooth), write `output` atomically."""
    from ..quantizer.quantize import calibrate

    progress = progress or Progress()
    prepared, _ = smooth_prepared(prepare(source, progress), smooth, progress)
    label_array = load_labels(labels, min(config.samples, len(prepared.calib)))
    with progress.stage("calibrate"), progress.steps_of("calibrate") as log:
        stats = calibrate(prepared.graph, prepared.calib.data, log)
    sens = run_sensitivity(prepared, stats, config, label_array, check_configs, progress)
    with atomic_directory(output, force) as tmp:
        write_sensitivity(tmp, sens)
    progress.echo("done", f"wrote {output} in {progress.elapsed():.1f}s")
    return sens
