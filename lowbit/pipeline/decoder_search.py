"""`lowbit search zoo:smollm2_135m --size 80MB -o DIR`: a bit-width per block linear of a decoder under a model-size
budget (`search.decoder_search`), written as DIR/plan.json + report.md; `lowbit quantize MODEL --plan
DIR/plan.json` applies it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import LowbitError
from ..io import atomic_directory, write_json
from ..search.decoder_search import DECODER_BITS, decoder_options, measure_sensitivity, solve_plan
from ..search.search import parse_budget
from ..text.perplexity import DEFAULT_WINDOW
from .decoder import EMBEDDING_FORMAT, calibration_text, calibration_windows, load_decoder
from .progress import Progress

PLAN_KIND = "lowbit decoder weight plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
SENSITIVITY_WINDOWS = 4  # of 512 tokens: the Fisher and Hessians of every linear in one pass each


@dataclass(frozen=True)
class DecoderPlan:
    """Bits per block linear, the group size, and what the search predicted and counted."""

    model: str
    group: int
    bits: dict[str, int]
    model_bytes: float
    budget_bytes: float
    predicted_loss: float
    options: dict[str, Any]  # per linear: predicted loss and bytes at each bit-width

    def save(self, directory: Path, force: bool = False) -> Path:
        with atomic_directory(directory, force) as tmp:
            write_json(tmp / PLAN_FILE, {"kind": PLAN_KIND, "version": PLAN_VERSION, "model": self.model,
                                         "group": self.group, "bits": self.bits, "model_bytes": self.model_bytes,
                                         "budget_bytes": self.budget_bytes, "predicted_loss": self.predicted_loss,
                                         "options": self.options})
            counts = {b: sum(1 for v in self.bits.values() if v == b) for b in sorted(set(self.bits.values()))}
            (tmp / "report.md").write_text("\n".join([
                f"# {self.model}: mixed-precision weight plan (group {self.group})", "",
                f"- model size {self.model_bytes / 1e6:.2f} MB (budget {self.budget_bytes / 1e6:.2f} MB), "
                "embedding and float tensors included",
                "- linears per bit-width: " + ", ".join(f"int{b}: {n}" for b, n in counts.items()),
                f"- predicted loss increase (nats/token, second-order, round-to-nearest): {self.predicted_loss:.4f}",
                "", "| linear | bits |", "|---|---:|", *[f"| {k} | {v} |" for k, v in self.bits.items()], ""]))
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
    return DecoderPlan(str(data.get("model")), data["group"], bits, float(data.get("model_bytes", 0)),
                       float(data.get("budget_bytes", 0)), float(data.get("predicted_loss", 0)),
                       data.get("options", {}))


def search_decoder_model(model: str, size: str, bits: tuple[int, ...] = DECODER_BITS, group: int = 128,
                         calib: Path | None = None, progress: Progress | None = None) -> DecoderPlan:
    """The plan with the least predicted loss whose model size (block linears at their bits, the embedding as
    `lowbit quantize` stores it, float tensors) is within `size` ("80MB", or "0.6x" of every linear at max(bits))."""
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
    budget = parse_budget("size", size, fixed + options.nbytes.max(1).sum())  # "0.6x": of the widest plan
    smallest = fixed + options.nbytes.min(1).sum()
    if budget < smallest:
        raise LowbitError(f"--size {size}: {budget / 1e6:.2f} MB is below the smallest plan, {smallest / 1e6:.2f} MB "
                          f"(every linear at int{min(options.bits)}; the embedding and float tensors alone take "
                          f"{fixed / 1e6:.2f} MB)")
    with progress.stage("ILP"):
        plan = solve_plan(options, budget - fixed)
    names = {n: i for i, n in enumerate(options.names)}
    chosen = [(names[n], options.bits.index(b)) for n, b in plan.items()]
    table = {n: {f"int{b}": {"predicted_loss": float(options.loss[i, j]), "bytes": int(options.nbytes[i, j])}
                 for j, b in enumerate(options.bits)} for n, i in names.items()}
    return DecoderPlan(model, group, dict(plan),
                       float(fixed + sum(options.nbytes[i, j] for i, j in chosen)), float(budget),
                       float(np.sum([options.loss[i, j] for i, j in chosen])), table)
