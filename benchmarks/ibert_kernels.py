"""Benchmark: the I-BERT integer kernels (softmax, LayerNorm) on real MiniLM-L6 tensors, against the float ops.

Runs MiniLM-L6 (seq 128) in float on held-out sentences of different lengths, keeps the float input of every
softmax (the attention scores, with the Q and K that made them) and every layer_norm, quantizes them as a lowering
would, runs the integer kernels and prints a markdown table of errors per layer:

- softmax, probabilities: `kernel` is the error against the float softmax of the dequantized scores (what the
  kernel itself adds), `total` against the float softmax of the float scores (quantizing the input included).
  Inputs: int8 scores (per-tensor scale max|x| / 127), or the int32 accumulator of Q.K^T with Q and K int8
  (per-tensor), scale s_q s_k alpha. Each for lowbit's kernel (cubic exp, and the quadratic) and I-BERT's
  published kernel (its constants and code path, in float64 floors).
- layer_norm, in output steps (int8 out, per-tensor scale max|y| / 127): inputs int8 or int16 (per-tensor);
  lowbit's kernel and I-BERT's published one (rounded mean, isqrt of the sum of squares, 2^31 // std).
  Masked (padding) rows are excluded from every statistic.

    OMP_NUM_THREADS=1 python benchmarks/ibert_kernels.py [--sentences 16]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from lowbit.ir.ops.layer_norm import integer_layer_norm
from lowbit.ir.ops.softmax import integer_softmax
from lowbit.models.minilm import minilm_l6
from lowbit.quantizer.capture import capture
from lowbit.quantizer.graph import run_graph
from lowbit.text.corpora import heldout_sentences

SHORT = ["Dogs bark.", "A man is playing a guitar.", "It rained all day in the city, so the match was cancelled."]


def ibert_softmax(q: np.ndarray, scale: float, keep: np.ndarray) -> np.ndarray:
    """I-BERT's published IntSoftmax (Kim et al. 2021, its reference code: x0 = -0.6931, n = 30, exp coefficients
    0.35815147, 0.96963238, 1), output_bit 8, in float64 floors; masked keys are dropped exactly, as here."""
    x = q.astype(np.float64)
    x = x - np.where(keep, x, -np.inf).max(-1, keepdims=True)
    x0 = math.floor(-0.6931 / scale)
    x = np.maximum(x, 30 * x0)
    z = np.floor(x / x0)
    r = x - x0 * z
    a, b, c = 0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147
    b_int, c_int = math.floor(b / scale), math.floor(c / scale ** 2)
    e = (r + b_int) * r + c_int
    e = np.maximum(np.floor(e * 2.0 ** (30 - z)), 0) * keep
    # Its 16-bit QuantAct on exp (scale 1/32767 for exp's range [0, 1]), then the 2^32 // sum normalization.
    e = np.clip(np.round(e * a * scale ** 2 / 2.0 ** 30 * 32767), 0, 32767)
    factor = np.floor(2.0 ** 32 / e.sum(-1, keepdims=True))
    return np.floor(e * factor / 2.0 ** 24) / 256.0  # scale 2^-8 (a certain key reads 256)


def ibert_layer_norm(q: np.ndarray, gamma: np.ndarray, beta: np.ndarray, in_scale: float,
                     out_scale: float) -> np.ndarray:
    """I-BERT's published IntLayerNorm (rounded mean, 10 Newton steps from 2^16, 2^31 // std), then int8 out."""
    x = q.astype(np.float64)
    n = x.shape[-1]
    y = x - np.round(x.mean(-1, keepdims=True))
    var = (y * y).sum(-1, keepdims=True)
    k = np.full(var.shape, 2.0 ** 16)
    for _ in range(10):
        k = np.floor((k + np.floor(var / k)) / 2)
    factor = np.floor((2.0 ** 31 - 1) / np.maximum(k, 1))
    y = np.floor(y * factor / 2)
    s = math.sqrt(n) / 2.0 ** 30
    y = y + np.floor(beta / gamma / s)
    return np.clip(np.round(y * s * gamma / out_scale), -128, 127)


def _collect(sentences: list[str]) -> tuple[dict, list, list, np.ndarray]:
    encoder = minilm_l6(seq_len=128)
    graph = capture(torch.export.export(encoder.model, encoder.example_inputs(batch=2)), "minilm_l6")
    tokens = encoder.tokenizer.encode(sentences)
    softmaxes = [n for n in graph.nodes if n.op == "softmax"]
    norms = [n for n in graph.nodes if n.op == "layer_norm"]
    by_name = {n.name: n for n in graph.nodes}
    wanted = {n.inputs[0] for n in softmaxes + norms}
    wanted |= {i for s in softmaxes for i in by_name[s.inputs[0]].inputs}  # Q and K^T of each score matmul
    seen: dict[str, np.ndarray] = {}

    def keep(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in wanted:
            seen[name] = t.double().numpy()
        return t

    run_graph(graph, {"input_ids": torch.from_numpy(tokens.input_ids),
                      "attention_mask": torch.from_numpy(tokens.attention_mask)}, keep)
    lns = [(n, graph.params[f"{n.name}.weight"].double().numpy(), graph.params[f"{n.name}.bias"].double().numpy())
           for n in norms]
    sms = [(n, by_name[n.inputs[0]]) for n in softmaxes]
    return seen, sms, lns, tokens.attention_mask


def _stats(err: np.ndarray) -> str:
    return f"{err.max():.4f} / {err.mean():.5f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=16)
    args = parser.parse_args()
    sentences = SHORT + heldout_sentences(args.sentences - len(SHORT))
    seen, sms, lns, mask = _collect(sentences)
    lengths = mask.sum(1)
    print(f"MiniLM-L6, seq 128, {len(sentences)} sentences of {lengths.min()}..{lengths.max()} tokens.\n")

    print("### softmax: |p - float softmax|, max / mean over unmasked query rows (probability units)\n")
    cols = ["int8 lowbit k", "int8 lowbit t", "int8 quad k", "int8 I-BERT k", "int8 I-BERT t",
            "int32 lowbit k", "int32 lowbit t", "int32 quad t", "int32 I-BERT k", "int32 I-BERT t", "int32 u16 t",
            "row sum u8", "row sum u16"]
    print("| layer | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    rows = mask[:, None, :, None].astype(bool)  # [B, 1, S(query), 1]: a padded query row is excluded
    keep = np.broadcast_to(mask[:, None, None, :] != 0, (mask.shape[0], 1, 1, mask.shape[1]))
    worst: dict[str, float] = {}
    for i, (node, scores_node) in enumerate(sms):
        x = seen[node.inputs[0]]
        bias = (1.0 - mask)[:, None, None, :] * -10000.0
        want = torch.softmax(torch.tensor(x + bias), -1).numpy()
        s8 = np.abs(x).max() / 127
        q8 = np.round(x / s8).astype(np.int8)
        a, b = seen[scores_node.inputs[0]], seen[scores_node.inputs[1]]
        sa, sb = np.abs(a).max() / 127, np.abs(b).max() / 127
        acc = np.matmul(np.round(a / sa).astype(np.int64), np.round(b / sb).astype(np.int64))
        s32 = sa * sb * scores_node.attrs["alpha"]
        k_mask = np.broadcast_to(keep, x.shape)
        out = []
        for q, s in ((q8, s8), (acc.astype(np.int32), s32)):
            deq = torch.softmax(torch.tensor(q * s + bias), -1).numpy()
            ours = integer_softmax(q, s, mask)[0] / 255.0
            quad = integer_softmax(q, s, mask, degree=2)[0] / 255.0
            pub = ibert_softmax(q, s, k_mask)
            results = {"lowbit k": ours - deq, "lowbit t": ours - want, "quad k": quad - deq, "quad t": quad - want,
                       "I-BERT k": pub - deq, "I-BERT t": pub - want}
            p16, s16 = integer_softmax(q, s, mask, out_bits=16)
            results.update({"u16 t": p16 * s16 - want, "sum u8": ours.sum(-1, keepdims=True) - 1.0,
                            "sum u16": (p16.astype(np.float64) * s16).sum(-1, keepdims=True) - 1.0})
            out.append({k: np.abs(v)[np.broadcast_to(rows, v.shape)] for k, v in results.items()})
        cells = [out[0]["lowbit k"], out[0]["lowbit t"], out[0]["quad k"], out[0]["I-BERT k"], out[0]["I-BERT t"],
                 out[1]["lowbit k"], out[1]["lowbit t"], out[1]["quad t"], out[1]["I-BERT k"], out[1]["I-BERT t"],
                 out[1]["u16 t"], out[1]["sum u8"], out[1]["sum u16"]]
        for c, v in zip(cols, cells, strict=True):
            worst[c] = max(worst.get(c, 0.0), float(v.max()))
        print(f"| {i} | " + " | ".join(_stats(v) for v in cells) + " |")
    print("| all (max) | " + " | ".join(f"{worst[c]:.4f}" for c in cols) + " |")
    print("\nk: against the float softmax of the dequantized scores (the kernel's own error); t: against the float "
          "scores (input quantization included). quad: lowbit's kernel with I-BERT's polynomial order (2). u16: uint16 "
          "probabilities (scale 1/65535). row sum: |sum of a row's probabilities - 1|, int32 scores.\n")

    print("### layer_norm: |out - float LN| in int8 output steps, max / mean over unmasked tokens\n")
    cols = ["int8 lowbit k", "int8 lowbit t", "int8 I-BERT k", "int16 lowbit k", "int16 lowbit t", "int16 I-BERT k"]
    print("| layer | max abs input / median | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    tok = mask.astype(bool)
    for node, gamma, beta in lns:
        x = seen[node.inputs[0]]
        eps = node.attrs["eps"]
        want = torch.nn.functional.layer_norm(torch.tensor(x), (x.shape[-1],), torch.tensor(gamma),
                                              torch.tensor(beta), eps).numpy()
        out_scale = np.abs(want[tok]).max() / 127
        want_q = np.clip(want / out_scale, -128, 127)
        cells = []
        for bits, dtype in ((8, np.int8), (16, np.int16)):
            s = np.abs(x).max() / (2 ** (bits - 1) - 1)
            q = np.round(x / s).astype(dtype)
            deq = np.clip(torch.nn.functional.layer_norm(torch.tensor(q * s), (x.shape[-1],), torch.tensor(gamma),
                                                         torch.tensor(beta), eps).numpy() / out_scale, -128, 127)
            ours = integer_layer_norm(q, gamma, beta, eps, s, out_scale).astype(np.float64)
            pub = ibert_layer_norm(q, gamma, beta, s, out_scale)
            cells += [np.abs(ours - deq)[tok], np.abs(ours - want_q)[tok], np.abs(pub - deq)[tok]]
        ratio = np.abs(x[tok]).max() / np.median(np.abs(x[tok]))
        print(f"| {node.name} | {ratio:.0f} | " + " | ".join(_stats(v) for v in cells) + " |")
    print("\nk: against the float LN of the dequantized input (the kernel's own error, output rounding included: "
          "0.5 at best); t: against the float LN of the float input. I-BERT's int8 errors come from its rounded "
          "mean and above all its 10 Newton steps from 2^16, which do not reach sqrt(sum y^2) for the rows whose "
          "spread is under an int8 step (most tokens, beside the outlier channels).")


if __name__ == "__main__":
    main()
