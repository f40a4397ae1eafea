"""SmolLM2-135M weight-only quantization: perplexity and size per setting (issue #14's table, first part).

Every setting starts from the same float32 model (the GGUF's Q4_1/Q8_0 weights, dequantized: "FP32" means those
weights) and is rounded by `lowbit.pipeline.decoder.round_decoder`, as `lowbit quantize` does: the block linears
group-wise by the setting, the tied embedding / LM head to int8 g32. Perplexity on the first `--windows`
non-overlapping 512-token windows of each evaluation text (gensim's Lee news, the enwiki sample), with the paired
ratio to FP32 and its 95% bootstrap interval over windows. Sizes count packed values, zero points and float32
scales, and for VQ packed indices, int8 codebooks and their scales. Writes the smollm2_weights section of
BENCHMARKS.md.

    python benchmarks/bench_smollm2_weights.py [--windows 8] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from sections import cpu_info, lowbit_revision, write_section

from lowbit.ir.weight_formats import n_weights
from lowbit.models.llama import decoder_logits_fn
from lowbit.models.zoo import get_zoo_entry
from lowbit.pipeline.decoder import (
    EMBEDDING,
    EMBEDDING_FORMAT,
    calibration_windows,
    leading_tokens,
    paired_ratio,
    round_decoder,
)
from lowbit.pipeline.decoder_search import read_decoder_plan
from lowbit.quantizer.vq import VQ_PRESETS
from lowbit.quantizer.weight_only import WeightOnlyConfig
from lowbit.text.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity

# In order of interest: a run cut short still records the first rows (the section is rewritten after each).
SETTINGS: dict[str, WeightOnlyConfig | None] = {
    "FP32 (dequantized GGUF)": None,
    "INT4 g128 RTN": WeightOnlyConfig(bits=4, group=128, rounding="rtn"),
    "INT4 g128 GPTQ act-order": WeightOnlyConfig(bits=4, group=128, rounding="gptq", act_order=True),
    "W8 g128 RTN": WeightOnlyConfig(bits=8, group=128, rounding="rtn"),
    "INT3 g128 RTN": WeightOnlyConfig(bits=3, group=128, rounding="rtn"),
    "INT3 g128 GPTQ act-order": WeightOnlyConfig(bits=3, group=128, rounding="gptq", act_order=True),
    "INT4 g128 GPTQ": WeightOnlyConfig(bits=4, group=128, rounding="gptq"),
    "W8 g128 GPTQ act-order": WeightOnlyConfig(bits=8, group=128, rounding="gptq", act_order=True),
    "INT4 g128 GPTQ act-order + smoothing": WeightOnlyConfig(bits=4, group=128, smooth=True),
    "INT4 g128 RTN + smoothing": WeightOnlyConfig(bits=4, group=128, rounding="rtn", smooth=True),
    "INT4 g32 float-min RTN": WeightOnlyConfig(bits=4, group=32, rounding="rtn", float_minimum=True),
    "INT4 g128 float-min RTN": WeightOnlyConfig(bits=4, group=128, rounding="rtn", float_minimum=True),
    "INT4 g32 RTN": WeightOnlyConfig(bits=4, group=32, rounding="rtn"),
    "INT3 g128 GPTQ act-order + smoothing": WeightOnlyConfig(bits=3, group=128, smooth=True),
    # Issue #14's VQ bar: vq2 against INT2 (RTN, GPTQ) at the same or a larger size, vq3 against INT3.
    "VQ2 (v4 k256) GPTQ act-order": WeightOnlyConfig(vq=VQ_PRESETS["vq2"], rounding="gptq", act_order=True),
    "VQ3 (v4 k256 + residual k16) GPTQ act-order": WeightOnlyConfig(vq=VQ_PRESETS["vq3"], rounding="gptq",
                                                                   act_order=True),
    "INT2 g128 RTN": WeightOnlyConfig(bits=2, group=128, rounding="rtn"),
    "INT2 g128 GPTQ act-order": WeightOnlyConfig(bits=2, group=128, rounding="gptq", act_order=True),
    # Issue #14's W8A8 mode against weight-only with the same weights (ZeroQuant-V2: activations are the sensitive
    # part): int8 per output channel, activations int8 per token at run time.
    "W8 per-channel RTN": WeightOnlyConfig(bits=8, group=0, rounding="rtn"),
    "W8A8 per-channel RTN": WeightOnlyConfig(bits=8, group=0, rounding="rtn", activation_bits=8),
    "W8A8 per-channel RTN + SmoothQuant": WeightOnlyConfig(bits=8, group=0, rounding="rtn", smooth=True,
                                                          activation_bits=8),
}
PLAN_SETTING = "mixed {name} GPTQ act-order + smoothing"  # one row per --plan (a `lowbit search` plan.json)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_table(args: argparse.Namespace, rows: list, reference: dict[str, PerplexityResult], names: list[str],
                started: float) -> None:
    """(Re)write the section with the rows measured so far."""
    tokens = reference[names[0]].tokens
    lines = [
        "## SmolLM2-135M: weight-only quantization, perplexity and size (issue #14)",
        "",
        f"- Command: `python benchmarks/bench_smollm2_weights.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}; lowbit "
        f"{lowbit_revision()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{time.perf_counter() - started:.0f} s",
        f"- Perplexity on the first {args.windows} non-overlapping 512-token windows of each text ({tokens} scored "
        "tokens of Lee; " + ", ".join(f"{reference[t].tokens} of {t}" for t in names[1:]) + "). Ratio: quantized / "
        "FP32 perplexity on the same windows, 95% paired bootstrap interval over windows.",
        f"- FP32 is the released GGUF's weights (Q4_1 block linears, Q8_0 embedding) dequantized to float32. Every "
        f"quantized row also rounds the tied embedding / LM head to {EMBEDDING_FORMAT.describe()}. GPTQ: calibrated "
        f"on {args.calibration_windows} windows of 512 tokens of lee.cor + pang_lee_polarity.cor (all there is; "
        "never evaluated on), sequential over blocks.",
        "- Bits per weight: the block linears, packed values + zero points + float32 scales (float-min: float16 "
        "minimums + float16 scales; VQ: packed indices + int8 codebooks, one copy per linear + float32 codebook and "
        "row scales). Size: the whole model as the artifact stores it (embedding and RMSNorm gains included). Mixed "
        "rows: bits per linear from `lowbit search zoo:smollm2_135m --size S` (int3/4/8).",
        "",
        "| setting | bits/weight | size MB | " + " | ".join(f"{t} PPL | {t} ratio" for t in names) + " | rounding s |",
        "|---|---:|---:|" + "---:|---:|" * len(names) + "---:|",
    ]
    for name, bpw, size, rounding_s, results in rows:
        cells = []
        for t in names:
            r = results[t]
            ratio, (low, high) = paired_ratio(reference[t], r)
            cells += [f"{r.perplexity:.3f} [{r.interval[0]:.2f}, {r.interval[1]:.2f}]",
                      "1" if r is reference[t] else f"{ratio:.4f} [{low:.4f}, {high:.4f}]"]
        lines.append(f"| {name} | {bpw:.2f} | {size / 1e6:.1f} | " + " | ".join(cells) + f" | {rounding_s:.0f} |")
    write_section(args.out, args.section, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--windows", type=int, default=8, help="512-token windows per evaluation text")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    parser.add_argument("--plan", type=Path, action="append", default=[],
                        help="a decoder plan.json from `lowbit search`: adds a mixed-precision row (after --settings)")
    parser.add_argument("--section", default="smollm2_weights", help="the BENCHMARKS.md section to (re)write")
    args = parser.parse_args(argv)
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}
    for path in args.plan:
        plan = read_decoder_plan(path)
        settings[PLAN_SETTING.format(name=f"{plan.model_bytes / 1e6:.0f} MB")] = WeightOnlyConfig(
            group=plan.group, smooth=True, plan=tuple(plan.bits.items()))
    started = time.perf_counter()
    zoo = get_zoo_entry("zoo:smollm2_135m").decoder
    base, tokenizer = zoo.load()
    calibration = zoo.calibration()
    args.calibration_windows = len(calibration_windows(tokenizer, calibration))
    texts = {name: leading_tokens(tokenizer, text(), args.windows * DEFAULT_WINDOW)
             for name, text in zoo.evaluation.items()}
    params = sum(p.numel() for p in base.parameters())
    rows, reference = [], {}
    for name, config in settings.items():
        t0 = time.perf_counter()
        model, size, bpw = base, 4 * params, 32.0
        if config is not None:
            model = copy.deepcopy(base)
            weights = round_decoder(model, tokenizer, config, calibration, log=lambda m, n=name: log(f"{n}: {m}"))
            linears = [w for k, w in weights.items() if k != EMBEDDING]
            bpw = 8 * sum(w.nbytes for w in linears) / sum(n_weights(w) for w in linears)
            size = sum(w.nbytes for w in weights.values()) + 4 * sum(
                p.numel() for k, p in model.named_parameters() if k not in weights)
        rounding_s = time.perf_counter() - t0
        with torch.inference_mode():
            results = {text: perplexity(decoder_logits_fn(model), ids, max_windows=args.windows)
                       for text, ids in texts.items()}
        if config is None:
            reference = results
        rows.append((name, bpw, size, rounding_s, results))
        log(f"{name}: {bpw:.2f} bits/weight, {size / 1e6:.1f} MB, " + ", ".join(
            f"{t} {r.perplexity:.3f}" for t, r in results.items()) + f" ({time.perf_counter() - t0:.0f} s)")
        write_table(args, rows, reference, list(texts), started)

    log(f"wrote the smollm2_weights section of {args.out}")


if __name__ == "__main__":
    main()
