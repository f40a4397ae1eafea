"""`lowbit sensitivity` and `lowbit search`: the mixed-precision commands.

    lowbit sensitivity MODEL -o sens/      -> sensitivity.json/.safetensors, PNGs, report.md
    lowbit search MODEL --size 0.75x -o s/ -> plan.json, frontier.json, frontier.png, report.md
    lowbit quantize MODEL --plan s/plan.json -o out/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import LowbitError
from ..quantizer.config import SUPPORTED_WEIGHT_BITS, BitPlan, QuantConfig
from ..sensitivity.analyze import SensitivityConfig
from ..sensitivity.artifact import Sensitivity
from . import plots
from .artifact import atomic_directory, write_json
from .main import Prepared, QuantizeRequest, lowbit, prepare, user_errors
from .progress import Progress


def _bit_list(text: str, option: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        bits = ()
    if not bits or any(b not in allowed for b in bits):
        raise LowbitError(f"{option} {text!r}: expected comma-separated bit-widths from {list(allowed)}")
    return bits


def _fraction(text: str, option: str) -> float:
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise LowbitError(f"{option} {text!r}: expected a percentage such as 1% (or a fraction such as 0.01)") from None
    if not 0 <= value < 1:
        raise LowbitError(f"{option} {text!r}: must be between 0% and 100%")
    return value


def _load_labels(path: Path | None, n: int) -> np.ndarray | None:
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


def _common(fn: Any) -> Any:
    for decorator in reversed([
        click.argument("model"),
        click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                     help="Directory to create (must not exist unless --force)."),
        click.option("--calib", type=click.Path(path_type=Path), help="Calibration data (as for `lowbit quantize`)."),
        click.option("--eval", "eval_path", type=click.Path(path_type=Path),
                     help="Held-out data for measuring plans (as for `lowbit quantize`)."),
        click.option("--factory", metavar="MODULE:FUNCTION", help="Builds the model for a state-dict MODEL."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds data and random draws."),
        click.option("--force", is_flag=True, help="Replace an existing output directory."),
    ]):
        fn = decorator(fn)
    return fn


def _activation_quantizers(prepared: Prepared, stats: dict, config: QuantConfig) -> dict:
    """The 8-bit activation grids `lowbit quantize` uses (they don't depend on the weights' rounding)."""
    from ..quantizer.quantize import quantize
    from ..quantizer.simulate import fake_quantizers

    cheap = QuantConfig(calib_method=config.calib_method, percentile=config.percentile, rounding="nearest")
    return fake_quantizers(quantize(prepared.graph, prepared.calib.x, cheap, stats=stats))


def run_sensitivity(prepared: Prepared, stats: dict, config: SensitivityConfig, labels: np.ndarray | None,
                    check_configs: int, progress: Progress) -> Sensitivity:
    from ..sensitivity.analyze import check_predictions, compute_sensitivity

    quantizers = _activation_quantizers(prepared, stats, QuantConfig())
    x = prepared.calib.x
    with progress.stage("sensitivity"), progress.steps_of("sensitivity") as log:
        sens = compute_sensitivity(prepared.graph, x, quantizers, config, labels, log)
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
    (directory / "report.md").write_text(sensitivity_markdown(sens))


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
    lines += ["", "Plots: `sensitivity_layers.png`, `cross_terms_w*.png`.", ""]
    return "\n".join(lines)


def _sensitivity_config(samples: int, head_classes: int, tolerance: float, max_trace_seconds: float, bits: str,
                        pair_bits: str, seed: int) -> SensitivityConfig:
    all_bits = (2, 3, 4, 5, 6, 7, 8)
    return SensitivityConfig(bits=_bit_list(bits, "--bits", all_bits), pair_bits=_bit_list(pair_bits, "--pair-bits",
                             all_bits), samples=samples, head_classes=head_classes, tolerance=tolerance,
                             max_trace_seconds=max_trace_seconds, seed=seed)


@lowbit.command("sensitivity")
@_common
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
@user_errors
def sensitivity_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, factory: str | None,
                        seed: int, force: bool, labels: Path | None, samples: int, bits: str, pair_bits: str,
                        head_classes: int, tolerance: float, max_trace_seconds: float, check_configs: int) -> None:
    """Measure how sensitive each layer of MODEL is to quantization (Hessian traces and inter-layer terms)."""
    from ..quantizer.quantize import calibrate

    config = _sensitivity_config(samples, head_classes, tolerance, max_trace_seconds, bits, pair_bits, seed)
    progress = Progress()
    request = QuantizeRequest(model, output, calib, eval_path, factory, QuantConfig(seed=seed), force)
    prepared = prepare(request, progress)
    label_array = _load_labels(labels, min(samples, len(prepared.calib)))
    with progress.stage("calibrate"), progress.steps_of("calibrate") as log:
        stats = calibrate(prepared.graph, prepared.calib.x, log)
    sens = run_sensitivity(prepared, stats, config, label_array, check_configs, progress)
    with atomic_directory(output, force) as tmp:
        write_sensitivity(tmp, sens)
    progress.echo("done", f"wrote {output} in {progress.elapsed():.1f}s")


@lowbit.command("search")
@_common
@click.option("--size", "size_budget", help="Weight-size budget: 0.75x (of all layers at the highest bit-width) "
                                            "or absolute, e.g. 2.5MB.")
@click.option("--bops", "bops_budget", help="BOPs budget: 0.6x or absolute, e.g. 150G.")
@click.option("--latency", "latency_budget", help="Latency budget: 0.8x or absolute, e.g. 3ms.")
@click.option("--latency-table", type=click.Path(path_type=Path),
              help="Per-layer latency table (JSON) measured on the target; default: measure (--latency-source).")
@click.option("--latency-source", type=click.Choice(["auto", "tvm", "onnxruntime"]), default="auto", show_default=True,
              help="Where to measure per-layer latency: TVM's kernels on this CPU (auto, when TVM is installed; it "
                   "times 4-bit layers for real) or ONNX Runtime.")
@click.option("--max-drop", help="Find the cheapest plan whose measured top-1 agreement is at most this much below "
                                 "the uniform highest-precision plan's, e.g. 1%.")
@click.option("--bits", "bit_set", default="4,8", show_default=True, help="Bit-widths a layer may take.")
@click.option("--sensitivity", "sensitivity_dir", type=click.Path(path_type=Path),
              help="Reuse a `lowbit sensitivity` output instead of measuring again.")
@click.option("--cross-terms", is_flag=True,
              help="Refine the ILP's plan with the inter-layer terms between groups (lower predicted loss; on "
                   "MobileNetV2 it measured worse, so it is off by default).")
@click.option("--no-ties", is_flag=True, help="Let the layers feeding one residual add take different bit-widths.")
@click.option("--frontier-points", type=int, default=3, show_default=True,
              help="Budgets measured for the frontier, evenly spaced from the cheapest plan (plus the uniform plan).")
@click.option("--bisect-steps", type=int, default=5, show_default=True, help="Bisection steps for --max-drop.")
@user_errors
def search_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, factory: str | None,
                   seed: int, force: bool, size_budget: str | None, bops_budget: str | None,
                   latency_budget: str | None, latency_table: Path | None, latency_source: str,
                   max_drop: str | None, bit_set: str,
                   sensitivity_dir: Path | None, cross_terms: bool, no_ties: bool, frontier_points: int,
                   bisect_steps: int) -> None:
    """Search per-layer bit-widths for MODEL under size/BOPs/latency budgets, or within an accuracy band."""
    from ..quantizer.quantize import calibrate
    from ..search import search as s
    from ..search.costs import LatencyTable, layer_costs, measure_onnxruntime

    bits = _bit_list(bit_set, "--bits", SUPPORTED_WEIGHT_BITS)
    if len(bits) < 2:
        raise LowbitError(f"--bits {bit_set!r}: a search needs at least two bit-widths")
    requested = {m: t for m, t in (("size", size_budget), ("bops", bops_budget), ("latency", latency_budget)) if t}
    drop = _fraction(max_drop, "--max-drop") if max_drop is not None else None
    if not requested and drop is None:
        raise LowbitError("give a budget (--size, --bops or --latency) and/or --max-drop")
    table = LatencyTable.load(latency_table) if latency_table else None
    sens = Sensitivity.load(sensitivity_dir) if sensitivity_dir else None

    progress = Progress()
    config = QuantConfig(seed=seed)
    prepared = prepare(QuantizeRequest(model, output, calib, eval_path, factory, config, force), progress)
    graph = prepared.graph
    if sens is not None and sorted(layer.name for layer in sens.layers) != sorted(n.name for n in graph.layers):
        raise LowbitError(f"{sensitivity_dir}: measured on a different model ({sens.model}); its layers do not match")
    with progress.stage("calibrate"), progress.steps_of("calibrate") as log:
        stats = calibrate(graph, prepared.calib.x, log)
    sensitivity_written = sens is None
    if sens is None:
        sens = run_sensitivity(prepared, stats, SensitivityConfig(pair_bits=bits, seed=seed), None, 0, progress)

    if "latency" in requested and table is None:
        from ..quantizer.quantize import quantize
        from .compile import tvm_available

        if latency_source == "auto":
            latency_source = "tvm" if tvm_available() else "onnxruntime"
        with progress.stage("latency"), progress.steps_of("latency") as log:
            uniform = {b: quantize(graph, prepared.calib.x, QuantConfig(rounding="nearest"), BitPlan.uniform(graph, b),
                                   stats=stats) for b in bits}
            if latency_source == "tvm":
                from ..codegen.tvm.latency import measure_layers

                table = measure_layers(uniform, log=log)
            else:
                table = measure_onnxruntime(uniform, log=log)
        caveat = "" if latency_source == "tvm" else "; it runs 4-bit weights on int8 kernels: 4 and 8 bits time alike"
        progress.echo("latency", f"per-layer latency measured with {table.source} on {table.target} "
                                 f"({progress.timings['latency']:.1f}s){caveat}")
    costs = layer_costs(graph, bits, table)
    top = {layer.name: max(bits) for layer in graph.layers}
    budgets = {m: s.parse_budget(m, text, costs.total(m, top)) for m, text in requested.items()}
    metric = next(iter(budgets), "size")
    problem = s.build_problem(graph, sens, costs, bits, budgets or {metric: costs.total(metric, top)}, not no_ties)
    progress.echo("search", f"{len(problem.groups)} choices for {len(graph.layers)} layers "
                            f"({len(graph.layers) - len(problem.groups)} tied by residual adds), bits {list(bits)}")

    evaluator = s.PlanEvaluator(graph, prepared.calib.x, prepared.heldout.x, config, stats)
    points: list[s.FrontierPoint] = []

    def measure(budget: dict[str, float], what: str) -> s.FrontierPoint:
        with progress.stage("measure"), progress.steps_of("measure") as log:
            point = s.evaluate_point(problem, sens, costs, evaluator, budget, cross_terms, log)
        points.append(point)
        progress.echo("measure", f"{what}: bits {point.bit_counts}, {s.format_metric(metric, point.costs[metric])}, "
                                 f"top-1 agreement {100 * point.measured['top1_agreement']:.1f}% "
                                 f"({point.measured['seconds']:.0f}s)")
        return point

    cheapest, dearest = s.budget_range(problem, metric)
    baseline = measure({**problem.budgets, metric: dearest}, f"uniform {max(bits)}-bit")
    chosen = measure(budgets, "requested budget") if budgets else None
    for k in range(frontier_points):
        f = k / max(frontier_points, 1)
        measure({**problem.budgets, metric: cheapest + f * (dearest - cheapest)}, f"frontier {100 * f:.0f}%")
    if drop is not None:
        with progress.stage("bisect"):
            chosen, tried = s.bisect_max_drop(problem, sens, costs, evaluator, metric, drop, baseline, bisect_steps,
                                              cross_terms, echo=lambda m: progress.echo("bisect", m))
        points += tried
        progress.echo("bisect", f"cheapest plan within {100 * drop:.2f}%: "
                                f"{s.format_metric(metric, chosen.costs[metric])}, "
                                f"top-1 agreement {100 * chosen.measured['top1_agreement']:.1f}%")
    assert chosen is not None

    unique = {frozenset(p.plan.items()): p for p in reversed(points)}  # each plan once, as first measured
    frontier = [{**p.to_json(), "chosen": p.plan == chosen.plan} for p in unique.values()]
    summary = {"model": graph.name, "bits": list(bits), "metric": metric, "budgets": budgets,
               "max_drop": drop, "baseline": baseline.to_json(), "cross_terms": cross_terms,
               "ties": not no_ties, "groups": problem.groups,
               "latency_table": None if table is None else table.to_json()}
    with atomic_directory(output, force) as tmp:
        BitPlan(chosen.plan).save(tmp / "plan.json", model=graph.name, budgets=budgets, max_drop=drop,
                                  predicted_loss=chosen.predicted_loss, measured=chosen.measured, costs=chosen.costs)
        write_json(tmp / "frontier.json", {**summary, "points": frontier})
        plots.pareto_plot(frontier, metric, tmp / "frontier.png", f"{graph.name}: measured plans ({metric})")
        (tmp / "report.md").write_text(search_markdown(summary, frontier, metric))
        if sensitivity_written:
            write_sensitivity(tmp / "sensitivity", sens)
    progress.echo("done", f"wrote {output} in {progress.elapsed():.1f}s; apply the plan with "
                          f"`lowbit quantize {model} --plan {output / 'plan.json'} -o OUT`")


def search_markdown(summary: dict[str, Any], points: list[dict[str, Any]], metric: str) -> str:
    from ..search.search import format_metric

    lines = [f"# Bit-width search: {summary['model']}", "",
             f"- bit-widths: {summary['bits']}; budgets: " +
             (", ".join(f"{m} <= {format_metric(m, v)}" for m, v in summary["budgets"].items()) or "none") +
             (f"; max drop {100 * summary['max_drop']:.2f}%" if summary["max_drop"] is not None else ""),
             "- objective: exact per-group Hessian terms"
             + (", refined with every cross term" if summary["cross_terms"] else ""),
             "- fidelity: top-1 agreement with FP32 on held-out data, fake-quant executor, plans quantized as "
             "`lowbit quantize` does", "",
             f"| plan | {metric} | bits | predicted loss increase | top-1 agreement | SQNR |",
             "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["costs"][metric]):
        sqnr = p["measured"]["sqnr_db"]
        lines.append(f"| {'**chosen**' if p['chosen'] else ''} | {format_metric(metric, p['costs'][metric])} | "
                     f"{p['bit_counts']} | {p['predicted_loss']:.4g} | {100 * p['measured']['top1_agreement']:.1f}% | "
                     f"{'-' if sqnr is None else f'{sqnr:.1f} dB'} |")
    lines += ["", "Plot: `frontier.png`. Plan: `plan.json` (apply with `lowbit quantize MODEL --plan plan.json`).", ""]
    return "\n".join(lines)
