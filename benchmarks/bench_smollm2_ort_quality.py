"""SmolLM2-135M in ONNX Runtime: perplexity of onnxruntime's own 4-bit quantizers next to lowbit's export (issue #14).

A quality peer for the decode-speed table (bench_smollm2_decode.py, which makes the same files): the FP32 model
exported by `lowbit.codegen.onnx.decoder` and quantized by onnxruntime's `MatMulNBitsQuantizer` (4 bits, block 128,
asymmetric, every MatMul including the LM head: RTN, its default, and HQQ; its GPTQ needs Intel Neural Compressor,
which is not installed here), against lowbit's own `decoder.onnx` of an artifact (GPTQ int4 g128, int8 g32
embedding / LM head). Perplexity on the first `--windows` non-overlapping 512-token windows of each text, as
bench_smollm2_weights.py scores them; the ratio is against the ORT FP32 export on the same windows, with a 95%
paired bootstrap interval. Writes the smollm2_ort_quality section of BENCHMARKS.md.

    python benchmarks/bench_smollm2_ort_quality.py --artifact DIR [--windows 8] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from bench_smollm2_decode import _export_fp32, _ort_quantize
from sections import cpu_info, lowbit_revision, write_section

from lowbit.codegen.onnx.decoder import OrtDecoder
from lowbit.models.zoo import get_zoo_entry
from lowbit.pipeline.decoder import leading_tokens, paired_ratio
from lowbit.pipeline.decoder_onnx import export_artifact_onnx
from lowbit.runtime.bpe_tokenizer import BpeTokenizer
from lowbit.runtime.decoder import read_decoder_artifact
from lowbit.text.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ort_hqq(fp32: Path, path: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=128, is_symmetric=False,
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=128, bits=4))
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="a decoder artifact of zoo:smollm2_135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit_bench_decode"), help="exported ONNX files")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows per evaluation text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32.onnx"
    own = args.artifact / "decoder.onnx"  # an artifact from before decoder.onnx: exported beside the others
    own = own if own.exists() else args.work / "lowbit_acc0.onnx"
    makers = {"ORT FP32 (lowbit's export of the FP32 model)": (fp32, _export_fp32),
              "ORT MatMulNBits RTN int4 g128 (onnxruntime's quantizer)":
                  (args.work / "ort_rtn4_acc0.onnx", lambda p: _ort_quantize(fp32, p, 0)),
              "ORT MatMulNBits HQQ int4 g128 (onnxruntime's quantizer)":
                  (args.work / "ort_hqq4.onnx", lambda p: _ort_hqq(fp32, p)),
              "lowbit decoder.onnx (GPTQ int4 g128, MatMulNBits)":
                  (own, lambda p: export_artifact_onnx(args.artifact, p))}
    files = {}
    for name, (path, make) in makers.items():
        if not path.exists():
            log(f"making {path.name}")
            make(path)
        files[name] = path
    tokenizer = BpeTokenizer(read_decoder_artifact(args.artifact).vocabulary)
    zoo = get_zoo_entry("zoo:smollm2_135m").decoder
    texts = {name: leading_tokens(tokenizer, text(), args.windows * DEFAULT_WINDOW)
             for name, text in zoo.evaluation.items()}
    results: dict[str, dict[str, PerplexityResult]] = {}
    for name, path in files.items():  # the section is rewritten after each model: a cut-short run keeps its rows
        runner = OrtDecoder(path, threads=args.threads)

        def logits(ids: np.ndarray, r: OrtDecoder = runner) -> np.ndarray:
            return r.logits(ids[0])[None]

        results[name] = {t: perplexity(logits, ids, max_windows=args.windows) for t, ids in texts.items()}
        log(f"{name}: " + ", ".join(f"{t} {r.perplexity:.3f}" for t, r in results[name].items()))
        write_table(args, argv, results, list(texts), started)


def write_table(args: argparse.Namespace, argv: list[str], results: dict[str, dict[str, PerplexityResult]],
                names: list[str], started: float) -> None:
    reference = next(iter(results.values()))
    lines = ["## SmolLM2-135M in ONNX Runtime: onnxruntime's 4-bit quantizers against lowbit's export (issue #14)", "",
             f"- Command: `python benchmarks/bench_smollm2_ort_quality.py {' '.join(argv)}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}; lowbit "
             f"{lowbit_revision()}; {time.perf_counter() - started:.0f} s",
             f"- Perplexity on the first {args.windows} non-overlapping 512-token windows of each text (as "
             "bench_smollm2_weights.py), every model run in ONNX Runtime. Ratio: against ORT FP32 on the same "
             "windows, 95% paired bootstrap interval. onnxruntime's quantizer rounds every MatMul to 4 bits, the LM "
             "head included, and leaves the embedding Gather in FP32; lowbit's artifact keeps the tied embedding / "
             "LM head at int8 g32. onnxruntime's GPTQ option needs Intel Neural Compressor (not installed).", "",
             "| model | " + " | ".join(f"{t} PPL | {t} ratio" for t in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for name, by_text in results.items():
        cells = []
        for t in names:
            r = by_text[t]
            ratio, (low, high) = paired_ratio(reference[t], r)
            cells += [f"{r.perplexity:.3f}", "1" if by_text is reference else f"{ratio:.4f} [{low:.4f}, {high:.4f}]"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_section(args.out, "smollm2_ort_quality", "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
