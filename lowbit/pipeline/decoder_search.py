"""`lowbit search zoo:smollm2_135m --size 80MB -o DIR` (or `--latency 0.8x`, or both): a bit-width per block
linear of a decoder under a model-size and/or decode-latency budget (`search.decoder_search`), written as
DIR/plan.json + report.md; `lowbit quantize MODEL --plan DIR/plan.json` applies it.

With a latency budget, each linear's decode GEMV is compiled and timed with TVM on this CPU at every bit-width
(`codegen.tvm.linear_latency`), and the search also writes a frontier (frontier.json, frontier.png): the plans
of `FRONTIER_POINTS` latency budgets from the fastest to the slowest plan, each rounded to nearest (seconds; GPTQ,
which `lowbit quantize` runs, lowers every point's loss similarly) and its perplexity measured on the first
`FRONTIER_WINDOWS` windows of each evaluation text."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..io import atomic_directory, write_json
from ..models.llama import LoadedDecoder, decoder_logits_fn
from ..models.zoo import ZOO_PREFIX, get_zoo_entry
from ..quantizer.weight_only import WeightOnlyConfig
from ..search.decoder_search import (
    DECODER_BITS,
    DecoderOptions,
    decoder_options,
    measure_sensitivity,
    plan_totals,
    solve_plan,
)
from ..search.search import parse_budget
from ..text.perplexity import DEFAULT_WINDOW, perplexity
from .decoder import (
    DEFAULT_TEXTS_FROM,
    EMBEDDING_FORMAT,
    calibration_text,
    calibration_windows,
    leading_tokens,
    load_decoder,
    round_decoder,
)
from .progress import Progress

PLAN_KIND = "lowbit decoder weight plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
SENSITIVITY_WINDOWS = 4  # of 512 tokens: the Fisher and Hessians of every linear in one pass each
FRONTIER_POINTS = 5
FRONTIER_WINDOWS = 2  # per evaluation text: a frontier point costs a rounding and 4 forward passes


@dataclass(frozen=True)
class DecoderPlan:
    """Bits per block linear, the group size, and what the search predicted and counted."""

    model: str
    group: int
    bits: dict[str, int]
    model_bytes: float
    budget_bytes: float
    predicted_loss: float
    options: dict[str, Any]  # per linear: predicted loss, bytes (and decode latency) at each bit-width
    latency_s: float | None = None  # the block linears' decode GEMVs, summed, where measured
    budget_latency_s: float | None = None
    frontier: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # measured plans, fastest first

    def save(self, directory: Path, force: bool = False) -> Path:
        with atomic_directory(directory, force) as tmp:
            write_json(tmp / PLAN_FILE, {"kind": PLAN_KIND, "version": PLAN_VERSION, "model": self.model,
                                         "group": self.group, "bits": self.bits, "model_bytes": self.model_bytes,
                                         "budget_bytes": self.budget_bytes, "predicted_loss": self.predicted_loss,
                                         "latency_s": self.latency_s, "budget_latency_s": self.budget_latency_s,
                                         "options": self.options})
            counts = {b: sum(1 for v in self.bits.values() if v == b) for b in sorted(set(self.bits.values()))}
            lines = [f"# {self.model}: mixed-precision weight plan (group {self.group})", "",
                     f"- model size {self.model_bytes / 1e6:.2f} MB (budget {self.budget_bytes / 1e6:.2f} MB), "
                     "embedding and float tensors included",
                     "- linears per bit-width: " + ", ".join(f"int{b}: {n}" for b, n in counts.items()),
                     f"- predicted loss increase (nats/token, second-order, round-to-nearest): "
                     f"{self.predicted_loss:.4f}"]
            if self.latency_s is not None:
                lines.append(f"- block linears' decode GEMVs: {self.latency_s * 1e3:.3f} ms per token (budget "
                             f"{self.budget_latency_s * 1e3:.3f} ms), TVM kernels timed one at a time on this CPU")
            if self.frontier:
                write_json(tmp / "frontier.json", {"model": self.model, "group": self.group, "points": self.frontier})
                frontier_plot(self.frontier, tmp / "frontier.png", self.model)
                lines += frontier_markdown(self.frontier)
            lines += ["", "| linear | bits |", "|---|---:|", *[f"| {k} | {v} |" for k, v in self.bits.items()], ""]
            (tmp / "report.md").write_text("\n".join(lines))
        return directory


def read_decoder_plan(path: Path) -> DecoderPlan:
    """A plan.json written by `lowbit search` for a decoder; a LowbitError says what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read the plan: {e}") from e
    if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
        raise LowbitError(f"{path}: not a decoder weight plan; write one with `lowbit search MODEL --size ... -o DIR`")
    if data.get("version") != PLAN_VERSION:
        raise LowbitError(f"{path}: plan version {data.get('version')!r}; this lowbit reads {PLAN_VERSION}")
    bits = data.get("bits")
    if not isinstance(bits, dict) or not all(isinstance(v, int) for v in bits.values()) or not isinstance(
            data.get("group"), int):
        raise LowbitError(f"{path}: the plan's bits (linear -> integer) or group is malformed")
    latency, budget_latency = data.get("latency_s"), data.get("budget_latency_s")
    return DecoderPlan(str(data.get("model")), data["group"], bits, float(data.get("model_bytes", 0)),
                       float(data.get("budget_bytes", 0)), float(data.get("predicted_loss", 0)),
                       data.get("options", {}), None if latency is None else float(latency),
                       None if budget_latency is None else float(budget_latency))


def search_decoder_model(model: str, size: str | None = None, bits: tuple[int, ...] = DECODER_BITS,
                         group: int = 128, calib: Path | None = None, progress: Progress | None = None,
                         latency: str | None = None, target: str = "llvm -mcpu=native") -> DecoderPlan:
    """The plan with the least predicted loss whose model size (block linears at their bits, the embedding as
    `lowbit quantize` stores it, float tensors) is within `size` ("80MB", or "0.6x" of every linear at max(bits))
    and whose block linears' decode latency on `target` is within `latency` ("2ms", or "0.8x" of every linear at
    max(bits)); a latency budget also measures the frontier (module docstring)."""
    if size is None and latency is None:
        raise LowbitError("give a budget: --size (e.g. 80MB or 0.6x) and/or --latency (e.g. 0.8x or 3ms)")
    progress = progress or Progress()
    with progress.stage("load"):
        loaded = load_decoder(model)
    net, tokenizer = loaded
    linears = {name: m for name, m in net.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)}
    embedding = EMBEDDING_FORMAT.round(net.embed_tokens.weight.detach(), None).nbytes
    fixed = embedding + 4 * sum(p.numel() for n, p in net.named_parameters()
                                if n != "embed_tokens.weight" and n.removesuffix(".weight") not in linears)
    window = min(DEFAULT_WINDOW, net.config.context_length)
    samples = calibration_windows(tokenizer, calibration_text(model, calib), window=window)[:SENSITIVITY_WINDOWS]
    with progress.stage("sensitivity"), progress.steps_of("sensitivity") as log:
        sensitivity = measure_sensitivity(net, linears, samples, log)
    with progress.stage("options"):
        options = decoder_options(linears, sensitivity, group, bits)
    budgets: dict[str, float] = {}
    if size is not None:
        budget = parse_budget("size", size, fixed + options.nbytes.max(1).sum())  # "0.6x": of the widest plan
        smallest = fixed + options.nbytes.min(1).sum()
        if budget < smallest:
            raise LowbitError(f"--size {size}: {budget / 1e6:.2f} MB is below the smallest plan, "
                              f"{smallest / 1e6:.2f} MB (every linear at int{min(options.bits)}; the embedding and "
                              f"float tensors alone take {fixed / 1e6:.2f} MB)")
        budgets["size"] = budget - fixed
    if latency is not None:
        with progress.stage("latency"), progress.steps_of("latency") as log:
            options = options.with_latency(linear_latency_table(linears, options.bits, group, target, log))
        widest = options.latency[:, options.bits.index(max(options.bits))].sum()  # "0.8x": of every linear there
        budgets["latency"] = parse_budget("latency", latency, widest)
    with progress.stage("ILP"):
        plan = solve_plan(options, budgets)
    totals = plan_totals(options, plan)
    frontier = []
    if latency is not None:
        with progress.stage("frontier"), progress.steps_of("frontier") as log:
            frontier = measure_frontier(loaded, options, {**budgets}, plan, group, model, log)
    table = {n: {f"int{b}": {"predicted_loss": float(options.loss[i, j]), "bytes": int(options.nbytes[i, j]),
                             **({} if options.latency is None else {"latency_s": float(options.latency[i, j])})}
                 for j, b in enumerate(options.bits)} for i, n in enumerate(options.names)}
    return DecoderPlan(model, group, dict(plan), fixed + totals["bytes"],
                       fixed + budgets.get("size", options.nbytes.max(1).sum()), totals["predicted_loss"], table,
                       totals.get("latency_s"), budgets.get("latency"), frontier)


def linear_latency_table(linears: dict[str, nn.Linear], bits: tuple[int, ...], group: int, target: str,
                         log: Callable[[str], object]) -> np.ndarray:
    """Seconds per decode step (M = 1) of each linear's TVM GEMV at each of `bits` [linears, bits], each distinct
    shape and format compiled and timed once."""
    from ..codegen.tvm.linear_latency import measure_linear_latency

    shapes = sorted({(lin.in_features, lin.out_features) for lin in linears.values()})
    log(f"timing {len(shapes)} GEMV shapes x {len(bits)} bit-widths on {target}")
    measured = measure_linear_latency(shapes, [(b, group) for b in bits], target)
    return np.array([[measured[(lin.in_features, lin.out_features, b, group)] for b in bits]
                     for lin in linears.values()])


def measure_frontier(loaded: LoadedDecoder, options: DecoderOptions, budgets: dict[str, float],
                     chosen: dict[str, int], group: int, model: str, log: Callable[[str], object]) -> list[dict]:
    """The plans of FRONTIER_POINTS latency budgets from the fastest plan (within the other budgets) to the slowest,
    and the chosen one: each rounded to nearest and its perplexity measured (module docstring)."""
    assert options.latency is not None
    net, tokenizer = loaded
    zoo_texts = get_zoo_entry(model if model.startswith(ZOO_PREFIX) else DEFAULT_TEXTS_FROM).decoder.evaluation
    window = min(DEFAULT_WINDOW, net.config.context_length)
    texts = {name: leading_tokens(tokenizer, text(), FRONTIER_WINDOWS * window) for name, text in zoo_texts.items()}
    others = {m: b for m, b in budgets.items() if m != "latency"}
    slowest = plan_totals(options, solve_plan(options, {**others, "latency": 1e9}))  # least loss within the others
    low = options.latency.min(1).sum()
    plans = [chosen]
    for f in np.linspace(0, 1, FRONTIER_POINTS):
        try:
            plans.append(solve_plan(options, {**others, "latency": low + f * (slowest["latency_s"] - low)}))
        except LowbitError:  # the fastest budgets may not fit the other budgets together
            log(f"frontier: no plan at {100 * f:.0f}% of the latency range within the other budgets")
    points: list[dict] = []
    for n, plan in enumerate(plans):
        if any(p["bits"] == plan for p in points):
            continue
        log(f"frontier plan {n + 1}/{len(plans)}: round to nearest, perplexity on {FRONTIER_WINDOWS} windows per text")
        quantized = copy.deepcopy(net)
        round_decoder(quantized, tokenizer, WeightOnlyConfig(group=group, rounding="rtn", plan=tuple(plan.items())),
                      "")
        with torch.inference_mode():
            ppl = {name: perplexity(decoder_logits_fn(quantized), ids, window, FRONTIER_WINDOWS).perplexity
                   for name, ids in texts.items()}
        points.append({**plan_totals(options, plan), "perplexity": ppl, "chosen": plan == chosen, "bits": plan})
    return sorted(points, key=lambda p: p["latency_s"])


def frontier_markdown(points: list[dict]) -> list[str]:
    texts = list(points[0]["perplexity"])
    lines = ["", f"## Frontier: perplexity (round to nearest, first {FRONTIER_WINDOWS} windows per text) against "
             "the block linears' decode latency", "",
             "| latency ms | size MB (linears) | predicted loss | " + " | ".join(f"{t} PPL" for t in texts)
             + " | int3/int4/int8 linears | chosen |", "|---:|---:|---:|" + "---:|" * len(texts) + "---|---|"]
    for p in points:
        counts = "/".join(str(sum(1 for b in p["bits"].values() if b == k)) for k in (3, 4, 8))
        lines.append(f"| {p['latency_s'] * 1e3:.3f} | {p['bytes'] / 1e6:.1f} | {p['predicted_loss']:.4f} | "
                     + " | ".join(f"{p['perplexity'][t]:.2f}" for t in texts) + f" | {counts} | "
                     + ("yes" if p["chosen"] else "") + " |")
    return lines


def frontier_plot(points: list[dict], path: Path, model: str) -> None:
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for text in points[0]["perplexity"]:
        xs, ys = [p["latency_s"] * 1e3 for p in points], [p["perplexity"][text] for p in points]
        ax.plot(xs, ys, marker="o", label=text)
        chosen = [(x, y) for x, y, p in zip(xs, ys, points, strict=True) if p["chosen"]]
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), s=160, facecolors="none", edgecolors="tab:red", linewidths=2)
    ax.set_xlabel("block linears' decode GEMVs per token (ms, TVM on this CPU)")
    ax.set_ylabel(f"perplexity, round to nearest (first {FRONTIER_WINDOWS} windows)")
    ax.set_title(f"{model}: mixed precision frontier (chosen plan circled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
