"""Benchmark: MobileNetV2 sensitivity and mixed-precision search, written to the search section of BENCHMARKS.md.

1. Sensitivity time (Hutchinson traces + exact quadratic terms for {4, 8} bits).
2. Do the inter-layer terms help? Spearman correlation of predicted vs measured loss
   increase over random INT4/INT8 plans, with and without the cross terms.
3. At equal size, the ILP plan's measured top-1 agreement vs a uniform-style plan (INT8 with
   the largest layers at INT4), the mean of 5 random plans, and the reversed-sensitivity plan.
4. `--max-drop`: bisection for the smallest plan within a measured agreement band.

    python benchmarks/bench_search.py [--out BENCHMARKS.md] [--configs 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sections import write_section

import lowbit
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.quantize import calibrate, quantize
from lowbit.quantizer.simulate import fake_quantizers
from lowbit.search.costs import layer_costs
from lowbit.search.search import (
    FrontierPoint,
    PlanEvaluator,
    all_costs,
    bisect_max_drop,
    build_problem,
    plan_for_budget,
)
from lowbit.sensitivity.analyze import SensitivityConfig, check_predictions, compute_sensitivity

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


def fill_to_size(order: list[str], costs, budget: float, top: dict[str, int]) -> dict[str, int]:
    """Lower layers to 4 bits, in `order`, until the plan fits `budget`; then raise back any that still fits,
    so every plan ends as close to the budget as its order allows."""
    plan = dict(top)
    lowered = []
    for name in order:
        if costs.total("size", plan) <= budget:
            break
        plan[name] = 4
        lowered.append(name)
    for name in reversed(lowered):
        plan[name] = top[name]
        if costs.total("size", plan) > budget:
            plan[name] = 4
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--configs", type=int, default=30, help="random plans for the Spearman check")
    parser.add_argument("--random-plans", type=int, default=5)
    parser.add_argument("--max-drop", type=float, default=0.01, help="agreement band for the bisection")
    parser.add_argument("--bisect-steps", type=int, default=4, help="bisection steps (0: skip the bisection)")
    parser.add_argument("--size", type=float, default=0.7, help="size budget, as a fraction of uniform INT8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    entry = get_zoo_entry("zoo:mobilenet_v2")
    graph = capture(load_program("zoo:mobilenet_v2", None), "mobilenet_v2")
    calib, heldout = entry.calibration(0), entry.heldout(0)
    log("calibrating")
    stats = calibrate(graph, calib)
    quantizers = fake_quantizers(quantize(graph, calib, QuantConfig(rounding="nearest"), stats=stats))

    log("sensitivity")
    t0 = time.perf_counter()
    sens = compute_sensitivity(graph, calib, quantizers, SensitivityConfig())
    sens_seconds = time.perf_counter() - t0
    widest = max(layer.trace_half_width / layer.trace for layer in sens.layers)
    median = float(np.median([layer.trace_half_width / layer.trace for layer in sens.layers]))
    log(f"sensitivity {sens_seconds:.0f}s; checking {args.configs} random plans")
    check = check_predictions(graph, sens, calib, configs=args.configs)
    rho = check["spearman"]
    log(f"spearman {rho}")

    costs = layer_costs(graph, [4, 8])
    top = {n.name: 8 for n in graph.layers}
    budget = args.size * costs.total("size", top)
    problem = build_problem(graph, sens, costs, [4, 8], {"size": budget})
    t0 = time.perf_counter()
    ilp_plan = plan_for_budget(problem, sens, cross_terms=False)
    ilp_seconds = time.perf_counter() - t0
    refined_plan = plan_for_budget(problem, sens, cross_terms=True)

    names = [n.name for n in graph.layers]
    # The uniform-style plan of the same size: INT8, with the largest layers at INT4 until it fits.
    largest_first = fill_to_size(sorted(names, key=lambda n: -graph.weight(n).numel()), costs, budget, top)
    rng = np.random.default_rng(0)
    random_plans = [fill_to_size(list(rng.permutation(names)), costs, budget, top) for _ in range(args.random_plans)]
    by_sensitivity = sorted(names, key=lambda n: sens.predict({n: 8}) - sens.predict({n: 4}))
    reversed_plan = fill_to_size(by_sensitivity, costs, budget, top)

    evaluator = PlanEvaluator(graph, calib, heldout, QuantConfig(), stats)
    rows = []
    contenders = [("uniform INT8 (reference, larger)", top), ("INT8, largest layers INT4 until it fits", largest_first),
                  ("ILP (exact per-group terms)", ilp_plan), ("ILP + cross-term refinement", refined_plan),
                  ("reversed sensitivity", reversed_plan)]
    contenders += [(f"random plan {i + 1}", p) for i, p in enumerate(random_plans)]
    for label, plan in contenders:
        log(f"measuring {label}")
        m = evaluator.measure(plan)
        rows.append((label, plan, m))
        log(f"{label}: {100 * m['top1_agreement']:.1f}%")
    tried: list[FrontierPoint] = []
    if args.bisect_steps > 0:
        log(f"bisecting for the smallest plan within a {100 * args.max_drop:.1f}% drop")
        baseline = FrontierPoint({}, top, sens.predict(top), rows[0][2], all_costs(costs, top))
        problem_all = build_problem(graph, sens, costs, [4, 8], {"size": costs.total("size", top)})
        chosen, tried = bisect_max_drop(problem_all, sens, costs, evaluator, "size", args.max_drop, baseline,
                                        steps=args.bisect_steps, echo=log)
    random_mean = float(np.mean([m["top1_agreement"] for label, _, m in rows if label.startswith("random")]))

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmarks: MobileNetV2 sensitivity and mixed-precision search", "",
        "Generated by `benchmarks/bench_search.py`; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpu}, {os.cpu_count()} logical CPUs, {args.threads} torch threads; 1-minute load average "
        f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end (other jobs included)",
        f"- Versions: lowbit {lowbit.__version__} (git {git}), torch {torch.__version__}",
        f"- Data: `zoo:mobilenet_v2` seed 0; sensitivity on {sens.samples} calibration crops; plans measured on "
        f"{len(heldout)} held-out crops (top-1 agreement with FP32, fake-quant executor, each plan quantized as "
        "`lowbit quantize` does: GPTQ weights, 8-bit activations)", "",
        "## Sensitivity time", "",
        "| step | time |", "|---|---:|",
        f"| Hutchinson traces (top-8 classes exact, then {sens.trace_draws} draws; 95% half-width median "
        f"±{100 * median:.1f}%, widest "
        f"±{100 * widest:.1f}%) | {sens.timings['traces_s']:.1f} s |",
        f"| exact quadratic terms ({len(sens.keys)} perturbations: {len(sens.layers)} layers × {{4, 8}} bits, "
        "and each layer's activation noise) | "
        f"{sens.timings['quadratic_terms_s']:.1f} s |",
        f"| **total** | **{sens_seconds:.1f} s** |", "",
        f"## Do the inter-layer terms help? ({args.configs} random INT4/INT8 plans, {sens.rounding} weight errors)", "",
        "| prediction of the loss increase (KL to FP32) | Spearman vs measured |", "|---|---:|",
        f"| ½ δᵀHδ with every inter-layer term | {rho['cross']:.3f} |",
        f"| exact per-layer blocks only (diagonal) | {rho['diagonal']:.3f} |",
        f"| HAWQ-V3 trace estimate, ½ Σ Tr(H_i)/n_i ‖ΔW_i‖² | {rho['trace']:.3f} |", "",
        f"## Equal size: ILP vs other plans (budget {budget / 1e6:.3f} MB of weights, {args.size:.2f}× uniform "
        "INT8; every plan but the reference fits it)", "",
        "| plan | INT4 layers | weight size | top-1 agreement | SQNR |", "|---|---:|---:|---:|---:|",
    ]
    for label, plan, m in rows:
        lines.append(f"| {label} | {sum(b == 4 for b in plan.values())} | {costs.total('size', plan) / 1e6:.3f} MB | "
                     f"{100 * m['top1_agreement']:.1f}% | {m['sqnr_db']:.1f} dB |")
    lines += [f"| mean of {args.random_plans} random plans | | | {100 * random_mean:.1f}% | |", "",
              f"ILP solve time: {1000 * ilp_seconds:.0f} ms ({len(problem.groups)} choices).", ""]
    if tried:
        lines += bisection_lines(tried, chosen, rows[0][2]["top1_agreement"], args.max_drop, costs.total("size", top))
    write_section(args.out, "search", "\n".join(lines))
    log(f"wrote {args.out}")
    return 0


def bisection_lines(tried: list[FrontierPoint], chosen: FrontierPoint, base: float, max_drop: float,
                    uniform_size: float) -> list[str]:
    lines = [f"## Bisection: smallest plan within a {100 * max_drop:.1f}% agreement drop from uniform INT8", "",
             "| step | size budget | INT4 layers | top-1 agreement | drop | within band |",
             "|---|---:|---:|---:|---:|---|"]
    for i, p in enumerate(tried):
        drop = base - p.measured["top1_agreement"]
        lines.append(f"| {i + 1}{' (chosen)' if p is chosen else ''} | {p.budget['size'] / 1e6:.3f} MB | "
                     f"{p.bit_counts.get(4, 0)} | {100 * p.measured['top1_agreement']:.1f}% | {100 * drop:+.1f}% | "
                     f"{'yes' if drop <= max_drop + 1e-12 else 'no'} |")
    chosen_drop = base - chosen.measured["top1_agreement"]
    lines += ["", f"Chosen: {chosen.costs['size'] / 1e6:.3f} MB ({chosen.costs['size'] / uniform_size:.2f}× uniform "
              f"INT8), measured drop {100 * chosen_drop:+.1f}%.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
