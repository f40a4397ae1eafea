"""How precisely can Lee-50 tell two MiniLM quantizations apart? The noise floor of "Lee-50 within 0.01 of FP32".

Lee-50 scores a model by the Spearman correlation between its 1,225 document-pair cosines and human ratings.
A quantized model moves each document's embedding a little; this script measures how much the Spearman
difference with FP32 moves for reasons that have nothing to do with the quality of the quantizer:

1. **Calibration draws.** lowbit's default recipe (SmoothQuant auto, W8A8 integer-only) quantized from
   `--draws` different draws of its default-sized calibration text (the same corpus, `minilm_calibration_text`
   with seeds 0, 1, ...). Each model's Lee-50 difference and its mean document cosine with FP32.
2. **Random error of the same size.** Each FP32 document embedding turned by a random direction, so that its
   cosine with FP32 equals the cosine the seed-0 model gives that document; `--noise-draws` repetitions.
   This is the spread of the Lee-50 difference for an error of the measured size but no preferred direction.

Embeddings come from the integer reference executor (every lowbit backend gives its outputs bit for bit).

    python benchmarks/bench_lee50_noise.py [--draws 4] [--noise-draws 1000] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_minilm import lee50_difference
from sections import cpu_info, lowbit_revision, write_section

from lowbit.models.minilm import MINILM_CALIB_SIZE, minilm_calibration_text, minilm_l6
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference_batches
from lowbit.quantizer.smooth import smooth
from lowbit.text import read_lee50
from lowbit.text.corpora import Lee50
from lowbit.text.similarity import spearman

SEQ_LEN = 128


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lee50_rho(lee: Lee50, emb: np.ndarray) -> float:
    i, j, human = lee.pairs()
    u = unit(emb)
    return spearman((u[i] * u[j]).sum(1), human)


def turned(fp32: np.ndarray, cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each unit row of `fp32` turned by a uniformly random direction to the given cosine with itself."""
    base = unit(fp32)
    noise = rng.standard_normal(base.shape)
    noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the row
    c = cosines[:, None]
    return c * base + np.sqrt(1 - c * c) * unit(noise)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--draws", type=int, default=4, help="calibration draws (one quantization each)")
    parser.add_argument("--noise-draws", type=int, default=1000)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    encoder = minilm_l6(SEQ_LEN)
    lee = read_lee50()
    docs = encoder.tokenizer.encode(list(lee.documents))
    docs_data = {"input_ids": docs.input_ids, "attention_mask": docs.attention_mask}
    with torch.inference_mode():
        fp32 = encoder.model(torch.from_numpy(docs.input_ids), torch.from_numpy(docs.attention_mask)).double().numpy()
    graph = capture(torch.export.export(encoder.model, encoder.example_inputs(batch=1)), "minilm_l6")

    rows = []
    for seed in range(args.draws):
        text = minilm_calibration_text(seed)
        t = encoder.tokenizer.encode(text)
        calib = {"input_ids": t.input_ids, "attention_mask": t.attention_mask}
        smoothed, _ = smooth(graph, {k: torch.from_numpy(v) for k, v in calib.items()}, "auto")
        qgraph = quantize(smoothed, calib, QuantConfig(), BitPlan.uniform(smoothed, 8), log=lambda m: None)
        emb = run_reference_batches(qgraph, docs_data)[0][graph.outputs[0]].astype(np.float64)
        cosines = (unit(emb) * unit(fp32)).sum(1)
        diff, interval = lee50_difference(emb, fp32)
        rows.append((seed, cosines, diff, interval))
        log(f"calibration draw {seed}: Lee-50 difference {diff:+.4f} [{interval[0]:+.4f}, {interval[1]:+.4f}], "
            f"mean document cosine {cosines.mean():.4f}")

    rng = np.random.default_rng(0)
    fp32_rho = lee50_rho(lee, fp32)
    seed0_cosines = rows[0][1]
    noise = np.array([lee50_rho(lee, turned(fp32, seed0_cosines, rng)) - fp32_rho for _ in range(args.noise_draws)])
    diffs = np.array([r[2] for r in rows])

    lines = [
        "## MiniLM-L6: how precisely Lee-50 measures a quantized model (issue #13)",
        "",
        f"- Command: `python benchmarks/bench_lee50_noise.py --draws {args.draws} --noise-draws {args.noise_draws}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}; lowbit "
        f"{lowbit_revision()}; seq {SEQ_LEN}; {time.perf_counter() - started:.0f} s",
        f"- FP32 Lee-50 Spearman {fp32_rho:.4f} (1,225 document pairs of 50 documents). lowbit's default "
        "(SmoothQuant auto, W8A8 integer-only, integer reference executor), calibrated on "
        f"{MINILM_CALIB_SIZE} news sentences drawn with seeds 0..{args.draws - 1}. Intervals: 95% bootstrap "
        "over documents.",
        "",
        "| calibration draw | mean document cosine with FP32 | worst document | Lee-50 − FP32 |",
        "|---|---|---|---|",
    ]
    for seed, cosines, diff, (lo, hi) in rows:
        lines.append(f"| seed {seed} | {cosines.mean():.4f} | {cosines.min():.4f} | "
                     f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    lines += [
        "",
        f"- Across the {args.draws} calibration draws the Lee-50 difference ranges over "
        f"[{diffs.min():+.4f}, {diffs.max():+.4f}] (spread {diffs.max() - diffs.min():.4f}).",
        f"- A random turn of every document embedding to the cosine the seed-0 model gives it "
        f"({args.noise_draws} draws): Lee-50 difference mean {noise.mean():+.4f}, standard deviation "
        f"{noise.std():.4f}, 95% of draws in [{np.percentile(noise, 2.5):+.4f}, {np.percentile(noise, 97.5):+.4f}]; "
        f"{(np.abs(noise) > 0.01).mean():.0%} of them are more than 0.01 from FP32.",
    ]
    write_section(args.out, "minilm_lee50", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
