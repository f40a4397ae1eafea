"""Benchmark: do the inter-layer (cross) Hessian terms help, measured on data the Hessian never saw?

Writes the cross_terms section of BENCHMARKS.md. Two questions, both answered out of sample:

1. Ranking. Random INT4/INT8 weight plans in strata: the same number of INT4 layers
   (plans differ only in which layers), or the same weight size (filled to a budget
   in a random layer order). Each plan's loss increase (KL to FP32, weights rounded,
   activations float) is measured on the held-out and in-domain sets, never on the
   calibration samples the Hessian was built from, and ranked against five predictions:
   every cross term, the exact diagonal blocks, HAWQ-V3's trace estimate, the INT4
   count and the size. Spearman overall and within strata, with 95% intervals from a
   bootstrap that resamples photos (the measured loss) and plans within strata.
2. Fronts. At several size budgets the ILP is solved for each objective (diagonal,
   every cross term linearized exactly, trace), and each plan is quantized as
   `lowbit quantize` does and scored by top-1 agreement with FP32, with paired intervals.

    python benchmarks/bench_cross_terms.py [--out BENCHMARKS.md]

A smoke run in a few minutes, to another file:

    python benchmarks/bench_cross_terms.py --model zoo:small_cnn --per-stratum 4 --budgets 0.7 --out /tmp/c.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_search import fill_to_size
from scipy.stats import rankdata
from sections import cpu_info, lowbit_revision, write_section

import lowbit
from lowbit.metrics import BOOTSTRAP_RESAMPLES, paired_difference
from lowbit.models import foolbox_imagenet_crops, get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.graph import Graph, forward
from lowbit.quantizer.quantize import calibrate, quantize
from lowbit.quantizer.simulate import fake_quantizers
from lowbit.search.costs import layer_costs
from lowbit.search.ilp import OBJECTIVES
from lowbit.search.search import PlanEvaluator, build_problem, plan_for_budget
from lowbit.sensitivity.analyze import SensitivityConfig, WeightErrors, compute_sensitivity
from lowbit.sensitivity.hessian import float_activations

PREDICTORS = {
    "cross": "½ δᵀHδ, every inter-layer term",
    "diagonal": "exact per-layer blocks only",
    "trace": "HAWQ-V3 trace, ½ Σ Tr(H_i)/n_i ‖ΔW_i‖²",
    "count": "number of INT4 layers",
    "size": "weight bytes saved",
}
BATCH = 32
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


class HeldoutLoss:
    """Per-sample KL(FP32 ‖ plan) of weight plans (rounded as `errors` says, activations float) on data `x`."""

    def __init__(self, graph: Graph, x: np.ndarray, errors: WeightErrors):
        self.graph, self.errors = graph, errors
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.reference = self._logits({})

    @torch.no_grad()
    def _logits(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.graph.outputs[0]
        return torch.cat([forward(self.graph, self.x[i:i + BATCH], weights=weights)[out].double()
                          for i in range(0, len(self.x), BATCH)])

    def __call__(self, plan: dict[str, int]) -> np.ndarray:
        weights = {name: self.graph.weight(name) + self.errors(name, bits) for name, bits in plan.items()}
        log_p = F.log_softmax(self.reference, -1)
        return (log_p.exp() * (log_p - F.log_softmax(self._logits(weights), -1))).sum(-1).numpy()


def stratified_plans(names: list[str], costs, counts: list[int], fractions: list[float], per: int,
                     seed: int) -> tuple[list[dict[str, int]], list[str]]:
    """`per` plans with each INT4 count (layers drawn uniformly), and `per` filled to each size fraction of INT8."""
    rng = np.random.default_rng(seed)
    top = {name: 8 for name in names}
    plans, strata = [], []
    for k in counts:
        for _ in range(per):
            low = set(rng.choice(len(names), size=k, replace=False).tolist())
            plans.append({name: 4 if i in low else 8 for i, name in enumerate(names)})
            strata.append(f"{k} INT4 layers")
    budget_of = costs.total("size", top)
    for f in fractions:
        for _ in range(per):
            plans.append(fill_to_size(list(rng.permutation(names)), costs, f * budget_of, top))
            strata.append(f"size {f:.2f}× INT8")
    return plans, strata


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of `a` and `b` along the last axis (rows of a batch); 0 where either is constant."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    norm = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    return np.where(norm > 0, (ra * rb).sum(-1) / np.where(norm > 0, norm, 1.0), 0.0)


def ranking_statistics(predicted: dict[str, np.ndarray], loss: np.ndarray, strata: np.ndarray, photos: np.ndarray,
                       resamples: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per predictor, Spearman with the measured mean loss: "overall" and per stratum family ("count", "size":
    the mean over that family's strata). Index 0 is the estimate, the rest are bootstrap resamples of photos
    (the loss's samples) and of plans within each stratum."""
    rng = np.random.default_rng(seed)
    unique_photos, photo_of = np.unique(photos, return_inverse=True)
    labels = sorted(set(strata))
    members = {s: np.flatnonzero(strata == s) for s in labels}
    families = {"count": [s for s in labels if "INT4" in s], "size": [s for s in labels if s.startswith("size")]}
    out = {name: {"overall": [], **{f: [] for f in families if families[f]}} for name in predicted}
    for r in range(resamples + 1):
        if r == 0:
            weights, index = np.ones(len(unique_photos)), {s: m for s, m in members.items()}
        else:
            weights = np.bincount(rng.integers(len(unique_photos), size=len(unique_photos)),
                                  minlength=len(unique_photos)).astype(float)
            index = {s: rng.choice(m, size=len(m)) for s, m in members.items()}
        per_sample = weights[photo_of]
        measured = loss @ per_sample / per_sample.sum()
        every = np.concatenate([index[s] for s in labels])
        for name, values in predicted.items():
            out[name]["overall"].append(float(spearman_rows(values[every], measured[every])))
            for family, member_strata in families.items():
                if member_strata:
                    rows = np.stack([index[s] for s in member_strata])
                    out[name][family].append(float(spearman_rows(values[rows], measured[rows]).mean()))
    return {name: {k: np.array(v) for k, v in stats.items()} for name, stats in out.items()}


def interval_text(draws: np.ndarray, signed: bool = False) -> str:
    low, high = np.percentile(draws[1:], [2.5, 97.5])
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(draws[0])} [{fmt.format(low)}, {fmt.format(high)}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--model", default="zoo:mobilenet_v2")
    parser.add_argument("--per-stratum", type=int, default=24, help="random plans per stratum")
    parser.add_argument("--counts", default="4,8,13,20,27", help="INT4-layer counts of the count strata")
    parser.add_argument("--size-strata", default="0.6,0.7,0.8,0.9", help="size fractions of the size strata")
    parser.add_argument("--budgets", default="0.6,0.65,0.7,0.8,0.9", help="size budgets of the fronts (× INT8)")
    parser.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"],
                        help="the weight errors δ the Hessian terms and the measured losses share")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    entry = get_zoo_entry(args.model)
    graph = capture(load_program(f"zoo:{entry.name}", None), entry.name)
    names = [n.name for n in graph.layers]
    calib = entry.calibration(0)
    sets = {"held-out": (entry.heldout(0), entry.heldout_photos(0) if entry.heldout_photos
                         else np.arange(len(entry.heldout(0))))}
    if entry.name == "mobilenet_v2":
        sets["in-domain crops"] = foolbox_imagenet_crops(10, 0)
    log("calibrating")
    stats = calibrate(graph, calib)
    quantizers = fake_quantizers(quantize(graph, calib, QuantConfig(rounding="nearest"), stats=stats))
    config = SensitivityConfig(rounding=args.rounding)
    xs = torch.from_numpy(np.ascontiguousarray(calib[:config.samples], dtype=np.float32))
    errors = WeightErrors(graph, float_activations(graph, xs), config.weight_method, config.rounding)
    log("sensitivity")
    sens = compute_sensitivity(graph, calib, quantizers, config, errors=errors, log=log)

    costs = layer_costs(graph, [4, 8])
    plans, strata = stratified_plans(names, costs, [int(k) for k in args.counts.split(",")],
                                     [float(f) for f in args.size_strata.split(",")], args.per_stratum, seed=0)
    strata = np.array(strata)
    predicted = {model: np.array([sens.predict(p, model) for p in plans]) for model in ("cross", "diagonal", "trace")}
    predicted["count"] = np.array([sum(b == 4 for b in p.values()) for p in plans], dtype=float)
    predicted["size"] = -np.array([costs.total("size", p) for p in plans])
    losses = {}
    probes = {label: HeldoutLoss(graph, x, errors) for label, (x, _) in sets.items()}
    for label, probe in probes.items():
        rows = []
        for i, plan in enumerate(plans):
            rows.append(probe(plan))
            if (i + 1) % 20 == 0 or i + 1 == len(plans):
                log(f"{label}: measured loss of plan {i + 1}/{len(plans)}")
        losses[label] = np.stack(rows)
    ranking = {label: ranking_statistics(predicted, losses[label], strata, sets[label][1], args.resamples)
               for label in sets}

    log("fronts")
    x_all = np.concatenate([x for x, _ in sets.values()])
    photos_all = np.concatenate([p + 10_000 * i for i, (_, p) in enumerate(sets.values())])
    evaluator = PlanEvaluator(graph, calib, x_all, QuantConfig(), stats, photos_all)
    offsets = np.cumsum([0, *[len(x) for x, _ in sets.values()]])
    top = {name: 8 for name in names}
    uniform_size = costs.total("size", top)
    fronts = []
    for fraction in [float(f) for f in args.budgets.split(",")]:
        for objective in OBJECTIVES:
            problem = build_problem(graph, sens, costs, [4, 8], {"size": fraction * uniform_size}, True, objective)
            t0 = time.perf_counter()
            plan = plan_for_budget(problem).bits
            solve_s = time.perf_counter() - t0
            agrees = evaluator.scores(plan)
            fronts.append({"fraction": fraction, "objective": objective, "plan": plan, "solve_s": solve_s,
                           "agrees": agrees, "size": costs.total("size", plan),
                           "predicted": {m: sens.predict(plan, m) for m in ("cross", "diagonal", "trace")},
                           "weight_kl": {label: float(probe(plan).mean()) for label, probe in probes.items()}})
            log(f"size {fraction:.2f}×, {objective}: {sum(b == 4 for b in plan.values())} INT4 layers, agreement "
                + ", ".join(f"{label} {100 * agrees[offsets[i]:offsets[i + 1]].mean():.1f}%"
                            for i, label in enumerate(sets)))
    lines = render(args, command, load_start, entry.name, sens, plans, strata, sets, ranking, fronts, offsets,
                   evaluator.scores(top), uniform_size)
    write_section(args.out, "cross_terms", "\n".join(lines))
    log(f"wrote {args.out}")
    return 0


def render(args, command: str, load_start: float, model: str, sens, plans, strata, sets, ranking, fronts, offsets,
           uniform_agrees: np.ndarray, uniform_size: float) -> list[str]:
    cpu, _ = cpu_info()
    labels = list(sets)
    lines = [
        f"# Do the inter-layer terms help? Out-of-sample test on `zoo:{model}`", "",
        "Generated by `benchmarks/bench_cross_terms.py`; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {args.threads} threads; "
        f"load {load_start:.2f} at start; lowbit {lowbit.__version__} ({lowbit_revision()})",
        f"- Hessian terms built from {sens.samples} calibration samples; every loss and agreement below is measured "
        "on other data: " + "; ".join(f"{label}: {len(x)} samples of {len(np.unique(p))} photos"
                                      for label, (x, p) in sets.items()),
        f"- Weight errors δ: {args.rounding} rounding (the same δ for predictions and measurements); measured loss: "
        "mean KL(FP32 ‖ plan) with the weights rounded and activations float, which is what the predictions model",
        f"- {len(plans)} random INT4/INT8 plans in {len(set(strata))} strata of {args.per_stratum}: "
        + ", ".join(dict.fromkeys(strata)) + ". Intervals: 95% percentile bootstrap, "
        f"{args.resamples} resamples of photos and of plans within strata; a difference's interval is paired.", "",
        "## Ranking: Spearman of predicted against measured loss", "",
        "Within strata: the mean of the per-stratum correlations (INT4-count strata: plans differ only in which "
        "layers are INT4; size strata: plans of the same size).", "",
        "| prediction | " + " | ".join(f"{label}: {family}" for label in labels
                                      for family in ("overall", "same INT4 count", "same size")) + " |",
        "|---|" + "---:|" * (3 * len(labels)),
    ]
    for name, description in PREDICTORS.items():
        cells = [interval_text(ranking[label][name][family]) for label in labels for family in ("overall", "count",
                                                                                                 "size")]
        lines.append(f"| {description} | " + " | ".join(cells) + " |")
    cells = [interval_text(ranking[label]["cross"][family] - ranking[label]["diagonal"][family], signed=True)
             for label in labels for family in ("overall", "count", "size")]
    lines += ["| **cross − diagonal** | " + " | ".join(cells) + " |", ""]

    lines += ["## Fronts: the ILP's plan under each objective, quantized and measured", "",
              "Each plan quantized as `lowbit quantize` does (auto recipe, 8-bit activations), top-1 agreement with "
              "FP32; weight-only KL is the measured loss the objectives predict. Differences are paired over the "
              f"same crops, bootstrap over photos. Uniform INT8 ({uniform_size / 1e6:.3f} MB): "
              + ", ".join(f"{label} {100 * uniform_agrees[offsets[i]:offsets[i + 1]].mean():.1f}%"
                          for i, label in enumerate(labels)) + ".", "",
              "| size budget | objective | INT4 layers | weight size | solve | "
              + " | ".join(f"agreement, {label} | weight-only KL, {label}" for label in labels)
              + " | " + " | ".join(f"− diagonal, {label} (points)" for label in labels) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * (3 * len(labels))]
    by_key = {(f["fraction"], f["objective"]): f for f in fronts}
    photos = np.concatenate([p + 10_000 * i for i, (_, p) in enumerate(sets.values())])
    for f in fronts:
        base = by_key[f["fraction"], "diagonal"]
        cells = []
        for i, label in enumerate(labels):
            part = slice(offsets[i], offsets[i + 1])
            cells.append(f"{100 * f['agrees'][part].mean():.1f}% | {f['weight_kl'][label]:.4f}")
        diffs = []
        for i, _ in enumerate(labels):
            part = slice(offsets[i], offsets[i + 1])
            if f["objective"] == "diagonal":
                diffs.append("")
                continue
            d, ci = paired_difference(f["agrees"][part], base["agrees"][part], photos[part])
            diffs.append(f"{100 * d:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]")
        lines.append(f"| {f['fraction']:.2f}× | {f['objective']} | {sum(b == 4 for b in f['plan'].values())} | "
                     f"{f['size'] / 1e6:.3f} MB | {1000 * f['solve_s']:.0f} ms | " + " | ".join(cells) + " | "
                     + " | ".join(diffs) + " |")
    lines.append("")
    for objective in OBJECTIVES:
        if objective == "diagonal":
            continue
        pooled = []
        for i, label in enumerate(labels):
            part = slice(offsets[i], offsets[i + 1])
            a = np.mean([f["agrees"][part] for f in fronts if f["objective"] == objective], axis=0)
            b = np.mean([f["agrees"][part] for f in fronts if f["objective"] == "diagonal"], axis=0)
            d, ci = paired_difference(a, b, photos[part])
            pooled.append(f"{label} {100 * d:+.1f} points [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]")
        lines.append(f"- {objective} − diagonal, mean over the {len(fronts) // len(OBJECTIVES)} budgets: "
                     + "; ".join(pooled))
    return lines


if __name__ == "__main__":
    sys.exit(main())
