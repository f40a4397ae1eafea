"""FP32 SmolLM2-135M (lowbit's own Llama decoder on the dequantized Q4_1 GGUF) against the same weights in float64.

    python benchmarks/eval_smollm2.py [--window 512]

Prints one markdown row per sequence: its source, length, the largest |logit| difference between the float32
model and the float64 one, and the largest |logit|. The sequences are the first `window` tokens of each
evaluation text (Lee news, enwiki) and of the calibration text. Issue #14's bar is 1e-4. Perplexity itself is
measured with `lowbit eval zoo:smollm2_135m --text FILE` (see `lowbit.text.long_texts` for the texts).
"""

from __future__ import annotations

import argparse
import copy

import torch

from lowbit.models.smollm2 import smollm2_135m
from lowbit.text.long_texts import EVALUATION_TEXTS, decoder_calibration_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args(argv)
    model, tokenizer = smollm2_135m()
    model64 = copy.deepcopy(model).double()
    texts = {**{name: fn() for name, fn in EVALUATION_TEXTS.items()}, "calibration": decoder_calibration_text()}
    print("| text | tokens | max abs logit diff FP32 vs FP64 | max abs logit |")
    print("|---|---|---|---|")
    for name, text in texts.items():
        ids = torch.from_numpy(tokenizer.encode(text)[:args.window])[None]
        with torch.inference_mode():
            f32, f64 = model(ids).double(), model64(ids)
        print(f"| {name} | {ids.shape[1]} | {float((f32 - f64).abs().max()):.2e} | {float(f64.abs().max()):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
