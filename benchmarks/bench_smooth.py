"""SmoothQuant on MiniLM-L6 under simulated W8A8: held-out embedding cosine with FP32, for none / 0.5 / auto.

    python benchmarks/bench_smooth.py [--calib 128] [--seq-len 128] [--threads 2]

The simulation (fake-quant in float torch): each linear's input is rounded to int8 per tensor, with the
min/max range of that tensor on the calibration tokens (symmetric, as lowbit calibrates), and each weight to
int8 per output channel. Nothing else is rounded: residual adds, attention matmuls, softmax, LayerNorm and
GELU stay float. The score is the cosine of the pooled embedding (before normalization) with FP32 on the 200
held-out sentences: mean and the mean of the worst 1% (`lowbit.text.cosine_agreement`).

Rows:
- none, 0.5, auto: `smooth()` folded into the graph. In post-LN BERT only the attention context
  (A.V -> attention.output.dense) folds exactly (into the value linear's rows).
- "+ post-LN groups": what the residual-add rescale proposal would add. The LayerNorm -> q/k/v and
  LayerNorm -> intermediate.dense groups are smoothed virtually: X/s is quantized at those linears' inputs
  and W*s per channel, while the residual add reads X itself.
- "+ gelu groups": gelu -> output.dense smoothed the same way, which no exact fold allows: a bound only.
- "gelu outputs at int16": instead, those tensors at 16 bits (lowbit's BitPlan can already ask for that).

It prints the 0.5 and auto reports (outlier ratio max/median of per-channel max|X| and the per-group W8A8 error,
before -> after), then the table. Padding tokens are left out of every statistic and range.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from lowbit.models.minilm import MINILM_CALIB_SIZE, TextEncoder, minilm_calibration_text, minilm_heldout_text, minilm_l6
from lowbit.quantizer.capture import capture
from lowbit.quantizer.graph import Graph, run_graph, run_node
from lowbit.quantizer.smooth import (
    SmoothPlan,
    apply_smoothing,
    plan_smoothing,
    quantize_activation,
    quantize_weight,
    token_mask,
    token_rows,
)
from lowbit.text import cosine_agreement

BATCH = 50


def linear_input_ranges(graph: Graph, inputs: dict[str, torch.Tensor],
                        virtual: dict[str, torch.Tensor]) -> dict[str, tuple[float, bool]]:
    """Per tensor a linear reads: (max|X/s|, X >= 0) over the real calibration tokens (s = 1 unless virtual)."""
    wanted = {n.inputs[0] for n in graph.nodes if n.op == "linear"}
    mask = token_mask(graph, inputs)
    ranges = {}

    def observe(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in wanted:
            x = token_rows(t, mask) / virtual.get(name, 1.0)
            ranges[name] = (float(x.abs().max()), bool(x.min() >= 0))
        return t

    run_graph(graph, inputs, on_output=observe)
    return ranges


@torch.no_grad()
def simulate(graph: Graph, inputs: dict[str, torch.Tensor], ranges: dict[str, tuple[float, bool]],
             weights: dict[str, torch.Tensor], virtual: dict[str, torch.Tensor], wide: set[str]) -> torch.Tensor:
    """The graph output with int8 fake-quant at every linear input (X/s where virtually smoothed; int16 for the
    tensors in `wide`)."""
    last_use = graph.last_uses()
    env: dict[str, torch.Tensor] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "input":
            out = inputs[node.name]
        elif node.op == "linear":
            x, s = env[node.inputs[0]], virtual.get(node.inputs[0])
            absmax, nonnegative = ranges[node.inputs[0]]
            bits = 16 if node.inputs[0] in wide else 8
            xq = quantize_activation(x if s is None else x / s, absmax, nonnegative, bits)
            out = run_node(graph, node, [xq if s is None else xq * s], weight=weights[node.name])
        else:
            out = run_node(graph, node, [env[n] for n in node.inputs])
        env[node.name] = out
        for name in node.inputs:
            if last_use[name] == i and name not in graph.outputs:
                del env[name]
    return env[graph.outputs[0]]


def fake_quant_weights(graph: Graph, virtual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 per-channel weights; a virtually smoothed linear's is Q(W*s)/s, so that (Q(X/s)*s)(Q(W*s)/s)^T =
    Q(X/s) Q(W*s)^T, what the folded form computes."""
    out = {}
    for node in graph.layers:
        w, s = graph.weight(node.name), virtual.get(node.inputs[0])
        out[node.name] = quantize_weight(w) if s is None else quantize_weight(w * s) / s
    return out


def virtual_scales(plan: SmoothPlan, kinds: set[str]) -> dict[str, torch.Tensor]:
    """The scales of the groups that did not fold, of the kinds asked: "post-LN" (a residual add also reads X)
    and "gelu"."""
    out = {}
    for group in plan.groups:
        s = plan.scales.get(group.tensor)
        kind = "post-LN" if group.reason.startswith("also read by add") else "gelu" if "gelu" in group.reason else ""
        if group.fold is None and s is not None and kind in kinds:
            out[group.tensor] = s
    return out


def gelu_outputs(graph: Graph) -> set[str]:
    return {n.name for n in graph.nodes if n.op == "gelu"}


def tokens(encoder: TextEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = encoder.tokenizer.encode(texts, warn=lambda _: None)  # the few cut at seq_len are cut alike everywhere
    return {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}


def split(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + BATCH] for k, v in inputs.items()} for i in range(0, n, BATCH)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=MINILM_CALIB_SIZE, help="calibration sentences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # The graph is captured at the longest text's length instead of --seq-len when that is shorter: padding is
    # masked (zero weight in attention and pooling), so the embeddings are the same up to float rounding and
    # the simulation runs several times faster.
    encoder = minilm_l6(args.seq_len)
    texts = minilm_calibration_text()[:args.calib] + minilm_heldout_text()
    longest = int(encoder.tokenizer.encode(texts, warn=lambda _: None).attention_mask.sum(1).max())
    if longest < args.seq_len:
        encoder = minilm_l6(longest)
    print(f"graph captured at seq {encoder.seq_len} (--seq-len {args.seq_len}, longest text {longest} tokens)")
    graph = capture(torch.export.export(encoder.model, encoder.example_inputs(batch=2)), "minilm_l6")
    calib = tokens(encoder, minilm_calibration_text()[:args.calib])  # one batch: statistics over all of it
    heldout = split(tokens(encoder, minilm_heldout_text()))
    fp32 = torch.cat([run_graph(graph, b)[graph.outputs[0]] for b in heldout]).numpy()

    plans = {}
    for alpha in (0.5, "auto"):
        start = time.perf_counter()
        plans[alpha] = plan_smoothing(graph, calib, alpha)
        print(f"plan_smoothing(alpha={alpha}) on {args.calib} sentences at seq {encoder.seq_len}: "
              f"{time.perf_counter() - start:.1f} s ({args.threads} threads)", flush=True)
    for plan in plans.values():
        print(plan.report.table(), flush=True)

    # (name, graph, virtually smoothed tensors, tensors kept at int16)
    rows = [("none", graph, {}, set()), ("none, gelu outputs at int16", graph, {}, gelu_outputs(graph))]
    for alpha, plan in plans.items():
        smoothed = apply_smoothing(graph, plan)
        kept = torch.cat([run_graph(smoothed, b)[smoothed.outputs[0]] for b in heldout]).numpy()
        print(f"alpha={alpha}: smoothed FP32 vs FP32 max |diff| {np.abs(kept - fp32).max():.2e} "
              f"(embedding max {np.abs(fp32).max():.2f})")
        post_ln = virtual_scales(plan, {"post-LN"})
        rows += [(f"{alpha}", smoothed, {}, set()),
                 (f"{alpha} + post-LN groups (add rescale proposal, simulated)", smoothed, post_ln, set()),
                 (f"{alpha} + post-LN groups, gelu outputs at int16", smoothed, post_ln, gelu_outputs(graph)),
                 (f"{alpha} + gelu groups (no exact fold: a bound)", smoothed, virtual_scales(plan, {"gelu"}), set()),
                 (f"{alpha} + post-LN + gelu groups (no exact fold: a bound)", smoothed,
                  virtual_scales(plan, {"post-LN", "gelu"}), set())]

    print(f"\nsimulated W8A8 (int8 per-tensor min/max at linear inputs, int8 per-channel weights), "
          f"{len(fp32)} held-out sentences, cosine with FP32")
    print("| smoothing | mean cosine | worst 1% | min |")
    print("|---|---|---|---|")
    for name, g, virtual, wide in rows:
        ranges = linear_input_ranges(g, calib, virtual)
        weights = fake_quant_weights(g, virtual)
        emb = torch.cat([simulate(g, b, ranges, weights, virtual, wide) for b in heldout]).numpy()
        agreement = cosine_agreement(fp32, emb)
        print(f"| {name} | {agreement.mean:.4f} | {agreement.worst_1pct:.4f} | {agreement.minimum:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
