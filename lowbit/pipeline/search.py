"""`lowbit search`: per-layer bit-widths under size/BOPs/latency budgets, or within an accuracy band."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LowbitError
from ..io import atomic_directory, atomic_file, write_json
from ..quantizer.config import BitPlan, QuantConfig
from ..search.ilp import DEFAULT_OBJECTIVE
from ..sensitivity.analyze import SensitivityConfig
from ..sensitivity.artifact import Sensitivity
from . import plots
from . import report as reports
from .prepare import Prepared, Source, prepare, smooth_prepared
from .progress import Progress
from .sensitivity import run_sensitivity, write_sensitivity

if TYPE_CHECKING:
    from ..codegen.tvm.remote import RpcTarget
    from ..search.search import FrontierPoint

LATENCY_SOURCES = ("auto", "tvm", "tvm-rpc", "onnxruntime")


@dataclass(frozen=True)
class SearchOptions:
    """What `lowbit search` was asked for (see its --help for each)."""

    bits: tuple[int, ...] = (4, 8)
    budgets: dict[str, str] | None = None  # metric ("size", "bops", "latency") -> budget text, e.g. "0.75x"
    max_drop: float | None = None  # a fraction, e.g. 0.01
    latency_table: Path | None = None
    latency_source: str = "auto"
    sensitivity_dir: Path | None = None
    objective: str = DEFAULT_OBJECTIVE  # what the ILP minimises (search.ilp.OBJECTIVES)
    ties: bool = True
    frontier_points: int = 3
    bisect_steps: int = 5
    target: str | None = None  # TVM target of the latency table (default: this CPU; with `rpc`, the remote devices')
    rpc: RpcTarget | None = None  # time the latency table on the devices under this tracker's key
    wide_activations: bool = False  # let the ILP keep activation tensors at 16 bits
    # The cost --max-drop minimises (None: the budget's, else BOPs with 16-bit activations, else size).
    bisect: str | None = None
    # Budgets like 0.8x are fractions of the uniform highest-bit plan with every activation that may be 16-bit at
    # 16 bits (Schaefer et al.'s 16-bit baseline; the text-model default), not of its all-8-bit-activation plan.
    budgets_of_widest: bool = False


def text_model_defaults(model: str) -> dict[str, Any]:
    """The search a text model gets unless told otherwise: 8-bit weights, activations 8 or 16 bits, and
    --max-drop minimising measured latency.

    On a CPU a 4-bit weight does not make a GEMM faster (the VNNI kernels multiply bytes), so the
    trade that buys time is the activations' width: an int16 input runs a linear as two 8-bit
    passes. It is also where the accuracy is: MiniLM at W8A8 keeps a mean embedding cosine of
    0.972, with the GELU outputs at 16 bits 0.983, with the LayerNorm outputs too about 0.997
    (simulated, 64 held-out sentences), while 4-bit weights cost accuracy and save no time. Give --bits and
    --narrow-activations to search otherwise."""
    from ..models.zoo import ZOO_PREFIX, get_zoo_entry
    from .text import text_model_directory

    entry = get_zoo_entry(model) if model.startswith(ZOO_PREFIX) else None
    if text_model_directory(model, entry) is None:
        return {}
    from .checks import tvm_available

    # Latency is timed in TVM only for 16-bit activations; without TVM, BOPs stand in for it.
    return {"bits": (8,), "wide_activations": True, "bisect": "latency" if tvm_available() else "bops",
            "budgets_of_widest": True}


@dataclass
class SearchResult:
    """What a search found: the chosen plan, every plan measured, and the sensitivity it used."""

    chosen: FrontierPoint
    summary: dict[str, Any]  # frontier.json without its points
    frontier: list[dict[str, Any]]  # every plan measured, once each
    sens: Sensitivity
    sensitivity_measured: bool  # measured here (so it belongs in the output), not loaded from --sensitivity
    activation_costs: dict[str, dict[str, float]]  # per tensor the chosen plan keeps at 16 bits

    @property
    def plan(self) -> BitPlan:
        return self.chosen.plan


def search(source: Source, o: SearchOptions, output: Path, force: bool = False,
           progress: Progress | None = None, smooth: str = "default") -> dict[str, Any]:
    """The whole `lowbit search`: writes plan.json, frontier.json/.png and report.md to `output` (atomically).
    `smooth` is quantize's --smooth: the plans are measured on the graph `lowbit quantize --plan` will build.

    Returns the summary that frontier.json holds, without its points."""
    progress = progress or Progress()
    _check_options(o)
    prepared, _ = smooth_prepared(prepare(source, progress), smooth, progress)
    result = run_search(prepared, o, progress)
    result.summary["seconds"] = progress.elapsed()
    with atomic_directory(output, force) as tmp:
        write_search(tmp, result)
    progress.echo("done", f"wrote {output} in {progress.elapsed():.1f}s; apply the plan with "
                          f"`lowbit quantize {source.model} --plan {output / 'plan.json'} -o OUT`")
    return result.summary


def _check_options(o: SearchOptions) -> None:
    """Refuse a search that cannot be run, before anything slow."""
    from ..search import search as s

    if len(o.bits) < 2 and not o.wide_activations:
        raise LowbitError(f"--bits {','.join(map(str, o.bits))}: a search needs at least two bit-widths (or "
                          "--wide-activations, to choose activation widths alone)")
    requested = o.budgets or {}
    if not requested and o.max_drop is None:
        raise LowbitError("give a budget (--size, --bops or --latency) and/or --max-drop")
    if o.bisect is not None and o.bisect not in s.METRICS:
        raise LowbitError(f"--bisect {o.bisect!r}: expected one of {', '.join(s.METRICS)}")
    if o.bisect is not None and o.max_drop is None:
        raise LowbitError(f"--bisect {o.bisect}: it names the cost that --max-drop minimises; give --max-drop")
    if o.wide_activations and o.max_drop is None and not {"latency", "bops"} & set(requested):
        raise LowbitError("16-bit activations cost time, not weight size, so a search that may choose them needs "
                          "a --latency or --bops budget, or --max-drop alone (it then bisects BOPs)")


def run_search(prepared: Prepared, o: SearchOptions, progress: Progress,
               config: QuantConfig | None = None) -> SearchResult:
    """Measure (or load) the sensitivity and the costs, solve the ILP, and measure the plans it gives, each
    quantized with `config` (default: the default recipe)."""
    from ..quantizer.quantize import calibrate
    from ..search import search as s
    from ..search.costs import LatencyTable, layer_costs, measure_onnxruntime

    _check_options(o)
    bits, requested, drop = o.bits, o.budgets or {}, o.max_drop
    sensitivity_dir = o.sensitivity_dir
    wants_latency = "latency" in requested or o.bisect == "latency"
    latency_source = _latency_source(o, needed=wants_latency and o.latency_table is None)
    table = LatencyTable.load(o.latency_table) if o.latency_table else None
    sens = Sensitivity.load(sensitivity_dir) if sensitivity_dir else None

    seed = prepared.source.seed
    config = config or QuantConfig(seed=seed)
    graph = prepared.graph
    if sens is not None and sorted(layer.name for layer in sens.layers) != sorted(n.name for n in graph.layers):
        raise LowbitError(f"{sensitivity_dir}: measured on a different model ({sens.model}); its layers do not match")
    if sens is not None and sens.smooth != prepared.smooth:
        raise LowbitError(f"{sensitivity_dir}: measured with --smooth {sens.smooth}, but this search smooths with "
                          f"{prepared.smooth}; pass --smooth {sens.smooth}, or measure the sensitivity again with "
                          f"--smooth {prepared.smooth}")
    if sens is not None and sens.seq_len is not None and sens.seq_len != prepared.seq_len:
        raise LowbitError(f"{sensitivity_dir}: measured at sequence length {sens.seq_len}, but this search runs at "
                          f"{prepared.seq_len}; pass --seq-len {sens.seq_len}, or measure the sensitivity again at "
                          f"{prepared.seq_len}")
    with progress.stage("calibrate"), progress.steps_of("calibrate") as log:
        stats = calibrate(graph, prepared.calib.data, log)
    evaluator = s.PlanEvaluator(graph, prepared.calib.data, prepared.heldout.data, config, stats,
                                prepared.heldout.photos)
    sensitivity_written = sens is None
    if sens is None:
        # The activation grids the plans will be measured with: the uniform plan's range method, chosen once here
        # (an "auto" recipe per grid would run its validation passes again, twice).
        with progress.stage("recipe"), progress.steps_of("recipe") as log:
            recipe = evaluator.recipe(BitPlan.uniform(graph, max(bits)), log)
        # Ω and the quadratic terms at the bit-widths searched only: each more is a GPTQ pass per layer.
        sens = run_sensitivity(prepared, stats, SensitivityConfig(bits=tuple(bits), pair_bits=tuple(bits), seed=seed),
                               None, 0, progress, QuantConfig(calib_method=recipe.calib_method))

    if wants_latency and table is None:
        from ..quantizer.quantize import quantize
        from .checks import tvm_available

        if latency_source == "auto":
            latency_source = "tvm" if tvm_available() else "onnxruntime"
        with progress.stage("latency"), progress.steps_of("latency") as log:
            # Kernel time does not depend on the ranges or the rounding: take the cheapest recipe.
            timing_config = QuantConfig(calib_method="minmax", rounding="nearest")
            uniform = {b: quantize(graph, prepared.calib.data, timing_config, BitPlan.uniform(graph, b), stats=stats)
                       for b in bits}
            if latency_source in ("tvm", "tvm-rpc"):
                from ..codegen.tvm.latency import measure_layers
                from ..codegen.tvm.target import DEFAULT_TARGET

                wide = None
                if o.wide_activations:
                    wide_plan = BitPlan(BitPlan.uniform(graph, max(bits)).bits,
                                        {t: 16 for t in sens.activation_tensors})
                    wide = quantize(graph, prepared.calib.data, timing_config, wide_plan, stats=stats)
                table = measure_layers(uniform, o.target or DEFAULT_TARGET, log=log, rpc=o.rpc, wide_input=wide)
            elif o.wide_activations:
                raise LowbitError("16-bit activations are timed in TVM only (ONNX Runtime's QDQ models have no "
                                  "int16 convolution): install TVM or use --latency-source tvm")
            else:
                table = measure_onnxruntime(uniform, log=log)
        caveat = ("" if latency_source != "onnxruntime" else
                  "; it runs 4-bit weights on int8 kernels: 4 and 8 bits time alike")
        progress.echo("latency", f"per-layer latency measured with {table.source} on {table.target} "
                                 f"({progress.timings['latency']:.1f}s){caveat}")
    costs = layer_costs(graph, bits, table)
    top = {layer.name: max(bits) for layer in graph.layers}
    widest = {t: 16 for t in sens.activation_tensors} if o.wide_activations and o.budgets_of_widest else {}
    budgets = {m: s.parse_budget(m, text, s.all_costs(costs, BitPlan(top, widest))[m])
               for m, text in requested.items()}
    # Without a budget, --max-drop bisects size, or BOPs when activations may widen (they cost no size).
    metric = o.bisect or next(iter(budgets), "bops" if o.wide_activations else "size")
    problem = s.build_problem(graph, sens, costs, bits, {metric: math.inf, **budgets}, o.ties,
                              o.objective, o.wide_activations)
    progress.echo("search", f"{len(problem.groups)} choices for {len(graph.layers)} layers "
                            f"({len(graph.layers) - len(problem.groups)} tied by residual adds), bits {list(bits)}")

    fidelity = evaluator.fidelity
    points: list[s.FrontierPoint] = []

    def measure(budget: dict[str, float], what: str) -> s.FrontierPoint:
        with progress.stage("measure"), progress.steps_of("measure") as log:
            point = s.evaluate_point(problem, sens, costs, evaluator, budget, log)
        points.append(point)
        progress.echo("measure", f"{what}: bits {point.bit_counts}{s.wide_text(point.plan)}, "
                                 f"{s.format_metric(metric, point.costs[metric])}, "
                                 f"{fidelity.label} {fidelity.short(point.measured)} "
                                 f"({point.measured['seconds']:.0f}s)")
        return point

    cheapest, dearest = problem.metric_range(metric)
    highest = f"uniform {max(bits)}-bit" + (", activations 16-bit where they may be" if problem.tensors else "")
    baseline = measure({**problem.budgets, metric: dearest}, highest)
    chosen = measure(budgets, "requested budget") if budgets else None
    for k in range(o.frontier_points):
        f = k / max(o.frontier_points, 1)
        measure({**problem.budgets, metric: cheapest + f * (dearest - cheapest)}, f"frontier {100 * f:.0f}%")
    if drop is not None:
        with progress.stage("bisect"):
            chosen, tried = s.bisect_max_drop(problem, sens, costs, evaluator, metric, drop, baseline, o.bisect_steps,
                                              echo=lambda m: progress.echo("bisect", m))
        points += tried
        # A frontier point bisection did not try may be cheaper and still within the band.
        chosen = min((p for p in points if baseline.measured["score"] - p.measured["score"] <= drop + 1e-12),
                     key=lambda p: (p.costs[metric], -p.measured["score"]))
        progress.echo("bisect", f"cheapest plan within {100 * drop:.2f}%: "
                                f"{s.format_metric(metric, chosen.costs[metric])}, "
                                f"{fidelity.label} {fidelity.short(chosen.measured)}")
    assert chosen is not None

    unique = {s.plan_key(p.plan): p for p in reversed(points)}  # each plan once, as first measured
    frontier = [{**p.to_json(), "chosen": p.plan == chosen.plan,
                 "drop_vs_baseline": evaluator.drop(baseline.plan, p.plan)} for p in unique.values()]
    activation_costs = wide_activation_costs(chosen.plan, sens, costs)
    summary = {"model": graph.name, "smooth": prepared.smooth, "bits": list(bits), "metric": metric, "budgets": budgets,
               "fidelity": fidelity.key, "baseline_plan": highest,
               "budgets_of": f"uniform {max(bits)}-bit" + (", activations 16-bit where they may be" if widest else ""),
               "heldout": reports.data_summary(prepared.heldout),
               "max_drop": drop, "baseline": baseline.to_json(), "objective": o.objective,
               "ties": o.ties, "groups": problem.groups, "activation_choices": problem.tensors,
               "chosen_activation_costs": activation_costs,
               "latency_table": None if table is None else table.to_json()}
    return SearchResult(chosen, summary, frontier, sens, sensitivity_written, activation_costs)


def write_search(directory: Path, result: SearchResult) -> None:
    """plan.json, frontier.json/.png, report.md (and the sensitivity, if measured) into `directory`."""
    summary, chosen = result.summary, result.chosen
    chosen.plan.save(directory / "plan.json", model=summary["model"], budgets=summary["budgets"],
                     smooth=summary["smooth"], max_drop=summary["max_drop"], predicted_loss=chosen.predicted_loss,
                     measured=chosen.measured,
                     costs=chosen.costs, activation_costs=result.activation_costs)
    write_json(directory / "frontier.json", {**summary, "points": result.frontier})
    metric = summary["metric"]
    plots.pareto_plot(result.frontier, metric, directory / "frontier.png",
                      f"{summary['model']}: measured plans ({metric})")
    with atomic_file(directory / "report.md") as f:
        f.write(search_markdown(summary, result.frontier, metric))
    if result.sensitivity_measured:
        write_sensitivity(directory / "sensitivity", result.sens)


def wide_activation_costs(plan: BitPlan, sens: Sensitivity, costs) -> dict[str, dict[str, float]]:
    """Per activation tensor the plan keeps at 16 bits: the predicted loss it saves, and what it adds to BOPs
    and (with a latency table) latency."""
    out = {}
    for t in sorted(t for t, b in plan.activation_bits.items() if b == 16):
        row = {"loss_saved": sens.activation_cost(t, 8) - sens.activation_cost(t, 16),
               "bops": costs.activation_cost("bops", t, 16)}
        if costs.latency is not None:
            row["latency_ms"] = costs.activation_cost("latency", t, 16)
        out[t] = row
    return out


def _latency_source(o: SearchOptions, needed: bool) -> str:
    """The latency source to use, checked against --rpc-tracker before anything slow runs."""
    if o.latency_source not in LATENCY_SOURCES:
        raise LowbitError(f"--latency-source {o.latency_source!r}: expected one of {list(LATENCY_SOURCES)}")
    if o.target is not None and needed and o.latency_source != "onnxruntime":
        from ..codegen.tvm.target import parse_target

        parse_target(o.target)  # a bad target fails now, not after sensitivity
    if o.rpc is None:
        if o.latency_source == "tvm-rpc":
            raise LowbitError("--latency-source tvm-rpc needs --rpc-tracker HOST:PORT and --rpc-key KEY")
        return o.latency_source
    if o.latency_source not in ("auto", "tvm-rpc"):
        raise LowbitError(f"--rpc-tracker times layers on the remote devices, but --latency-source is "
                          f"{o.latency_source}: use --latency-source tvm-rpc (or leave it at auto)")
    if not needed:
        raise LowbitError("--rpc-tracker is used to measure the latency table: give a --latency budget (and no "
                          "--latency-table)")
    from ..codegen.tvm.remote import require_devices

    require_devices(o.rpc)  # an unreachable tracker or no device fails now, not after sensitivity
    return "tvm-rpc"


def search_markdown(summary: dict[str, Any], points: list[dict[str, Any]], metric: str) -> str:
    from ..search.fidelity import FIDELITIES, TOP1, extra_column
    from ..search.search import OBJECTIVES, format_metric

    heldout = summary.get("heldout")
    on = "" if heldout is None else f" ({reports.samples_text(heldout)})"
    fidelity = FIDELITIES[summary.get("fidelity", TOP1.key)]
    baseline = summary.get("baseline_plan", "the uniform highest-precision plan")
    what = ("top-1 agreement with FP32" if fidelity is TOP1 else
            "the cosine of each sentence's embedding with FP32's (mean over sentences)")
    extra = extra_column(points[0]["measured"])[0] if points else ""
    lines = [f"# Bit-width search: {summary['model']}", "",
             f"- bit-widths: {summary['bits']}; budgets: " +
             (", ".join(f"{m} <= {format_metric(m, v)}" for m, v in summary["budgets"].items()) or "none") +
             (f"; max drop {100 * summary['max_drop']:.2f}%" if summary["max_drop"] is not None else ""),
             f"- objective ({summary['objective']}): {OBJECTIVES[summary['objective']]}",
             f"- fidelity: {what} on held-out data{on}, fake-quant executor, plans quantized as `lowbit quantize` "
             "does; [low, high] are bootstrap 95% intervals, the drop's paired (both plans scored on the same "
             f"samples) and measured against the baseline, {baseline}"
             + ("; confident: FP32 top-1/top-2 logit gap above 1.0" if fidelity is TOP1 else ""), "",
             f"| plan | {metric} | bits | predicted loss increase | {fidelity.label} | {extra} "
             "| drop vs baseline | SQNR |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["costs"][metric]):
        sqnr = p["measured"]["sqnr_db"]
        drop = p.get("drop_vs_baseline")
        drop_text = "-" if drop is None else (f"{fidelity.difference(drop['value'])} "
                                              f"[{fidelity.difference(drop['low'])}, "
                                              f"{fidelity.difference(drop['high'])}]")
        lines.append(f"| {'**chosen**' if p['chosen'] else ''} | {format_metric(metric, p['costs'][metric])} | "
                     f"{p['bit_counts']}{_wide_text(p)} | {p['predicted_loss']:.4g} | "
                     f"{fidelity.short(p['measured'])} | {extra_column(p['measured'])[1]} | "
                     f"{drop_text} | {'-' if sqnr is None else f'{sqnr:.1f} dB'} |")
    wide = summary.get("chosen_activation_costs") or {}
    if summary.get("activation_choices"):
        lines += ["", f"## 16-bit activations: {len(wide)} of the {len(summary['activation_choices'])} tensors that "
                  "may be 16-bit, in the chosen plan", ""]
        if wide:
            latency = any("latency_ms" in c for c in wide.values())
            lines += ["| tensor | predicted loss saved | BOPs added | " + ("latency added |" if latency else ""),
                      "|---|---:|---:|" + ("---:|" if latency else "")]
            lines += [f"| {t} | {c['loss_saved']:.3g} | {c['bops'] / 1e9:.3f} G | "
                      + (f"{c['latency_ms']:.3f} ms |" if latency else "") for t, c in wide.items()]
    lines += ["", "Plot: `frontier.png`. Plan: `plan.json` (apply with `lowbit quantize MODEL --plan plan.json`).", ""]
    return "\n".join(lines)


def _wide_text(point: dict[str, Any]) -> str:
    wide = sum(b == 16 for b in point.get("activation_bits", {}).values())
    return f", {wide} activations at 16" if wide else ""
