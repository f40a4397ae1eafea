"""`lowbit sensitivity MODEL -o DIR`: per-layer quantization sensitivity (sensitivity.json/.safetensors, PNGs,
report.md)."""

from __future__ import annotations

from pathlib import Path

import click

from ...io import check_output_dir
from ...pipeline.prepare import Source
from ...pipeline.progress import Progress
from ...pipeline.sensitivity import measure_sensitivity
from ...quantizer.smooth import parse_smooth
from ...sensitivity.analyze import SensitivityConfig
from ..options import bit_list, model_and_data_options, seq_len_option, smooth_option, user_errors


def _sensitivity_config(samples: int, head_classes: int, tolerance: float, max_trace_seconds: float, bits: str,
                        pair_bits: str, seed: int) -> SensitivityConfig:
    all_bits = (2, 3, 4, 5, 6, 7, 8)
    return SensitivityConfig(bits=bit_list(bits, "--bits", all_bits), pair_bits=bit_list(pair_bits, "--pair-bits",
                             all_bits), samples=samples, head_classes=head_classes, tolerance=tolerance,
                             max_trace_seconds=max_trace_seconds, seed=seed)


@click.command("sensitivity")
@model_and_data_options
@click.option("--labels", type=click.Path(path_type=Path),
              help="Class indices (.npy) of the calibration samples: use cross-entropy with them as the loss.")
@click.option("--samples", type=int, default=SensitivityConfig.samples, show_default=True,
              help="Calibration samples the Hessian is measured on.")
@click.option("--bits", default="2,3,4,8", show_default=True, help="Weight bit-widths that get Ω_i(b).")
@click.option("--pair-bits", default="4,8", show_default=True,
              help="Weight bit-widths that get exact inter-layer terms.")
@click.option("--head-classes", type=int, default=SensitivityConfig.head_classes, show_default=True,
              help="Classes per sample whose share of each trace is computed exactly (the rest is sampled).")
@click.option("--tolerance", type=float, default=SensitivityConfig.tolerance, show_default=True,
              help="Stop Hutchinson sampling once every 95% interval is within this fraction of its trace.")
@click.option("--max-trace-seconds", type=float, default=SensitivityConfig.max_trace_seconds, show_default=True,
              help="Time limit for Hutchinson sampling (the report gives the intervals reached).")
@click.option("--check-configs", type=int, default=30, show_default=True,
              help="Random plans on which predicted and measured loss increases are compared (0: skip).")
@smooth_option(" Measured on the smoothed graph, as quantize builds it; `lowbit search --sensitivity` refuses "
               "one measured with another --smooth.")
@seq_len_option(" `lowbit search --sensitivity` refuses one measured at another length.")
@user_errors
def sensitivity_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, factory: str | None,
                        seed: int, force: bool, labels: Path | None, samples: int, bits: str, pair_bits: str,
                        head_classes: int, tolerance: float, max_trace_seconds: float, check_configs: int,
                        smooth: str, seq_len: int | None) -> None:
    """Measure how sensitive each layer of MODEL is to quantization (Hessian traces and inter-layer terms)."""
    config = _sensitivity_config(samples, head_classes, tolerance, max_trace_seconds, bits, pair_bits, seed)
    parse_smooth(smooth)
    check_output_dir(output, force)  # fail before the slow part, not after it
    measure_sensitivity(Source(model, calib, eval_path, factory, seed, seq_len), config, labels, check_configs,
                        output, force, Progress(), smooth)
