"""FP32 MiniLM-L6 (lowbit's own BERT encoder) on the packaged similarity sets: Lee-50, WordSim-353, SimLex-999.

    python benchmarks/eval_minilm.py [--seq-len 128 256 512]

Prints one markdown row per sequence length: Spearman against human judgements, how many Lee-50
documents were longer than seq_len (cut, as a static-length artifact would cut them), and the cosine of
the FP32 embeddings of the 200 held-out sentences with the same model run in float64 (mean / worst 1%:
the agreement metric quantized models will be scored with, here on rounding alone). Words are embedded
as one-word sentences. DESIGN.md §5 gives FP32 Lee 0.51, WordSim 0.73, SimLex 0.45.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

from lowbit.models.minilm import minilm_heldout_text, minilm_l6
from lowbit.text import cosine_agreement, similarity_scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128])
    args = parser.parse_args(argv)
    print("| seq_len | Lee-50 | WordSim-353 | SimLex-999 | Lee-50 documents cut | held-out cosine FP32 vs FP64 |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_len:
        encoder = minilm_l6(seq_len)
        heard: list[str] = []
        scores = similarity_scores(lambda texts, encoder=encoder, heard=heard: encoder.encode(texts, warn=heard.append))
        cut = "; ".join(m.split(" text(s) were ")[0] for m in heard) or "none"
        heldout = minilm_heldout_text()
        as_float64 = dataclasses.replace(encoder, model=copy.deepcopy(encoder.model).double())
        agreement = cosine_agreement(as_float64.encode(heldout), encoder.encode(heldout))
        print(f"| {seq_len} | {scores.lee50:.4f} | {scores.wordsim353:.4f} | {scores.simlex999:.4f} | {cut} | "
              f"{agreement.mean:.7f} / {agreement.worst_1pct:.7f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
