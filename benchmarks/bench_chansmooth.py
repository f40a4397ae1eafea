"""Per-channel smoothing through GELU tables and post-LN LayerNorms (issue #13), measured in fake-quant simulation.

    python benchmarks/bench_chansmooth.py [--calib 128] [--seq-len 128] [--threads 1]

The integer model is lowbit's default for MiniLM-L6 (W8A8, residual stream int16; mse activation ranges and
round-to-nearest weights, what the recipe chooses). Its fake-quant simulation (`lowbit.quantizer.simulate`)
rounds every tensor to its grid. On top of it, per smoothed tensor X with SmoothQuant scales s (smooth.py,
alpha "auto"):

- gelu -> output.dense: a per-channel table writes gelu(x)/s_j on one per-tensor grid, output.dense's weight
  columns take s. Simulated as X rounded on the per-channel grid step*s_j, weights Q(W*s)/s.
- LayerNorm -> q,k,v | intermediate.dense + residual add: gamma and beta over s, the linears' columns times s,
  and the add multiplies that input by s_j. The same per-channel grid; the add reads the same integers.
- "table input per channel": intermediate.dense's output (the gelu table's input) on a grid per channel
  (the linear's requantizer is per output channel already), range per channel.

The per-tensor grid of X/s is chosen as lowbit chooses ranges (`clip_threshold`, over all calibration
positions, padding included) with the method named in the row. Score: cosine of the pooled embedding with
FP32 on the 200 held-out sentences, mean and worst 1%.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from lowbit.models.minilm import MINILM_CALIB_SIZE, minilm_calibration_text, minilm_heldout_text, minilm_l6
from lowbit.quantizer.calibrate import HIST_BINS, TensorStats, _mse_threshold, clip_threshold, round_weight
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.simulate import dequantized_params, fake_quantizers
from lowbit.quantizer.smooth import SmoothPlan, apply_smoothing, plan_smoothing
from lowbit.text import cosine_agreement

BATCH = 32
Batches = list[dict[str, torch.Tensor]]


def tokens(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = encoder.tokenizer.encode(texts, warn=lambda _: None)
    return {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}


def split(inputs: dict[str, torch.Tensor]) -> Batches:
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + BATCH] for k, v in inputs.items()} for i in range(0, n, BATCH)]


class ChannelStats:
    """Per-channel min/max and histograms of |x / s| over the calibration batches (all positions)."""

    def __init__(self, graph: Graph, batches: Batches, divisors: dict[str, torch.Tensor]):
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}

        def rows(name: str, t: torch.Tensor) -> torch.Tensor:
            return (t / divisors[name]).reshape(-1, t.shape[-1]).double()

        def observe_range(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in divisors:
                x = rows(name, t)
                lo[name] = torch.minimum(lo.get(name, x.min(0).values), x.min(0).values)
                hi[name] = torch.maximum(hi.get(name, x.max(0).values), x.max(0).values)
            return t

        with torch.no_grad():
            for b in batches:
                run_graph(graph, b, observe_range)
        self.lo, self.hi = lo, hi
        top = {n: torch.maximum(lo[n].abs(), hi[n].abs()) for n in lo}  # per channel
        hist = {n: torch.zeros(len(top[n]) * HIST_BINS, dtype=torch.float64) for n in lo}

        def observe_hist(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in divisors:
                x = rows(name, t).abs()
                width = top[name].clamp_min(1e-30)
                idx = torch.clamp((x / width * HIST_BINS).long(), 0, HIST_BINS - 1)
                idx += torch.arange(x.shape[1]) * HIST_BINS
                hist[name].index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64))
            return t

        with torch.no_grad():
            for b in batches:
                run_graph(graph, b, observe_hist)
        self.top = top
        self.hist = {n: h.reshape(len(top[n]), HIST_BINS).numpy() for n, h in hist.items()}

    def tensor_stats(self, name: str) -> TensorStats:
        """The per-tensor statistics of x/s (the channels' histograms merged onto one bin grid)."""
        top = float(self.top[name].max())
        merged = np.zeros(HIST_BINS)
        for j, h in enumerate(self.hist[name]):
            width = float(self.top[name][j])
            if width == 0:
                continue
            centers = (np.arange(HIST_BINS) + 0.5) * width / HIST_BINS
            merged += np.bincount(np.minimum((centers / top * HIST_BINS).astype(int), HIST_BINS - 1), h,
                                  HIST_BINS)
        return TensorStats(float(self.lo[name].min()), float(self.hi[name].max()), merged)

    def channel_thresholds(self, name: str, method: str) -> torch.Tensor:
        if method == "minmax":
            return self.top[name].clone()
        levels = 127 if float(self.lo[name].min()) < 0 else 255
        out = [(_mse_threshold(h, np.linspace(0, float(t), HIST_BINS + 1), levels) if t > 0 else 0.0)
               for h, t in zip(self.hist[name], self.top[name].tolist(), strict=True)]
        return torch.tensor(out, dtype=torch.float64)


def grid(step: torch.Tensor | float, signed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    lo, hi = (-127, 127) if signed else (0, 255)
    step = torch.as_tensor(step, dtype=torch.float32).clamp_min(1e-12)
    return lambda t: torch.clamp(torch.round(t / step), lo, hi) * step


@torch.no_grad()
def embed(graph: Graph, batches: Batches, quant: dict[str, Callable], weights: dict[str, torch.Tensor],
          biases: dict[str, torch.Tensor]) -> np.ndarray:
    def hook(name: str, t: torch.Tensor) -> torch.Tensor:
        fq = quant.get(name)
        return fq(t) if fq else t

    return torch.cat([run_graph(graph, b, hook, weights, biases)[graph.outputs[0]] for b in batches]).numpy()


def group_kind(reason: str) -> str:
    return "ln" if reason.startswith("also read by add") else "gelu" if "gelu" in reason else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=MINILM_CALIB_SIZE)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    encoder = minilm_l6(args.seq_len)
    graph = capture(torch.export.export(encoder.model, encoder.example_inputs(batch=2)), "minilm_l6")
    calib_t = tokens(encoder, minilm_calibration_text()[:args.calib])
    calib_np = {k: v.numpy() for k, v in calib_t.items()}
    calib = split(calib_t)
    heldout = split(tokens(encoder, minilm_heldout_text()))
    fp32 = embed(graph, heldout, {}, {}, {})
    config = QuantConfig(calib_method="mse", rounding="nearest")  # what "auto" chooses on MiniLM-L6
    plan = plan_smoothing(graph, calib_t, "auto")
    log("plan_smoothing auto done")
    print(plan.report.table(), flush=True)
    ctx = apply_smoothing(graph, plan)

    results = []

    def row(name: str, g: Graph, quant: dict, weights: dict, biases: dict) -> None:
        a = cosine_agreement(fp32, embed(g, heldout, quant, weights, biases))
        results.append((name, a.mean, a.worst_1pct, a.minimum))
        log(f"| {name} | {a.mean:.4f} | {a.worst_1pct:.4f} | {a.minimum:.4f} |")

    bases = {}
    for name, g in (("none", graph), ("auto (context folds)", ctx)):
        qg = quantize(g, calib_np, config)
        w, b = dequantized_params(qg)
        bases[name] = (g, fake_quantizers(qg), w, b)
        log(f"quantized {name}")
        row(f"{name}: default", g, bases[name][1], w, b)

    g, quant0, w0, b0 = bases["auto (context folds)"]
    scales = {gr.tensor: plan.scales[gr.tensor] for gr in plan.groups
              if gr.fold is None and gr.tensor in plan.scales}
    kinds = {gr.tensor: group_kind(gr.reason) for gr in plan.groups if gr.tensor in scales}
    readers = {t: [n.name for n in g.consumers(t) if n.op == "linear"] for t in scales}
    inter = [n.name for n in g.nodes if n.op == "linear" and n.name.endswith("intermediate.dense")]
    ones = {n: torch.ones(g.node(n).shape[-1]) for n in inter}
    ones.update({t: torch.ones(len(s)) for t, s in scales.items()})
    st_plain = ChannelStats(g, calib, ones)  # unsmoothed, per channel
    st_smooth = ChannelStats(g, calib, {t: s.float() for t, s in scales.items()})
    log("channel statistics done")

    def variant(name: str, kind_set: set[str], method: str = "mse", table_input: str | None = None) -> None:
        quant, weights = dict(quant0), dict(w0)
        for t, s in scales.items():
            if kinds[t] not in kind_set:
                continue
            stats = st_smooth.tensor_stats(t)
            signed = not stats.nonnegative
            thr = clip_threshold(stats, method, signed)
            quant[t] = grid(thr / (127 if signed else 255) * s.float(), signed)
            for layer in readers[t]:
                w_int, w_scale = round_weight(g.weight(layer) * s.float(), 8, config.weight_method)
                weights[layer] = w_int * w_scale[:, None] / s.float()
        if table_input:
            for n in inter:
                quant[n] = grid(st_plain.channel_thresholds(n, table_input).float() / 127, True)
        row(name, g, quant, weights, b0)

    variant("auto + gelu per-channel tables", {"gelu"})
    variant("auto + LN per-channel (add rescale)", {"ln"})
    variant("auto + both", {"gelu", "ln"})
    variant("auto + both, minmax ranges for the smoothed tensors", {"gelu", "ln"}, "minmax")
    variant("auto + both + table input per channel (minmax)", {"gelu", "ln"}, table_input="minmax")
    variant("auto + both + table input per channel (mse)", {"gelu", "ln"}, table_input="mse")
    variant("auto + table input per channel (mse) alone", set(), table_input="mse")

    print("\n| simulated W8A8 | mean cosine | worst 1% | min |\n|---|---|---|---|")
    for name, mean, worst, low in results:
        print(f"| {name} | {mean:.4f} | {worst:.4f} | {low:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
