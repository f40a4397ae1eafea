"""Benchmark: MobileNetV2 sensitivity and mixed-precision search, written to the search section of BENCHMARKS.md.

1. Sensitivity time (Hutchinson traces + exact quadratic terms for {4, 8} bits).
2. Do the inter-layer terms help? Spearman correlation of predicted vs measured loss
   increase over random INT4/INT8 plans, with and without the cross terms.
3. At equal size, the ILP plan's measured top-1 agreement vs a uniform-style plan (INT8 with
   the largest layers at INT4), the mean of 5 random plans, and the reversed-sensitivity plan.
4. `--max-drop`: bisection for the smallest plan within a measured agreement band.

    python benchmarks/bench_search.py [--out BENCHMARKS.md] [--configs 30] [--threads 2]

A smoke run of the whole script in a minute or two, to another file:

    python benchmarks/bench_search.py --model zoo:small_cnn --configs 6 --random-plans 2 --bisect-steps 1 \
        --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sections import cpu_info, lowbit_revision, write_section

import lowbit
from lowbit.metrics import CONFIDENT_GAP, Agreement, bootstrap_interval, paired_difference
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
    parser.add_argument("--model", default="zoo:mobilenet_v2", help="a zoo model (zoo:small_cnn for a smoke run)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    entry = get_zoo_entry(args.model)
    graph = capture(load_program(f"zoo:{entry.name}", None), entry.name)
    calib, heldout = entry.calibration(0), entry.heldout(0)
    # Each held-out crop's photo; a zoo set without photos has independent samples: each its own "photo".
    photos = entry.heldout_photos(0) if entry.heldout_photos else np.arange(len(heldout))
    crops_of = f"crops of {len(np.unique(photos))} photos" if entry.heldout_photos else "samples (independent)"
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
    ilp_plan = plan_for_budget(problem).bits
    ilp_seconds = time.perf_counter() - t0
    cross_plan = plan_for_budget(build_problem(graph, sens, costs, [4, 8], {"size": budget}, objective="cross")).bits

    names = [n.name for n in graph.layers]
    # The uniform-style plan of the same size: INT8, with the largest layers at INT4 until it fits.
    largest_first = fill_to_size(sorted(names, key=lambda n: -graph.weight(n).numel()), costs, budget, top)
    rng = np.random.default_rng(0)
    random_plans = [fill_to_size(list(rng.permutation(names)), costs, budget, top) for _ in range(args.random_plans)]
    by_sensitivity = sorted(names, key=lambda n: sens.predict({n: 8}) - sens.predict({n: 4}))
    reversed_plan = fill_to_size(by_sensitivity, costs, budget, top)

    evaluator = PlanEvaluator(graph, calib, heldout, QuantConfig(), stats, photos)
    rows = []
    contenders = [("uniform INT8 (reference, larger)", top), ("INT8, largest layers INT4 until it fits", largest_first),
                  ("ILP (exact per-group terms)", ilp_plan), ("ILP with every cross term", cross_plan),
                  ("reversed sensitivity", reversed_plan)]
    contenders += [(f"random plan {i + 1}", p) for i, p in enumerate(random_plans)]
    for label, plan in contenders:
        log(f"measuring {label}")
        m = evaluator.measure(plan)
        rows.append((label, plan, m))
        log(f"{label}: {agreement_cell(m)}")
    tried: list[FrontierPoint] = []
    if args.bisect_steps > 0:
        log(f"bisecting for the smallest plan within a {100 * args.max_drop:.1f}% drop")
        baseline = FrontierPoint({}, top, sens.predict(top), rows[0][2], all_costs(costs, top))
        problem_all = build_problem(graph, sens, costs, [4, 8], {"size": costs.total("size", top)})
        chosen, tried = bisect_max_drop(problem_all, sens, costs, evaluator, "size", args.max_drop, baseline,
                                        steps=args.bisect_steps, echo=log)
    # Per crop, the share of random plans that agree with FP32: its mean is their mean agreement, its bootstrap
    # over photos the interval of that mean.
    random_agrees = np.mean([evaluator.scores(p) for p in random_plans], axis=0)
    random_mean = float(np.mean(random_agrees))
    random_interval = bootstrap_interval(random_agrees, photos)
    differences = [
        ("ILP − INT8 with the largest layers INT4", evaluator.scores(ilp_plan), evaluator.scores(largest_first)),
        (f"ILP − mean of {args.random_plans} random plans", evaluator.scores(ilp_plan), random_agrees),
        ("ILP with every cross term − ILP", evaluator.scores(cross_plan), evaluator.scores(ilp_plan)),
    ]

    cpu, _ = cpu_info()
    lines = [
        f"# Benchmarks: {'MobileNetV2' if entry.name == 'mobilenet_v2' else entry.name} sensitivity and "
        "mixed-precision search", "",
        "Generated by `benchmarks/bench_search.py`; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpu}, {os.cpu_count()} logical CPUs, {args.threads} torch threads; 1-minute load average "
        f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end (other jobs included)",
        f"- Versions: lowbit {lowbit.__version__} ({lowbit_revision()}), torch {torch.__version__}",
        f"- Data: `zoo:{entry.name}` seed 0; sensitivity on {sens.samples} calibration crops; plans measured on "
        f"{len(heldout)} held-out {crops_of} (top-1 agreement with FP32, fake-quant "
        "executor, each plan quantized as `lowbit quantize` does: GPTQ weights, 8-bit activations)",
        "- Agreement: [low, high] is a bootstrap 95% interval that resamples photos (crops of one photo are "
        "correlated; 2000 resamples, seed 0); differences between plans are paired (same crops, same resamples). "
        f"Confident inputs: FP32 top-1/top-2 logit gap above {CONFIDENT_GAP}.", "",
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
        f"| plan | INT4 layers | weight size | top-1 agreement ({rows[0][2]['agreement']['top1']['samples']} crops) "
        f"| confident inputs ({rows[0][2]['agreement']['confident']['samples']} crops) | SQNR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, plan, m in rows:
        lines.append(f"| {label} | {sum(b == 4 for b in plan.values())} | {costs.total('size', plan) / 1e6:.3f} MB | "
                     f"{agreement_cell(m)} | {agreement_cell(m, 'confident')} | {m['sqnr_db']:.1f} dB |")
    lines += [f"| mean of {args.random_plans} random plans | | | {100 * random_mean:.1f}% "
              f"[{100 * random_interval.low:.1f}, {100 * random_interval.high:.1f}] | | |", "",
              "Paired differences of top-1 agreement (points, bootstrap 95% interval over photos):", ""]
    lines += [f"- {label}: {fmt_difference(a, b, photos)}" for label, a, b in differences]
    lines += ["", f"ILP solve time: {1000 * ilp_seconds:.0f} ms ({len(problem.groups)} choices).", ""]
    if tried:
        lines += bisection_lines(tried, chosen, rows[0][2]["top1_agreement"], args.max_drop, costs.total("size", top),
                                 lambda p: evaluator.drop(top, p.plan))
    write_section(args.out, "search", "\n".join(lines))
    log(f"wrote {args.out}")
    return 0


def agreement_cell(measured: dict, which: str = "top1") -> str:
    """'84.9% [79.2, 90.1] (163/192)' from a measured plan; `which`: "top1" or "confident"."""
    a = Agreement.from_json(measured["agreement"][which])
    return f"{a.short()} ({a.agree}/{a.samples})"


def fmt_difference(a: np.ndarray, b: np.ndarray, photos: np.ndarray) -> str:
    """Mean of per-crop `a` minus mean of `b`, in points, with a paired bootstrap interval over photos."""
    diff, interval = paired_difference(a, b, photos)
    return f"{100 * diff:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def bisection_lines(tried: list[FrontierPoint], chosen: FrontierPoint, base: float, max_drop: float,
                    uniform_size: float, drop_of: Callable[[FrontierPoint], dict[str, float]]) -> list[str]:
    """The bisection table; `drop_of(point)`: its paired drop from uniform INT8, with the interval."""
    lines = [f"## Bisection: smallest plan within a {100 * max_drop:.1f}% agreement drop from uniform INT8", "",
             "The band is applied to the measured drop; its paired bootstrap 95% interval shows how sure that is.", "",
             "| step | size budget | INT4 layers | top-1 agreement | confident inputs | drop (points) | within band |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for i, p in enumerate(tried):
        drop = base - p.measured["top1_agreement"]
        d = drop_of(p)
        lines.append(f"| {i + 1}{' (chosen)' if p is chosen else ''} | {p.budget['size'] / 1e6:.3f} MB | "
                     f"{p.bit_counts.get(4, 0)} | {agreement_cell(p.measured)} | "
                     f"{agreement_cell(p.measured, 'confident')} | {100 * drop:+.1f} [{100 * d['low']:+.1f}, "
                     f"{100 * d['high']:+.1f}] | {'yes' if drop <= max_drop + 1e-12 else 'no'} |")
    chosen_drop = drop_of(chosen)
    lines += ["", f"Chosen: {chosen.costs['size'] / 1e6:.3f} MB ({chosen.costs['size'] / uniform_size:.2f}× uniform "
              f"INT8), measured drop {100 * chosen_drop['value']:+.1f} points [{100 * chosen_drop['low']:+.1f}, "
              f"{100 * chosen_drop['high']:+.1f}].", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
