"""Benchmark: MobileNetV2 with a few activation tensors kept at 16 bits, chosen by the search's ILP.

The sensitivity stage predicts each activation tensor's rounding cost at 8 and 16 bits;
the ILP (weights fixed at INT8, `--bits 8 --wide-activations`) keeps the tensors worth it
at 16 bits, under a cap on how many (the issue's bar: at most 10% of the tensors) and,
for the last rows, under a latency budget from the per-layer TVM table. Each plan is
quantized as `lowbit quantize` does, scored with the integer reference executor on the
held-out and in-domain sets (bootstrap 95% intervals over photos), compiled with TVM
(checked bit for bit against the reference) and timed against uniform INT8 and ONNX
Runtime's quantize_static in interleaved rounds. Writes the int16 section of BENCHMARKS.md.

    python benchmarks/bench_int16.py [--out BENCHMARKS.md] [--caps 3,6,13] [--latency 1.10,1.15]
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_mobilenet_v2 import (
    Contender,
    export_fp32_onnx,
    fmt_agreement,
    load_data,
    log,
    measure_latency,
    ort_predict,
    ort_session,
    ort_static,
    preprocess_for_ort,
)
from bench_tvm import TARGET, compiled_contender
from onnxruntime.quantization import CalibrationMethod
from sections import cpu_info, lowbit_revision, write_section

import lowbit
from lowbit.codegen.tvm.latency import measure_layers
from lowbit.metrics import paired_difference
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.pipeline.report import reference_outputs
from lowbit.pipeline.sensitivity import activation_grids
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import run_graph
from lowbit.quantizer.quantize import calibrate, quantize, scaled_tensors
from lowbit.search.costs import layer_costs
from lowbit.search.search import all_costs, build_problem, plan_for_budget
from lowbit.sensitivity.analyze import SensitivityConfig, compute_sensitivity

MODEL = "mobilenet_v2"


def capped(problem, cap: int):
    """`problem` with at most `cap` activation tensors at 16 bits (a "wide" metric: 1 per such choice)."""
    wide = np.zeros_like(problem.cost)
    wide[len(problem.groups):, 1] = 1.0
    return replace(problem, metrics={**problem.metrics, "wide": wide}, budgets={**problem.budgets, "wide": cap})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--caps", default="3,6,13", help="most activation tensors at 16 bits, per plan")
    parser.add_argument("--latency", default="1.10,1.15",
                        help="latency budgets (× uniform INT8, per-layer TVM table) under the 10%% cap")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    data = load_data()
    graph = capture(load_program(f"zoo:{MODEL}", None), MODEL)
    n_tensors = len(scaled_tensors(graph))
    ten_percent = math.floor(0.1 * n_tensors)
    log("calibrating and measuring sensitivity")
    stats = calibrate(graph, data.calib)
    narrow, wide = activation_grids(graph, data.calib, stats, QuantConfig())
    # Only the exact quadratic terms are used here; the Hutchinson traces (HAWQ's Ω) are not, so few draws.
    sens = compute_sensitivity(graph, data.calib, narrow, SensitivityConfig(bits=(8,), pair_bits=(8,), max_draws=4),
                               log=log, wide_quantizers=wide)
    log("per-layer TVM latency, 8-bit and 16-bit inputs")
    timing = QuantConfig(calib_method="minmax", rounding="nearest")
    q8 = quantize(graph, data.calib, timing, stats=stats)
    q16 = quantize(graph, data.calib, timing, BitPlan(BitPlan.uniform(graph, 8).bits, dict.fromkeys(wide, 16)),
                   stats=stats)
    table = measure_layers({8: q8}, TARGET, log=log, wide_input=q16)
    costs = layer_costs(graph, [8], table)
    int8_ms = costs.total("latency", {n.name: 8 for n in graph.layers})

    plans = {"uniform INT8": BitPlan.uniform(graph, 8)}
    for cap in [int(c) for c in args.caps.split(",")]:
        problem = build_problem(graph, sens, costs, [8], {"latency": math.inf}, activations=True)
        plans[f"≤ {cap} tensors at 16 bits"] = plan_for_budget(capped(problem, cap))
    for f in [float(f) for f in args.latency.split(",")]:
        problem = build_problem(graph, sens, costs, [8], {"latency": f * int8_ms}, activations=True)
        plans[f"≤ {ten_percent} tensors, latency ≤ {f:.2f}× INT8 (table)"] = plan_for_budget(capped(problem,
                                                                                                    ten_percent))
    plans[f"all {len(wide)} tensors at 16 bits"] = BitPlan(BitPlan.uniform(graph, 8).bits, dict.fromkeys(wide, 16))

    with torch.no_grad():
        fp32 = {s: np.concatenate([run_graph(graph, torch.from_numpy(x[i:i + 32]))[graph.outputs[0]].numpy()
                                   for i in range(0, len(x), 32)])
                for s, x in (("held-out", data.heldout), ("in-domain", data.x_indomain))}
    photos = {"held-out": data.heldout_photos, "in-domain": data.indomain_photos}
    rows, logits, predicted = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-int16-") as tmp_name:
        tmp = Path(tmp_name)
        for label, plan in plans.items():
            log(f"{label}: quantizing ({len(plan.activation_bits)} tensors at 16 bits)")
            qgraph = quantize(graph, data.calib, QuantConfig(), plan, stats=stats)
            logits[label] = {"held-out": reference_outputs(qgraph, data.heldout)[graph.outputs[0]],
                             "in-domain": reference_outputs(qgraph, data.x_indomain)[graph.outputs[0]]}
            predicted[label] = all_costs(costs, plan)["latency"]
            contender, check = compiled_contender(f"lowbit TVM, {label}", qgraph, tmp, data.heldout[:32])
            if not check["bit_exact"]:
                raise SystemExit(f"{label}: the TVM build disagrees with the reference executor")
            rows.append((label, plan, contender))
        export_fp32_onnx(get_zoo_entry(MODEL).build().eval(), tmp / "fp32.onnx")
        source, _ = preprocess_for_ort(tmp / "fp32.onnx", tmp / "fp32.pre.onnx")
        ort_static(source, tmp / "ort.onnx", data.calib, CalibrationMethod.Percentile)
        ort = Contender("ORT quantize_static (Percentile, its best here)",
                        ort_predict(ort_session(tmp / "ort.onnx", args.threads)))
        logits[ort.name] = {"held-out": ort.predict(data.heldout), "in-domain": ort.predict(data.x_indomain)}
        log("timing")
        timed = [c for _, _, c in rows] + [ort]
        measure_latency(timed, data.heldout[:1], args.runs, args.rounds)

    int8_agrees = {s: logits["uniform INT8"][s].argmax(1) == fp32[s].argmax(1) for s in fp32}
    cpu, _ = cpu_info()
    base_ms = rows[0][2].latency_ms
    lines = [
        "# int16 activations: MobileNetV2 with the tensors the ILP keeps at 16 bits", "",
        "Generated by `benchmarks/bench_int16.py`; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {args.threads} threads, batch 1; "
        f"load {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; lowbit {lowbit.__version__} "
        f"({lowbit_revision()})",
        f"- Weights INT8 everywhere; {len(wide)} of the {n_tensors} activation tensors may be 16-bit (10% = "
        f"{ten_percent}). Each plan: the ILP on the sensitivity's exact activation-noise terms (objective "
        "`diagonal`), under the cap and, where given, a latency budget from the per-layer TVM table; quantized "
        "with the default recipe; agreement from the integer reference executor (every TVM build checked equal to "
        "it on 32 held-out inputs, bit for bit); [low, high] are bootstrap 95% intervals over photos; differences "
        "paired.",
        f"- Latency: median of {args.runs} batch-1 calls, minimum over {args.rounds} interleaved rounds; "
        "'table' is the per-layer TVM table's prediction.", "",
        "| plan | tensors at 16 bits | held-out (192 crops of 13 photos) | − INT8 | confident held-out "
        "| in-domain (200 crops of 20 photos) | − INT8 | confident in-domain | latency | ÷ INT8 | table ÷ INT8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, plan, contender in rows:
        cells = []
        for s in ("held-out", "in-domain"):
            agrees = logits[label][s].argmax(1) == fp32[s].argmax(1)
            d, ci = paired_difference(agrees, int8_agrees[s], photos[s])
            cells += [fmt_agreement(logits[label][s], fp32[s], photos[s]),
                      f"{100 * d:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]",
                      fmt_agreement(logits[label][s], fp32[s], photos[s], confident=True)]
        lines.append(f"| {label} | {len(plan.activation_bits)} | " + " | ".join(cells)
                     + f" | {contender.latency_ms:.2f} ms | {contender.latency_ms / base_ms:.3f} | "
                     f"{predicted[label] / int8_ms:.3f} |")
    cells = []
    for s in ("held-out", "in-domain"):
        agrees = logits[ort.name][s].argmax(1) == fp32[s].argmax(1)
        d, ci = paired_difference(agrees, int8_agrees[s], photos[s])
        cells += [fmt_agreement(logits[ort.name][s], fp32[s], photos[s]),
                  f"{100 * d:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]",
                  fmt_agreement(logits[ort.name][s], fp32[s], photos[s], confident=True)]
    lines.append(f"| {ort.name} | | " + " | ".join(cells)
                 + f" | {ort.latency_ms:.2f} ms | {ort.latency_ms / base_ms:.3f} | |")
    lines += ["", "Tensors kept at 16 bits:", ""]
    lines += [f"- {label}: {', '.join(sorted(plan.activation_bits)) or 'none'}" for label, plan, _ in rows[1:-1]]
    write_section(args.out, "int16", "\n".join(lines))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
