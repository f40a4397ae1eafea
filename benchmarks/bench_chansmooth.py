"""Per-channel SmoothQuant through GELU tables and post-LN LayerNorms (issue #13): simulated W8A8 MiniLM-L6.

    python benchmarks/bench_chansmooth.py [--calib 128] [--seq-len 128] [--method mse] [--ranges real all]
    python benchmarks/bench_chansmooth.py --integer [--smooth none auto]

Each row smooths some kinds of groups (`quantizer.smooth`, alpha "auto" per group), quantizes the float graph
with lowbit (W8A8, residual stream int16; `--method` activation ranges, mse by default as the recipe chooses
on MiniLM-L6, round-to-nearest weights) and runs its fake-quant simulation (`quantizer.simulate`: every tensor
rounded to its integer grid, float requantization). The kinds:

- context: attention context -> attention.output.dense, 1/s in the value linear's rows (what --smooth did);
- gelu: gelu -> output.dense, 1/s in gelu's per-channel tables;
- ln: LayerNorm -> q,k,v | intermediate.dense, 1/s in gamma and beta, s in the residual add's per-channel
  multiplier.

"table input per channel" also puts intermediate.dense's output (the gelu table's input) on a grid per
channel, with each channel's own range (a linear's requantizer is per output channel already): simulated only.
Activation ranges come from all calibration positions, padding included (what lowbit's calibration does), or
from real tokens only (`--ranges real`; padding never reaches the pooled embedding). Score: cosine of the
pooled embedding with FP32 on the 200 held-out sentences: mean, worst 1%, minimum.

--integer: the real thing instead of the simulation. lowbit's default quantization (recipe "auto") of the
graph smoothed as `--smooth` says, run by the integer reference executor on the held-out sentences (mean
cosine with its bootstrap interval, `lowbit.metrics.cosine_summary`), and `model.int.onnx` in ONNX Runtime
checked bit for bit against it on 16 of them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from lowbit.models.minilm import MINILM_CALIB_SIZE, minilm_calibration_text, minilm_heldout_text, minilm_l6
from lowbit.quantizer.calibrate import HIST_BINS, TensorStats
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize, scaled_tensors
from lowbit.quantizer.recipe import Recipe
from lowbit.quantizer.simulate import dequantized_params, fake_quantizers
from lowbit.quantizer.smooth import Group, SmoothPlan, apply_smoothing, plan_smoothing
from lowbit.text import cosine_agreement

BATCH = 32
Batches = list[dict[str, torch.Tensor]]


def tokens(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = encoder.tokenizer.encode(texts, warn=lambda _: None)
    return {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}


def split(inputs: dict[str, torch.Tensor]) -> Batches:
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + BATCH] for k, v in inputs.items()} for i in range(0, n, BATCH)]


def real_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[rows, last axis] of `t` at real tokens only (mask [B, S]): a [B, S, C] tensor, or [B, H, S, X] (heads, or
    attention scores by query); other shapes, and mask None, keep every row."""
    if mask is not None and t.ndim >= 3 and t.shape[0] == mask.shape[0]:
        m = mask.bool()
        if t.ndim == 3 and t.shape[1] == m.shape[1]:
            t = t[m]
        elif t.ndim == 4 and t.shape[2] == m.shape[1]:
            t = t.permute(0, 2, 1, 3)[m]
    return t.reshape(-1, t.shape[-1])


def position_stats(graph: Graph, batches: Batches, names: set[str], masked: bool) -> dict[str, TensorStats]:
    """`calibrate.collect_stats` over real tokens only (`masked`; as lowbit calibrates now), or over every
    position, padding included (as it did before)."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    mask: list[torch.Tensor | None] = [None]

    def observe_range(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in names:
            x = real_rows(t, mask[0])
            lo[name] = min(lo.get(name, np.inf), float(x.min()))
            hi[name] = max(hi.get(name, -np.inf), float(x.max()))
        return t

    hists = {}

    def observe_hist(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in names:
            top = max(abs(lo[name]), abs(hi[name]))
            h = hists.setdefault(name, np.zeros(HIST_BINS, dtype=np.int64))
            if top > 0:
                h += torch.histc(real_rows(t, mask[0]).abs().float(), HIST_BINS, 0.0, top).numpy().astype(np.int64)
        return t

    with torch.no_grad():
        for hook in (observe_range, observe_hist):
            for b in batches:
                mask[0] = b["attention_mask"] if masked else None
                run_graph(graph, b, hook)
    return {n: TensorStats(lo[n], hi[n], hists[n]) for n in lo}


class ChannelStats:
    """Per-channel min/max and histograms of |x| over the calibration batches (all positions, or real tokens
    only with `masked`): a range per channel, minmax or mse."""

    def __init__(self, graph: Graph, batches: Batches, names: set[str], masked: bool):
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}
        mask: list[torch.Tensor | None] = [None]

        def rows(name: str, t: torch.Tensor) -> torch.Tensor:
            return real_rows(t, mask[0]).double()

        def observe_range(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in names:
                x = rows(name, t)
                lo[name] = torch.minimum(lo.get(name, x.min(0).values), x.min(0).values)
                hi[name] = torch.maximum(hi.get(name, x.max(0).values), x.max(0).values)
            return t

        with torch.no_grad():
            for b in batches:
                mask[0] = b["attention_mask"] if masked else None
                run_graph(graph, b, observe_range)
        self.lo, self.hi = lo, hi
        top = {n: torch.maximum(lo[n].abs(), hi[n].abs()) for n in lo}  # per channel
        hist = {n: torch.zeros(len(top[n]) * HIST_BINS, dtype=torch.float64) for n in lo}

        def observe_hist(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in names:
                x = rows(name, t).abs()
                width = top[name].clamp_min(1e-30)
                idx = torch.clamp((x / width * HIST_BINS).long(), 0, HIST_BINS - 1)
                idx += torch.arange(x.shape[1]) * HIST_BINS
                hist[name].index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64))
            return t

        with torch.no_grad():
            for b in batches:
                mask[0] = b["attention_mask"] if masked else None
                run_graph(graph, b, observe_hist)
        self.top = top
        self.hist = {n: h.reshape(len(top[n]), HIST_BINS).numpy() for n, h in hist.items()}

    def channel_thresholds(self, name: str, method: str) -> torch.Tensor:
        """Per channel: max|x| (minmax), or the threshold `calibrate.clip_threshold`'s mse search picks from the
        channel's own histogram (the same candidates and error model, all channels at once)."""
        top = self.top[name]
        if method == "minmax":
            return top.clone()
        levels = 127 if float(self.lo[name].min()) < 0 else 255
        hist = torch.from_numpy(self.hist[name])
        k = torch.arange(HIST_BINS, dtype=torch.float64) + 0.5  # bin centers, in bins
        best, best_err = torch.full_like(top, HIST_BINS), torch.full_like(top, np.inf)
        for c in range(HIST_BINS, HIST_BINS // 64 - 1, -(HIST_BINS // 512)):  # from absmax downwards
            inside = k < c
            err = (hist[:, inside].sum(1) * (c / levels) ** 2 / 12.0
                   + (hist[:, ~inside] * (k[~inside] - c) ** 2).sum(1))
            better = err < best_err
            best, best_err = torch.where(better, float(c), best), torch.where(better, err, best_err)
        return best * top / HIST_BINS


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


def fold_kind(graph: Graph, group: Group) -> str:
    """context (into a linear's rows), ln (a LayerNorm, with residual adds rescaled), gelu (its tables)."""
    if group.fold is None:
        return ""
    if graph.node(group.fold.producer).op == "gelu":
        return "gelu"
    return "ln" if group.fold.rescaled else "context"


def integer_rows(graph: Graph, calib_t: dict[str, torch.Tensor], heldout: Batches, fp32: np.ndarray,
                 smooths: list[str], log: Callable[[str], None]) -> None:
    """Quantize (default config, recipe auto) with each --smooth, run the reference, check model.int.onnx."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from lowbit.codegen.onnx import export_integer
    from lowbit.metrics import cosine_summary
    from lowbit.quantizer.reference import run_reference
    from lowbit.quantizer.smooth import smooth

    calib_np = {k: v.numpy() for k, v in calib_t.items()}
    lines = []
    for alpha in smooths:
        g = graph if alpha == "none" else smooth(graph, calib_t, "auto" if alpha == "auto" else float(alpha))[0]
        start = time.perf_counter()
        qg = quantize(g, calib_np, QuantConfig(smooth="none"), log=log)
        log(f"--smooth {alpha}: quantized in {time.perf_counter() - start:.0f}s")
        batches = [{k: v.numpy() for k, v in b.items()} for b in heldout]
        emb = np.concatenate([run_reference(qg, b)[g.outputs[0]] for b in batches])
        summary = cosine_summary(fp32, emb)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.int.onnx"
            export_integer(qg, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            check = {k: v[:16] for k, v in batches[0].items()}
            want = run_reference(qg, check, integer_outputs=True)
            got = dict(zip(qg.int_outputs, session.run(qg.int_outputs, check), strict=True))
            exact = all(np.array_equal(got[n], want[n]) for n in qg.int_outputs)
        low, high = summary["interval"]
        lines.append(f"| --smooth {alpha} | {summary['mean']:.4f} [{low:.4f}, {high:.4f}] | "
                     f"{summary['worst_1pct']:.4f} | {summary['min']:.4f} | {'bit-exact' if exact else 'DIFFERS'} |")
        log(lines[-1])
    print("\n| integer reference, W8A8 | held-out cosine [95% bootstrap] | worst 1% | min | model.int.onnx (16) |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=MINILM_CALIB_SIZE)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", choices=("mse", "minmax", "percentile"), default="mse",
                        help="activation range method (mse: what the recipe chooses on MiniLM-L6)")
    parser.add_argument("--rows", nargs="+", choices=("none", "context", "gelu", "ln", "both", "table"),
                        default=["none", "context", "gelu", "ln", "both", "table"], help="simulated rows to run")
    parser.add_argument("--integer", action="store_true", help="quantize for real and run the reference executor")
    parser.add_argument("--smooth", nargs="+", default=["none", "auto"], help="with --integer: none, auto or alpha")
    parser.add_argument("--ranges", nargs="+", choices=("real", "all"), default=["real", "all"],
                        help="activation statistics over real tokens only, or all positions (padding included)")
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
    if args.integer:
        integer_rows(graph, calib_t, heldout, fp32, args.smooth, log)
        return
    config = QuantConfig(calib_method=args.method, rounding="nearest")  # mse: what "auto" chooses on MiniLM-L6
    recipe = Recipe.fixed(graph, config)
    plan = plan_smoothing(graph, calib_t, "auto")
    log("plan_smoothing auto done")
    print(plan.report.table(), flush=True)
    kinds = {g.tensor: fold_kind(graph, g) for g in plan.groups}
    results = []

    def row(name: str, kind_set: set[str], masked: bool, table_input: bool = False) -> None:
        where = "real tokens" if masked else "all positions"
        subset = SmoothPlan(plan.groups, {t: s for t, s in plan.scales.items() if kinds[t] in kind_set}, plan.report)
        g = apply_smoothing(graph, subset)
        stats = position_stats(g, calib, scaled_tensors(g), masked)
        qg = quantize(g, calib_np, config, stats=stats, recipe=recipe)
        quant = fake_quantizers(qg)
        if table_input:  # intermediate.dense's output on a grid per channel (its own range, same method)
            inter = {n.name for n in g.nodes if n.op == "linear" and n.name.endswith("intermediate.dense")}
            per_channel = ChannelStats(g, calib, inter, masked)
            for n in inter:
                quant[n] = grid(per_channel.channel_thresholds(n, args.method).float() / 127, True)
        a = cosine_agreement(fp32, embed(g, heldout, quant, *dequantized_params(qg)))
        results.append((f"{name}, {args.method} ranges on {where}", a.mean, a.worst_1pct, a.minimum))
        log(f"| {results[-1][0]} | {a.mean:.4f} | {a.worst_1pct:.4f} | {a.minimum:.4f} |")

    rows = {"none": ("none (default)", set(), False), "context": ("auto today (context folds)", {"context"}, False),
            "gelu": ("+ gelu per-channel tables", {"context", "gelu"}, False),
            "ln": ("+ LayerNorm / residual-add rescale", {"context", "ln"}, False),
            "both": ("+ both", {"context", "gelu", "ln"}, False),
            "table": ("+ both + table input per channel", {"context", "gelu", "ln"}, True)}
    for masked in (r == "real" for r in args.ranges):
        for key in args.rows:
            name, kind_set, table_input = rows[key]
            row(name, kind_set, masked, table_input)

    print("\n| simulated W8A8 | mean cosine | worst 1% | min |\n|---|---|---|---|")
    for name, mean, worst, low in results:
        print(f"| {name} | {mean:.4f} | {worst:.4f} | {low:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
